"""Machine helpers that need no running VM."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from viommu.vm import machine as machine_module
from viommu.vm.machine import GUEST_FAULT_WINDOW_S, Machine


@pytest.mark.parametrize(("last_event_age", "expected_wait"), [
    (None, 0.0), (2.0, GUEST_FAULT_WINDOW_S - 2.0), (GUEST_FAULT_WINDOW_S + 1, 0.0)])
def test_fault_window_waits_until_five_seconds_after_the_last_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, last_event_age: float | None,
        expected_wait: float) -> None:
    vm = Machine("default", workdir=tmp_path, accel="tcg")
    now = time.time()
    trace = [] if last_event_age is None else [{"seq": 1, "time": now - last_event_age}]
    monkeypatch.setattr(vm, "backend", lambda command, **args: {"trace": trace})
    monkeypatch.setattr(machine_module.time, "time", lambda: now)
    slept: list[float] = []
    monkeypatch.setattr(machine_module.time, "sleep", slept.append)
    assert vm.wait_fault_window() == pytest.approx(expected_wait)
    assert sum(slept) == pytest.approx(expected_wait)
