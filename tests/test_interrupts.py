"""Ctrl-C during a long training step is announced at once, not when the step ends."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

# A 'step' like a torch op: C code that releases the GIL, with no bytecode boundary inside, so
# KeyboardInterrupt waits for it to return; the announcement must come before that.
SCRIPT = """
import numpy as np
from aptp.train.interrupts import announce_interrupts
assert announce_interrupts("aptp-train")
a = np.ones((2500, 2500))
print("ready", flush=True)
while True:
    a @ a
"""


def test_sigint_is_announced_before_the_step_returns():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    # As from a terminal: a test run started with `&` by a non-interactive shell inherits SIGINT
    # ignored, and Python then installs no handler at all (no KeyboardInterrupt, no wake-up fd).
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready, "nothing on stderr within 60 s of Ctrl-C"
        first = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # The first line is the announcement, not the KeyboardInterrupt traceback the step ends with.
    assert first.startswith("aptp-train: interrupted: stopping after the current step"), first
