"""The terminal side of the command line: progress for long steps (rich), and an interactive
serial console over a VM's serial socket (a raw terminal pumped to and from the socket: no
library does that for a unix socket)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import time
import tty
from collections.abc import Iterator

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text

DETACH_KEY = b"\x1d"  # Ctrl-]
DETACH_KEY_NAME = "Ctrl-]"


class _Seconds(ProgressColumn):
    """The time so far as '5.7 s', as the final line prints it."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.elapsed or 0:.1f} s")


@contextlib.contextmanager
def progress(label: str) -> Iterator[None]:
    """'booting… 5.7 s' on stderr: a spinner and a running clock (rich) while it runs on a
    terminal, then one line, which is all a CI log gets."""
    console = Console(stderr=True, highlight=False, markup=False, emoji=False)
    started = time.monotonic()
    outcome = "failed after "
    try:
        if console.is_terminal:
            with Progress(SpinnerColumn(), TextColumn(f"{label}…", markup=False), _Seconds(),
                          console=console, transient=True) as bar:
                bar.add_task(label, total=None)
                yield
        else:
            yield
        outcome = ""
    finally:
        console.print(f"{label}… {outcome}{time.monotonic() - started:.1f} s")


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
