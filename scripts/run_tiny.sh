#!/usr/bin/env bash
# The whole aptp training flow on the offline `tiny` preset: prune (router + codes), route,
# then fine-tune every expert. A few minutes on 2 CPU cores; no network needed.
#
#   bash scripts/run_tiny.sh            # writes runs/tiny
#   APTP_RUN_DIR=/tmp/t bash scripts/run_tiny.sh
set -euo pipefail

run_dir="${APTP_RUN_DIR:-runs/tiny}"
config="${APTP_CONFIG:-tiny}"

# A second run continues (or, once finished, keeps) what the first one wrote.
resume=()
if [ -e "$run_dir/config.yaml" ]; then resume=(--resume); fi
aptp-train prune --config "$config" --output-dir "$run_dir" "${resume[@]}"
aptp-train route --checkpoint "$run_dir"

# One expert per architecture code.
num_experts=$(python -c "import sys; from aptp.train.config import load_config; print(load_config(sys.argv[1]).codes.num_codes)" "$config")
for ((i = 0; i < num_experts; i++)); do
    aptp-train finetune --checkpoint "$run_dir" --expert "$i"
done

echo "run_tiny: pruned, routed and fine-tuned $num_experts experts in $run_dir"
