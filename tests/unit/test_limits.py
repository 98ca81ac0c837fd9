"""Limits instead of exhaustion: past each bound the guest gets S_NOMEM (or the control API
an error) and the backend's memory stays flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_requests import EP, EP2, Harness, attach, detach, map_, unmap
from viommu.device.virtio_iommu import DeviceConfig, ResourceLimit, VirtioIommuDevice
from viommu.uapi import Status

TESTS = Path(__file__).resolve().parents[1]
RSS_BOUND_MIB = 64


def test_attach_past_the_domain_limit_is_nomem() -> None:
    h = Harness(max_domains=1)
    assert h.status(attach(1, EP)) == Status.S_OK
    assert h.status(attach(2, EP2)) == Status.S_NOMEM
    assert h.status(attach(1, EP2)) == Status.S_OK  # joining an existing domain is fine


def test_map_past_the_per_domain_limit_is_nomem_and_unmap_frees_room() -> None:
    h = Harness(max_mappings_per_domain=2)
    h.status(attach(1, EP))
    assert [h.status(map_(1, i * 0x1000, i * 0x1000 + 0xFFF, 0)) for i in range(3)] == [
        Status.S_OK, Status.S_OK, Status.S_NOMEM]
    assert h.status(unmap(1, 0, 0xFFF)) == Status.S_OK
    assert h.status(map_(1, 0x5000, 0x5FFF, 0)) == Status.S_OK


def test_map_past_the_total_limit_is_nomem_until_a_domain_goes() -> None:
    h = Harness(max_mappings=1)
    h.status(attach(1, EP))
    h.status(attach(2, EP2))
    assert h.status(map_(1, 0x1000, 0x1FFF, 0)) == Status.S_OK
    assert h.status(map_(2, 0x1000, 0x1FFF, 0)) == Status.S_NOMEM
    h.status(detach(1, EP))  # the domain and its mapping cease to exist
    assert h.status(map_(2, 0x1000, 0x1FFF, 0)) == Status.S_OK


def test_overlap_is_still_inval_at_the_limit() -> None:
    h = Harness(max_mappings_per_domain=1)
    h.status(attach(1, EP))
    h.status(map_(1, 0x1000, 0x1FFF, 0))
    assert h.status(map_(1, 0x1000, 0x1FFF, 0)) == Status.S_INVAL


def test_endpoints_past_the_limit_are_refused() -> None:
    device = VirtioIommuDevice([EP], DeviceConfig(max_endpoints=1))
    with pytest.raises(ResourceLimit):
        device.add_endpoint(EP2)


def test_a_million_maps_keep_the_backend_under_its_memory_bound() -> None:
    result = subprocess.run([sys.executable, str(TESTS / "map_a_million.py"), "1000000"],
                            capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(TESTS)})
    report = json.loads(result.stdout)
    limit = DeviceConfig().max_mappings_per_domain
    assert report["statuses"] == {"S_OK": limit, "S_NOMEM": 1_000_000 - limit}
    assert report["mappings"] == limit
    assert report["maxrss_kib"] < RSS_BOUND_MIB * 1024
