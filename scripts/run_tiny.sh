#!/usr/bin/env bash
# The whole aptp flow on the offline `tiny` preset: prune (router + codes), route, fine-tune
# every expert, export them to ONNX with a manifest, and generate images with the torch-free
# runtime. A few minutes on 2 CPU cores; no network needed.
#
#   bash scripts/run_tiny.sh            # writes runs/tiny and runs/tiny-export
#   bash scripts/run_tiny.sh --quick    # a smoke run: a few steps per stage, into runs/tiny-quick
#   APTP_RUN_DIR=/tmp/t bash scripts/run_tiny.sh
set -euo pipefail

# --quick: every stage runs, with a few training steps each (a first look, not good images).
steps=()
case "${1:-}" in
    "") ;;
    --quick) steps=(--max-steps 30); APTP_RUN_DIR="${APTP_RUN_DIR:-runs/tiny-quick}" ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_tiny: error: unknown argument $1 (use --quick or --help)" >&2; exit 2 ;;
esac

run_dir="${APTP_RUN_DIR:-runs/tiny}"
config="${APTP_CONFIG:-tiny}"

# A second run continues (or, once finished, keeps) what the first one wrote.
resume=()
if [ -e "$run_dir/config.yaml" ]; then resume=(--resume); fi
aptp-train prune --config "$config" --output-dir "$run_dir" "${resume[@]}" "${steps[@]}"
aptp-train route --checkpoint "$run_dir"

# Fine-tune every expert that the router sends training prompts to (one with none keeps the
# dense weights sliced by its code).
num_experts=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['num_codes'])" "$run_dir/checkpoint.json")
routed=$(python -c "import json, sys; print(' '.join(str(k) for k, n in enumerate(json.load(open(sys.argv[1]))['counts']) if n))" "$run_dir/routing.json")
for i in $routed; do
    aptp-train finetune --checkpoint "$run_dir" --expert "$i" "${steps[@]}"
done

# The export sits beside the checkpoint (an export inside its own checkpoint is refused); a rerun
# replaces the export this script wrote before, and nothing else.
export_dir="${APTP_EXPORT_DIR:-$run_dir-export}"
overwrite=()
if [ -e "$export_dir/manifest.json" ]; then overwrite=(--overwrite); fi
aptp-export --checkpoint "$run_dir" --output "$export_dir" --steps 25 --scheduler ddim "${overwrite[@]}"

aptp-generate --artifacts "$export_dir" --output "$run_dir/images/sample.png" --seed 0 \
    --prompt "two red circles on the left" \
    --prompt "a blue square at the top" \
    --prompt "the word SUN in green" \
    --prompt "three yellow triangles at the bottom"

echo "run_tiny: pruned, routed and fine-tuned $num_experts experts in $run_dir, exported them to $export_dir,"
echo "          and generated images into $run_dir/images"
