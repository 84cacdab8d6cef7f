#!/usr/bin/env bash
# aptp's runtime on aarch64 (the CPU architecture of Jetson boards), under qemu user-mode
# emulation: an arm64 Debian bookworm root filesystem (Python 3.11) with the runtime's
# dependencies from their aarch64 wheels, aptp installed there with `pip install .` (which
# compiles aptp._C with the rootfs's own g++), `aptp-generate` on a tiny export, its PNGs
# compared with the same command's on this x86-64 host, and the torch-free runtime tests.
#
#   bash scripts/aarch64_check.sh                   # everything; prints a summary at the end
#   bash scripts/aarch64_check.sh --rootfs-only     # only build (or find) the cached rootfs
#   bash scripts/aarch64_check.sh --cached-only     # the check, or exit 3 if no rootfs is cached
#
# Needs root, qemu-user-static, and for building the rootfs mmdebstrap and binfmt_misc (the
# runs use binfmt_misc too, or proot -q where the kernel has none):
#   apt-get install qemu-user-static mmdebstrap binfmt-support proot
#
# Environment:
#   APTP_AARCH64_CACHE   where the rootfs is cached (default /var/cache/aptp-aarch64); its two
#                        layers (Debian packages; the venv of wheels) are rebuilt when their
#                        lists below change
#   APTP_AARCH64_EXPORT  an existing export to use; otherwise one is built on the host with
#                        tests/runtime_fixtures.py (needs torch: aptp[train])
#   APTP_AARCH64_TESTS   the test files to run under emulation (default: the runtime's)
#   APTP_AARCH64_PYTEST_ARGS  extra pytest arguments there (e.g. -k 'not four_threads')
#   APTP_AARCH64_OUT     where the PNGs and the test log are kept (default: a temp dir, removed)
#   APTP_AARCH64_MAX_PIXEL_DIFF  largest accepted arm64-vs-x86_64 pixel difference (default 2)
#   PYTHON               the host interpreter with aptp installed (default: python3)
#
# Exit status: 0 all passed; 1 a check failed; 2 bad usage; 3 the tools (or, with
# --cached-only, the cached rootfs) are missing, with the reason on the last line of stderr.
#
# The whole script is one function called on the last line, so bash has read all of it before
# anything runs (editing it during a long run cannot change what that run does).
set -euo pipefail

say() { echo "== aarch64: $*"; }
missing() { echo "aarch64_check: skipped: $*" >&2; exit 3; }
elapsed() { echo $(( $(date +%s) - $1 )); }

# What goes into the rootfs. The base (Debian packages, emulated dpkg: the slow part) and the
# venv (aarch64 wheels) are cached with separate keys, so a change to one keeps the other.
SUITE=bookworm
DEBS="python3,python3-venv,python3-dev,g++"
# aptp's install_requires plus what building aptp._C and running the tests need.
WHEELS="numpy tokenizers onnxruntime safetensors tqdm pyyaml pillow pybind11 setuptools wheel pytest"
BASE_KEY="aptp-aarch64 base v2 $SUITE $DEBS"
KEY="$BASE_KEY | venv v2 $WHEELS"

# binfmt_misc lets the kernel hand arm64 executables to qemu, inside a chroot too (the F flag of
# Debian's qemu-aarch64 entry preloads the interpreter). Prints yes or no.
binfmt_ready() {
    if [ -d /proc/sys/fs/binfmt_misc ]; then
        [ -e /proc/sys/fs/binfmt_misc/status ] ||
            mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
        if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && command -v update-binfmts >/dev/null; then
            update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
        fi
    fi
    if grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then echo yes; else echo no; fi
}

build_rootfs() {  # cache rootfs binfmt
    local cache=$1 rootfs=$2 binfmt=$3 cold_start start tmp
    command -v mmdebstrap >/dev/null || missing "mmdebstrap not found (apt-get install mmdebstrap)"
    [ "$binfmt" = yes ] || missing "binfmt_misc has no enabled qemu-aarch64 entry (no binfmt_misc in this kernel, or update-binfmts failed): mmdebstrap cannot run arm64 maintainer scripts"
    cold_start=$(date +%s)
    mkdir -p "$cache"
    if [ ! -f "$rootfs/.aptp-base-key" ] || [ "$(cat "$rootfs/.aptp-base-key")" != "$BASE_KEY" ]; then
        # Built beside the cache entry and renamed when complete: a broken build leaves no
        # rootfs that looks usable. Only our own temp dir is removed (never across mounts).
        tmp="$(mktemp -d "$cache/rootfs.tmp.XXXXXX")"
        trap 'rm -rf --one-file-system "$tmp"' EXIT
        say "building the arm64 $SUITE base in $tmp (mmdebstrap, emulated maintainer scripts)"
        # No documentation, manual pages or translations: fewer files to unpack under emulation.
        mmdebstrap --quiet --arch=arm64 --variant=apt --include="$DEBS" \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' "$SUITE" "$tmp"
        echo "$BASE_KEY" > "$tmp/.aptp-base-key"
        rm -rf --one-file-system "$rootfs"
        mv "$tmp" "$rootfs"
        trap - EXIT
        say "base: $(elapsed "$cold_start") s"
    fi
    start=$(date +%s)
    say "installing the aarch64 wheels into /opt/venv"
    rm -f "$rootfs/.aptp-key"
    rm -rf --one-file-system "$rootfs/opt/venv"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    # This host's CA bundle, so pip inside trusts what pip here trusts (a TLS-inspecting proxy
    # included); the host's pip configuration (local wheel folders) means nothing inside.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/opt/host-ca-certificates.crt"
    chroot "$rootfs" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root PIP_CONFIG_FILE=/dev/null \
        PIP_CERT=/opt/host-ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off \
        sh -ec "python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: $WHEELS"
    echo "$KEY" > "$rootfs/.aptp-key"
    say "venv: $(elapsed "$start") s; rootfs ready in $(elapsed "$cold_start") s (cold build)"
}

