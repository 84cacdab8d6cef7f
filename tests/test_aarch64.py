"""The runtime on aarch64 under qemu emulation: scripts/aarch64_check.sh on the session's tiny export.

The script installs aptp into a cached arm64 Debian root filesystem (compiling aptp._C there),
runs aptp-generate and the runtime's torch-free tests under emulation, and compares the images
with this machine's. It skips (exit 3) when it cannot run here: not root, no qemu-user-static or
mmdebstrap, no binfmt_misc, or, in CI, no cached root filesystem (building one is a one-off of
several minutes that CI's budget does not take: `bash scripts/aarch64_check.sh --rootfs-only`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_fixtures import tiny_export

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aarch64_check.sh"
TIMEOUT_S = 1200
# In the suite, the kernel tests only: emulation is ~20x slower than the host (a 4-step 64 px
# generation: 29 s of denoising against 1.5 s), so the pipeline-heavy runtime files would take
# far more than CI's budget under it. The script alone runs every runtime test file by default.
SUITE_TESTS = "tests/test_kernels.py"


@pytest.mark.slow
def test_runtime_on_aarch64_matches_x86_64(tmp_path_factory, tmp_path):
    export = tiny_export(tmp_path_factory.mktemp("runtime"))
    # Build the rootfs only where asked to; otherwise a missing cache is a skip with the reason.
    args = [] if os.environ.get("APTP_AARCH64_BUILD_ROOTFS") == "1" else ["--cached-only"]
    env = {"APTP_AARCH64_TESTS": SUITE_TESTS, **os.environ, "APTP_AARCH64_EXPORT": str(export),
           "APTP_AARCH64_OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "machine inside: aarch64" in out, out[-2000:]
    assert re.search(r"aarch64 \S+_C\.cpython-3\d+-aarch64-linux-gnu\.so cpp", out), out[-2000:]
    diff = int(re.search(r"max pixel difference arm64 vs x86_64: (\d+)", out)[1])
    assert diff <= 2, out[-2000:]
    images = sorted(p.name for p in tmp_path.glob("*.png"))
    assert images == ["arm64_0.png", "arm64_1.png", "x86_64_0.png", "x86_64_1.png"], images
    summary = (tmp_path / "pytest.log").read_text().strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary)[1])
    assert "failed" not in summary and "error" not in summary and passed >= 40, summary
