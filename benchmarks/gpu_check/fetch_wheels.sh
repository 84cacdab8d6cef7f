#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check/run.sh installs offline on a GPU machine without a package
# registry (run this where the registry is reachable; the wheels go to .whl/, which travels with
# the working tree). Versions are the ones installed here; pure-Python wheels work on any
# Python, the few binary ones (tokenizers, regex, PyYAML, safetensors) only for the Python
# version given as $1 (default: this one's, e.g. 3.11); without them the check still runs if the
# GPU machine already has those packages. About 20 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
py_version="${1:-$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p .whl
# What `import diffusers, accelerate` and the check import beyond torch and numpy (transformers
# and scipy are optional for diffusers and left out).
pure=(diffusers accelerate huggingface_hub httpx2 httpcore2 h11 anyio idna certifi truststore requests urllib3
      packaging typing_extensions importlib_metadata filelock tqdm pybind11 setuptools wheel pytest pluggy iniconfig pygments)
binary=(tokenizers regex PyYAML safetensors Pillow psutil charset_normalizer)
pin() { python -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"; }
for name in "${pure[@]}"; do pip download --no-deps --only-binary=:all: -d .whl "$(pin "$name")"; done
for name in "${binary[@]}"; do
    pip download --no-deps --only-binary=:all: --python-version "$py_version" -d .whl "$(pin "$name")" \
        || echo "no $name wheel for Python $py_version: the GPU machine must already have it" >&2
done
du -sh .whl
