"""The terminal side of the command line: progress lines for long steps, and an interactive
serial console over a VM's serial socket."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator

DETACH_KEY = b"\x1d"  # Ctrl-]
DETACH_KEY_NAME = "Ctrl-]"


@contextlib.contextmanager
def progress(label: str) -> Iterator[None]:
    """'booting… 5.7 s' on stderr: redrawn while it runs on a terminal, one line elsewhere
    (so CI logs get the time without a hundred redraws)."""
    started = time.monotonic()
    done = threading.Event()
    tty_out = sys.stderr.isatty()

    def redraw() -> None:
        while not done.wait(0.1):
            sys.stderr.write(f"\r{label}… {time.monotonic() - started:.1f} s")
            sys.stderr.flush()

    ticker = threading.Thread(target=redraw, daemon=True) if tty_out else None
    if ticker is not None:
        ticker.start()
    outcome = "failed after "
    try:
        yield
        outcome = ""
    finally:
        done.set()
        if ticker is not None:
            ticker.join()
        end = "\r" if tty_out else ""
        sys.stderr.write(f"{end}{label}… {outcome}{time.monotonic() - started:.1f} s\n")
        sys.stderr.flush()


def interact(sock: socket.socket) -> None:
    """Copy the terminal to the socket and back until the detach key, or the peer closes.
    A terminal is put in raw mode (restored afterwards), so keys like Ctrl-C reach the guest."""
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        _pump(sock, stdin, sys.stdout.fileno())
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _pump(sock: socket.socket, stdin: int, stdout: int) -> None:
    readers = [sock, stdin]
    while True:
        ready, _, _ = select.select(readers, [], [])
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return  # QEMU went away
            os.write(stdout, data)
        if stdin in ready:
            data = os.read(stdin, 1024)
            if not data:  # end of piped input: keep showing output until the guest is quiet
                readers.remove(stdin)
                _drain(sock, stdout)
                return
            if DETACH_KEY in data:
                sock.sendall(data[:data.index(DETACH_KEY)])
                return
            sock.sendall(data)


def _drain(sock: socket.socket, stdout: int, quiet: float = 1.0) -> None:
    while select.select([sock], [], [], quiet)[0]:
        data = sock.recv(65536)
        if not data:
            return
        os.write(stdout, data)
