"""The per-user cache: $VIOMMU_CACHE, else $XDG_CACHE_HOME/viommu, else ~/.cache/viommu
(XDG Base Directory Specification). Downloads and builds live here, keyed so that several
QEMUs, kernels and architectures sit side by side."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class SetupMissing(RuntimeError):
    """Something `viommu setup` provides is not there; the message says what to run."""


def cache_root() -> Path:
    override = os.environ.get("VIOMMU_CACHE")
    if override:
        root = Path(override)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "viommu"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def progress(message: str) -> None:
    """One line per step of a long set-up, as `viommu setup` prints them."""
    print(f"==> {message}", flush=True)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the cache's lock `name` (an flock): several processes fetching or building the
    same thing at once (pytest-xdist workers, two checkouts) do it once, one after the
    other, and the later ones find it done."""
    with open(cache_dir("locks") / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
