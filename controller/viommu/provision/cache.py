"""The per-user cache: $VIOMMU_CACHE, else $XDG_CACHE_HOME/viommu, else ~/.cache/viommu
(XDG Base Directory Specification). Downloads and builds live here, keyed so that several
QEMUs, kernels and architectures sit side by side."""

from __future__ import annotations

import os
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