# Runs a shell command in the rootfs, in /work/src: chroot in a private mount namespace (the
# /proc and /dev binds vanish with it), or proot -q where there is no binfmt_misc. Not /sys: with
# the host's (x86-64) CPU topology there, onnxruntime's cpuinfo crashes under qemu (SIGSEGV);
# without it, it warns that it cannot read the CPU list and runs.
in_rootfs() {  # rootfs binfmt command
    local rootfs=$1 binfmt=$2
    local envs=(PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root OMP_NUM_THREADS=1 PIP_CONFIG_FILE=/dev/null
                PIP_CERT=/opt/host-ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
                HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1)
    if [ "$binfmt" = yes ]; then
        unshare --mount --propagation private sh -ec '
            mount --rbind /proc "$1/proc"; mount --rbind /dev "$1/dev"; shift
            exec chroot "$@"' sh "$rootfs" "$rootfs" /usr/bin/env -i "${envs[@]}" sh -ec "cd /work/src && $3"
    else
        command -v proot >/dev/null || missing "no binfmt_misc entry for qemu-aarch64 and no proot"
        proot -q qemu-aarch64-static -r "$rootfs" -b /proc -b /dev -w /work/src \
            /usr/bin/env -i "${envs[@]}" sh -ec "$3"
    fi
}

max_pixel_diff() {  # python out_dir -> prints the largest difference; per-image lines on stderr
    "$1" - "$2" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[1])
worst = 0
arm_images = sorted(out.glob("arm64_*.png"))
if not arm_images:
    sys.exit("no arm64 images to compare")
for arm in arm_images:
    x86 = out / arm.name.replace("arm64", "x86_64")
    a = np.asarray(Image.open(arm), dtype=np.int16)
    b = np.asarray(Image.open(x86), dtype=np.int16)
    diff = int(np.abs(a - b).max())
    worst = max(worst, diff)
    print(f"   {arm.name}: max |arm64 - x86_64| = {diff}, pixels differing: "
          f"{int((a != b).any(-1).sum())}/{a.shape[0] * a.shape[1]}", file=sys.stderr)
print(worst)
PY
}

main() {
    local repo cache python_host tests mode rootfs binfmt
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    cache="${APTP_AARCH64_CACHE:-/var/cache/aptp-aarch64}"
    python_host="${PYTHON:-python3}"
    # The runtime's test files (torch-free once their diffusers references skip); those present run.
    tests="${APTP_AARCH64_TESTS:-tests/test_kernels.py tests/test_runtime*.py tests/test_hardening_runtime.py tests/test_hardening_server.py tests/test_residency.py tests/test_serving_policy.py tests/test_providers.py tests/test_generation_options.py}"
    mode=all
    case "${1:-}" in
        "") ;;
        --rootfs-only) mode=rootfs ;;
        --cached-only) mode=cached ;;
        -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "aarch64_check: error: unknown argument ${1} (use --rootfs-only, --cached-only or --help)" >&2; exit 2 ;;
    esac

    [ "$(id -u)" -eq 0 ] || missing "needs root (chroot, mounts and mmdebstrap's root mode)"
    command -v qemu-aarch64-static >/dev/null || missing "qemu-aarch64-static not found (apt-get install qemu-user-static)"
    binfmt="$(binfmt_ready)"

    rootfs="$cache/rootfs"
    # One run at a time per cache: a run puts its sources, export and outputs in $rootfs/work.
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    if ! flock -n 9; then
        say "waiting for another aarch64_check run (lock: $cache/.lock)"
        flock 9
    fi
    if [ ! -f "$rootfs/.aptp-key" ] || [ "$(cat "$rootfs/.aptp-key")" != "$KEY" ]; then
        [ "$mode" = cached ] && missing "no cached arm64 rootfs at $rootfs with this script's package lists (a one-off build of about half an hour on 2 cores: bash scripts/aarch64_check.sh --rootfs-only)"
        build_rootfs "$cache" "$rootfs" "$binfmt"
    else
        say "cached rootfs: $rootfs"
    fi
    [ "$mode" = rootfs ] && exit 0

    local work out total_start start export_dir install_s gen_arm_s gen_x86_s tests_s diff status limit
    work="$(mktemp -d "${TMPDIR:-/tmp}/aptp-aarch64.XXXXXX")"
    # What this run put in the rootfs goes with the temp dir; the cached layers stay. (Expanded
    # now: main's locals are gone when the EXIT trap runs.)
    trap "rm -rf --one-file-system '$work' '$rootfs/work'" EXIT
    out="${APTP_AARCH64_OUT:-$work/out}"
    mkdir -p "$out"
    total_start=$(date +%s)

    export_dir="${APTP_AARCH64_EXPORT:-}"
    if [ -z "$export_dir" ]; then
        say "building the tiny export on the host (torch)"
        start=$(date +%s)
        export_dir="$("$python_host" - "$repo" "$work/export-build" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, str(Path(sys.argv[1]) / "tests"))
