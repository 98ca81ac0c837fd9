"""What the `viommu` commands share: their error type, how they print, and a named running
VM driven from this process."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from viommu.vm import runs
from viommu.vm.machine import Machine


class CliError(RuntimeError):
    """A mistake on the command line; the message says what to do instead."""


def say(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    print(f"viommu: note: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def attached_vm(name: str) -> Iterator[tuple[Machine, runs.RunState, Path]]:
    """The running VM `name`, driven from this process and released (left running) after."""
    directory, state = runs.find_run(name)
    vm = Machine.attach(directory)
    try:
        yield vm, state, directory
    finally:
        vm.release()

