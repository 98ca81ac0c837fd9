"""Shared plumbing for the atheris harnesses in tests/fuzz.

Every harness module exposes `one_input(data: bytes) -> None` (the property) and runs
standalone as `python tests/fuzz/fuzz_X.py [libFuzzer args] [corpus dir]`. Run that way the
viommu modules are imported under `atheris.instrument_imports()`, so libFuzzer gets Python
coverage of them; imported by pytest (corpus replay) they are imported plainly.

Known bugs. A harness may waive a bug that is reported and has a regression input under
`tests/fuzz/crashes/<harness>/`, so that fuzzing goes on finding new ones instead of
stopping at the known one within seconds. Waivers are listed in `KNOWN_BUGS` of the
harness, each with the condition that recognises it precisely; `VIOMMU_FUZZ_STRICT=1`
(or `set_strict(True)`, as the crash-replay tests do) turns every waiver off, and
`VIOMMU_FUZZ_STRICT=name,name` only those (to make the fuzzer find one bug's input again).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import atheris

FUZZ_DIR = Path(__file__).resolve().parent
TESTS_DIR = FUZZ_DIR.parent
if str(TESTS_DIR) not in sys.path:  # virtio_driver, pagetables
    sys.path.insert(0, str(TESTS_DIR))

_setting = os.environ.get("VIOMMU_FUZZ_STRICT", "")
_strict = _setting not in ("", "0") and "," not in _setting and not _setting[0].isalpha()
_strict_only = set() if _strict or _setting in ("", "0") else set(_setting.split(","))


def strict() -> bool:
    return _strict


def strict_for(name: str) -> bool:
    """Is the waiver of this known bug off?"""
    return _strict or name in _strict_only


def set_strict(on: bool) -> None:
    global _strict
    _strict = on


class PropertyViolation(AssertionError):
    """The product broke a harness invariant (an AssertionError, so libFuzzer's report and
    pytest's both show the message)."""


class KnownBug(PropertyViolation):
    """A violation matching a reported bug; raised only in strict mode."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PropertyViolation(message)


def known_bug(name: str, detail: str) -> None:
    """Called where a harness recognises a reported bug: fatal in strict mode only."""
    if strict_for(name):
        raise KnownBug(f"{name}: {detail}")


def instrumented(module_name: str):
    """`with instrumented(__name__):` around the product imports of a harness."""
    if module_name == "__main__":
        return atheris.instrument_imports()
    return contextlib.nullcontext()


def maybe_instrument(module_name: str):
    """Decorator: atheris.instrument_func on the harness's own model code when standalone,
    so libFuzzer also sees which model branches (malformation reasons...) an input takes."""
    if module_name == "__main__":
        return atheris.instrument_func
    return lambda fn: fn


def run(one_input) -> None:
    logging.disable(logging.CRITICAL)  # the product logs every refusal; only when standalone
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


# --- file descriptors ------------------------------------------------------------------------

def open_fds() -> dict[int, str]:
    """This process's open fds and what they are (readlink of /proc/self/fd/N)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd listdir itself used, closed by now
    return out


def fd_alive(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def leaked_fds(before: dict[int, str]) -> dict[int, str]:
    """fds open now that were not open (as the same object) before."""
    now = open_fds()
    return {fd: what for fd, what in now.items() if before.get(fd) != what}


@contextlib.contextmanager
def nothing_left_behind(thread: str):
    """Around one input of a harness that starts a thread: when the block ends, as many
    threads run as before (the thread ended on stop) and no fd was left open."""
    threads_before = threading.active_count()
    fds_before = open_fds()
    yield
    check(threading.active_count() == threads_before, f"{thread} outlived stop()")
    leaked = leaked_fds(fds_before)
    check(not leaked, f"fds leaked: {leaked}")


# --- FuzzedDataProvider helpers --------------------------------------------------------------

def pick(fdp: atheris.FuzzedDataProvider, values):
    return values[fdp.ConsumeIntInRange(0, len(values) - 1)]


def u8(fdp) -> int:
    return fdp.ConsumeIntInRange(0, 0xFF)


def u16(fdp) -> int:
    return fdp.ConsumeIntInRange(0, 0xFFFF)


def u32(fdp) -> int:
    return fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)


def u64(fdp) -> int:
    return fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def interesting(fdp, bits: int, likely=()) -> int:
    """An integer of `bits` bits: one of `likely`, an edge value, or anything."""
    top = (1 << bits) - 1
    choice = fdp.ConsumeIntInRange(0, 7)
    if likely and choice <= 3:
        return pick(fdp, list(likely)) & top
    if choice <= 5:
        return pick(fdp, [0, 1, 2, 4, 0x7F, 0x80, 0xFF, 0x1000, top >> 1, (top >> 1) + 1,
                          top - 1, top]) & top
    return fdp.ConsumeIntInRange(0, top)


class FdPool:
    """fds created once per harness; messages carry them (the kernel duplicates them on the
    way), so after each input the harness can tell which copies the code under test kept."""

    def __init__(self, name: str, mem_size: int) -> None:
        self.ram = os.memfd_create(f"viommu-fuzz-{name}")
        os.ftruncate(self.ram, mem_size)
        self.small = os.memfd_create(f"viommu-fuzz-{name}-small")
        os.ftruncate(self.small, 0x1000)
        self.events = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
        self.fds = [self.ram, self.small, *self.events]
        self.names = {os.readlink(f"/proc/self/fd/{fd}") for fd in self.fds}

    def reset(self, image: bytes) -> None:
        """The RAM memfd holds `image` again; file offsets and eventfd counters are zero."""
        os.pwrite(self.ram, image, 0)
        for fd in (self.ram, self.small):
            os.lseek(fd, 0, os.SEEK_SET)
        for fd in self.events:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def held(self) -> set[int]:
        """fds of this process that are copies of pool objects (not the pool's own)."""
        return {fd for fd, what in open_fds().items()
                if what in self.names and fd not in self.fds}


def send_message(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """One protocol message, its fds (if any) passed as SCM_RIGHTS."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def check_failed_reads_close_fds(conn, held: Callable[[], set[int]],
                                 errors: tuple[type[Exception], ...]) -> None:
    """Wrap `conn._read_message`: when a message never completes (one of `errors`), the fds
    received with it must be closed again."""
    real_read = conn._read_message

    def read_message():
        before = held()
        try:
            return real_read()
        except errors:
            extra = held() - before
            check(not extra, f"fds {sorted(extra)} received with a message that never "
                             f"completed are still open")
            raise
    conn._read_message = read_message


_pools: dict[str, FdPool] = {}


def fd_pool(name: str, mem_size: int) -> FdPool:
    if name not in _pools:
        _pools[name] = FdPool(name, mem_size)
    return _pools[name]
