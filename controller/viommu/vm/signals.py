"""Clean-up that a signal must not cut short: a second Ctrl-C, or the terminal closing
(SIGHUP), while a Machine stops its processes would leave QEMU or the backend running with
nobody to know."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the block runs; those that came meanwhile are
    raised again when it ends (then their handlers run: KeyboardInterrupt, say). Python runs
    signal handlers in the main thread only, so elsewhere this does nothing; nested blocks
    pass what they held to the one outside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: held.append(signum))
                for sig in HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)
