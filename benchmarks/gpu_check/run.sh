#!/usr/bin/env bash
# The prepared GPU check (issue 11): one command, everything under one output folder.
#
#   bash benchmarks/gpu_check/run.sh OUT [--dry-run] [aptp-bench gpu-check options...]
#
# Offline by design (the GPU machine has no package registry): it installs only the wheels
# carried in .whl/ (e.g. diffusers, accelerate, pybind11, pytest and their missing pure-Python
# dependencies; fetch them beforehand with `pip download --no-deps -d .whl ...`), into a
# private folder, never from the network. If aptp is not importable yet, it is built from this
# working tree (C++ and, where nvcc is found, CUDA kernels: aptp._C_cuda) into that folder, with
# the build log in OUT/build.log. Then `aptp-bench gpu-check` runs (see
# benchmarks/gpu_check/suite.py). A real run stops starting new cells after --budget-s (330 s).
set -uo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:?usage: bash benchmarks/gpu_check/run.sh OUT [--dry-run] [options]}"
shift
# The folder is claimed as aptp.outputs does: new, empty, or an earlier gpu-check's (its marker or
# its gpu_check.json). The logs below are written before Python runs, so the claim is made here.
marker='{"kind": "aptp-gpu-check"}'
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] &&
    ! grep -qF "$marker" "$out/.aptp-output.json" 2>/dev/null &&
    ! grep -qF '"format": "aptp-gpu-check"' "$out/gpu_check.json" 2>/dev/null; then
    echo "gpu_check/run.sh: error: $out already holds files that are not aptp-bench gpu-check results; choose a new or empty folder" >&2
    exit 2
fi
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
[ -f "$out/.aptp-output.json" ] || echo "$marker" > "$out/.aptp-output.json"
python="${PYTHON:-python3}"
site="${APTP_GPU_CHECK_SITE:-${TMPDIR:-/tmp}/aptp-gpu-check-site}"
log="$out/gpu_check.log"
: > "$log"
say() { echo "== $*" | tee -a "$log"; }

say "gpu_check/run.sh: repo $repo, output $out, python $("$python" --version 2>&1)"
shopt -s nullglob
wheels=("$repo"/.whl/*.whl)
if [ "${#wheels[@]}" -gt 0 ]; then
    say "installing ${#wheels[@]} carried wheel(s) into $site (no index, no dependencies)"
    if ! "$python" -m pip install --no-index --no-deps --upgrade --target "$site" "${wheels[@]}" \
            >> "$out/wheels.log" 2>&1; then
        # Then one at a time: a wheel built for another Python must not stop the others.
        failed=0
        for wheel in "${wheels[@]}"; do
            "$python" -m pip install --no-index --no-deps --upgrade --target "$site" "$wheel" \
                >> "$out/wheels.log" 2>&1 || failed=$((failed + 1))
        done
        [ "$failed" -eq 0 ] || say "$failed carried wheel(s) did not install here (other Python?): see wheels.log"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    say "no carried wheels in $repo/.whl"
fi

# Run Python outside the repo root: its aptp/ folder would shadow the installed package.
cd "$out" || exit 1
if "$python" -c "import aptp.benchmarks.gpu_check" >> "$log" 2>&1; then
    say "aptp already importable: $("$python" -c 'import aptp; print(aptp.__file__)')"
else
    # Only this GPU's architecture: the default list compiles every kernel ~10 times (minutes).
    if [ -z "${APTP_CUDA_ARCHS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
        cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
        [ -n "$cap" ] && export APTP_CUDA_ARCHS="$cap"
    fi
    say "building aptp from $repo into $site/aptp-build (CUDA archs: ${APTP_CUDA_ARCHS:-default}; log: build.log)"
    if "$python" -m pip install --no-index --no-deps --no-build-isolation --target "$site/aptp-build" "$repo" \
            > "$out/build.log" 2>&1; then
        export PYTHONPATH="$site/aptp-build:$PYTHONPATH"
    else
        say "building aptp failed: see $out/build.log"
        exit 1
    fi
    grep -E "aptp|nvcc|CUDA|sm_" "$out/build.log" | grep -iv warning | tail -n 20 >> "$log" || true
fi

say "aptp-bench gpu-check --output-dir $out $*"
"$python" -m aptp.benchmarks.gpu_check --output-dir "$out" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
say "exit status $status"
exit "$status"
