"""Say at once that Ctrl-C was heard. Python runs its SIGINT handler (KeyboardInterrupt) only
between bytecodes, so during a long torch operation a training step ends in silence; the C-level
wake-up fd is written immediately, and a thread waiting on it prints one line."""

from __future__ import annotations

import signal
import socket
import sys
import threading

__all__ = ["announce_interrupts"]

# The wake-up socket must stay open as long as it is set (a collected socket closes its fd).
_WAKEUP: list[socket.socket] = []


def announce_interrupts(prog: str) -> bool:
    """Print ``PROG: interrupted: stopping after the current step ...`` to stderr the moment SIGINT
    arrives (once); the interrupt itself still raises KeyboardInterrupt as usual. Returns False
    (and does nothing) outside the main thread, where no wake-up fd can be set."""
    if threading.current_thread() is not threading.main_thread():
        return False
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:
        reader.close()
        writer.close()
        return False

    _WAKEUP[:] = [reader, writer]

    def watch() -> None:
        while True:
            data = reader.recv(16)
            if not data:
                return
            if signal.SIGINT in data:
                print(f"{prog}: interrupted: stopping after the current step (--resume continues from the last "
                      "saved state)", file=sys.stderr, flush=True)
                return

    threading.Thread(target=watch, name="announce-interrupts", daemon=True).start()
    return True