from runtime_fixtures import tiny_export

print(tiny_export(Path(sys.argv[2])))
PY
)"
        say "host export: $(elapsed "$start") s"
    fi
    [ -f "$export_dir/manifest.json" ] || { echo "aarch64_check: error: $export_dir has no manifest.json" >&2; exit 2; }

    # A fresh copy of the sources (tracked and untracked-not-ignored) and of the export. Python
    # runs outside /work/src below: the source folder aptp/ in the working directory would shadow
    # the installed package, which alone has aptp._C and the subpackages mapped from train/,
    # export/, runtime/.
    rm -rf --one-file-system "$rootfs/work"
    mkdir -p "$rootfs/work/src" "$rootfs/work/out"
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
        xargs -0 -I{} sh -c '[ -e "$1" ] && cp --parents -t "$2" "$1" || true' sh {} "$rootfs/work/src")
    cp -rL "$export_dir" "$rootfs/work/export"
    # For pip, should `pip install .` need to fetch a dependency added since the venv was built.
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/opt/host-ca-certificates.crt"

    say "machine inside: $(in_rootfs "$rootfs" "$binfmt" 'uname -m; python3 --version' | tr '\n' ' ')"

    start=$(date +%s)
    say "pip install . in the rootfs (resolves install_requires, compiles aptp._C with g++)"
    in_rootfs "$rootfs" "$binfmt" "pip install --no-build-isolation --no-cache-dir . > /work/out/pip-install.log 2>&1 ||
        { tail -30 /work/out/pip-install.log; exit 1; }
cd / && python -c 'import platform, aptp._C, aptp.runtime.kernels as k; print(platform.machine(), aptp._C.__file__, k.backend())'"
    install_s=$(elapsed "$start")
    say "install + build: $install_s s"

    local gen_args=(--seed 0 --threads 1 --prompt "a red sports car on a highway" --prompt "a bowl of tomato soup")
    start=$(date +%s)
    in_rootfs "$rootfs" "$binfmt" "cd /work && aptp-generate --artifacts /work/export --output /work/out/arm64.png ${gen_args[*]@Q}"
    gen_arm_s=$(elapsed "$start")
    start=$(date +%s)
    (cd "$work" && OMP_NUM_THREADS=1 "$python_host" -m aptp.runtime.cli --artifacts "$export_dir" \
        --output "$out/x86_64.png" "${gen_args[@]}")
    gen_x86_s=$(elapsed "$start")
    cp "$rootfs"/work/out/arm64_*.png "$out/"
    diff="$(max_pixel_diff "$python_host" "$out")"
    say "max pixel difference arm64 vs x86_64: $diff (of 255)"

    tests="$(cd "$repo" && for f in $tests; do if [ -f "$f" ]; then printf '/work/src/%s ' "$f"; fi; done)"
    start=$(date +%s)
    say "runtime tests under emulation: $tests"
    set +e
    in_rootfs "$rootfs" "$binfmt" \
        "cd /work/out && APTP_TEST_RUNTIME_EXPORT=/work/export APTP_TEST_TIMEOUT_SCALE=20 python -m pytest -q -p no:cacheprovider -rs $tests ${APTP_AARCH64_PYTEST_ARGS:-}" |
        tee "$out/pytest.log"
    status=${PIPESTATUS[0]}
    set -e
    tests_s=$(elapsed "$start")

    say "summary: install+build ${install_s}s, aptp-generate arm64 ${gen_arm_s}s vs x86_64 ${gen_x86_s}s," \
        "max pixel diff ${diff}, tests ${tests_s}s: $(tail -1 "$out/pytest.log"), total $(elapsed "$total_start")s"
    # More than a couple of levels would be a real difference, not onnxruntime's last bits.
    limit="${APTP_AARCH64_MAX_PIXEL_DIFF:-2}"
    if [ "$diff" -gt "$limit" ]; then
        echo "aarch64_check: FAILED: arm64 images differ from x86_64 by $diff > $limit" >&2
        exit 1
    fi
    exit "$status"
}

main "$@"
