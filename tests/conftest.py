"""Test layout: tests/unit (no VM, fast) and tests/e2e (a real guest under QEMU, shared by
the session through the viommu pytest plugin's `guest` fixture)."""

import sys
from pathlib import Path

import pytest

# Test helpers (virtio_driver, pagetables) live beside the tests, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Unit tests first: they fail fast, before a guest boots.
    items.sort(key=lambda item: "e2e" in item.nodeid.split("/"))
    for item in items:
        if "/e2e/" in f"/{item.nodeid}":
            item.add_marker(pytest.mark.e2e)
