"""The pytest plugin without a VM: it loads in every pytest run where viommu is installed, so
it must never break one. Tests that use none of its fixtures run as before when viommu is
not set up (or not importable), and those that do fail with one line saying what to do.
And the results it writes for kernel CI: KTAP that a TAP parser (tap.py) counts right."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tap.parser import Parser

from viommu.cli import main as cli
from viommu.testing.guest_record import GuestRecord, artifact_name
from viommu.testing.outcomes import Outcome
from viommu.testing.reproduce import VmChoice
from viommu.vm import hotplug

pytest_plugins = ["pytester"]

PLAIN_AND_GUEST_TESTS = '''
def test_plain_passes():
    assert True


def test_plain_fails():
    assert 1 == 2


def test_with_a_guest(guest):
    pass


def test_with_inject(inject):
    pass
'''

OUTCOMES = '''
import pytest


@pytest.fixture
def broken():
    raise RuntimeError("a fixture that breaks")


@pytest.fixture
def breaks_after():
    yield
    raise RuntimeError("teardown breaks")


def test_passes():
    pass


def test_fails():
    assert 6 * 7 == 43, "the answer # is wrong"


@pytest.mark.skip(reason="no PRI endpoint here")
def test_skipped():
    pass


@pytest.mark.xfail(reason="known driver bug")
def test_expected_failure():
    assert False


@pytest.mark.xfail(reason="fixed meanwhile")
def test_unexpected_pass():
    pass


def test_setup_error(broken):
    pass


def test_teardown_error(breaks_after):
    pass


@pytest.mark.parametrize("name", ["a#b", "c d"])
def test_odd_names(name):
    pass
'''


@pytest.fixture
def not_set_up(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed viommu whose `viommu setup` never ran: an empty cache."""
    cache = pytester.path / "empty-cache"
    monkeypatch.setenv("VIOMMU_CACHE", str(cache))
    for variable in ("VIOMMU_QEMU", "VIOMMU_ARCH", "VIOMMU_KERNEL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # summary lines whole
    return cache


def test_importing_the_plugin_imports_nothing_heavy() -> None:
    code = ("import sys, viommu.testing.pytest_plugin; print(' '.join(sorted(m for m in "
            "sys.modules if m.split('.')[0] in ('viommu', 'libfdt', 'qemu', 'pexpect', "
            "'pyroute2', 'psutil', 'rich'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    heavy = [m for m in loaded if not m.startswith(("viommu.testing", "viommu.cli.inject"))]
    assert heavy == ["viommu", "viommu.cli"], heavy


def test_without_setup_plain_tests_run_and_guest_tests_fail_with_one_line(
        pytester: pytest.Pytester, not_set_up: Path) -> None:
    pytester.makepyfile(test_mixed=PLAIN_AND_GUEST_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=2)
    # Each error is that one line, and the short summary starts with what to run.
    errors = [line for line in result.outlines if line.startswith("viommu is not set up")]
    assert len(errors) == 2 and all("no qemu-system-x86_64" in line for line in errors)
    result.stdout.fnmatch_lines(["ERROR *::test_with_a_guest - Failed: viommu is not set up: "
                                 "no qemu-system-x86_64: run `viommu setup*"])
    assert "Traceback" not in result.stdout.str()
    assert not [p for p in not_set_up.rglob("*") if p.is_file()]  # nothing was fetched


def test_a_viommu_that_cannot_be_imported_fails_only_the_guest_tests(
        pytester: pytest.Pytester, not_set_up: Path) -> None:
    pytester.makeconftest("import sys\nsys.modules['viommu.vm.machine'] = None\n")
    pytester.makepyfile(test_mixed=PLAIN_AND_GUEST_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=2)
    result.stdout.fnmatch_lines(["*viommu is installed but cannot be imported*reinstall it*"])


def ktap_results(text: str) -> dict[str, int]:
    counts = {"ok": 0, "not ok": 0, "skip": 0}
    for line in Parser().parse_text(text):
        if line.category == "test":
            counts["skip" if line.skip else "ok" if line.ok else "not ok"] += 1
    return counts


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_ktap_output_counts_as_pytest_does(pytester: pytest.Pytester, not_set_up: Path,
                                           workers: list[str]) -> None:
    pytester.makepyfile(test_outcomes=OUTCOMES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--viommu-ktap",
                                           "out/results.ktap", *workers)
    # pytest counts the test whose teardown failed as passed and as an error; KTAP has one
    # result per test: that one is not ok.
    result.assert_outcomes(passed=4, failed=1, skipped=1, xfailed=1, xpassed=1, errors=2)
    text = (pytester.path / "out" / "results.ktap").read_text()
    lines = text.splitlines()
    assert lines[0] == "KTAP version 1" and lines[1].startswith("# viommu 0.1.0: x86_64, ")
    assert "1..9" in lines
    # 3 passed, the xfail and the xpass are ok, the skip ok with SKIP, the rest not ok
    assert ktap_results(text) == {"ok": 5, "not ok": 3, "skip": 1}
    assert lines[-1] == "# Totals: pass:3 fail:1 xfail:1 xpass:1 skip:1 error:2"
    by_name = {line.split(" ", 3)[2] if line.startswith("ok") else line.split(" ", 4)[3]: line
               for line in lines if line.startswith(("ok ", "not ok "))}
    assert by_name["test_outcomes.py::test_skipped"].endswith("# SKIP no PRI endpoint here")
    assert by_name["test_outcomes.py::test_setup_error"].endswith(
        "# ERROR RuntimeError: a fixture that breaks")
    assert "# ERROR teardown: RuntimeError: teardown breaks" in by_name[
        "test_outcomes.py::test_teardown_error"]
    assert by_name["test_outcomes.py::test_expected_failure"].endswith("# XFAIL known driver bug")
    assert "test_outcomes.py::test_odd_names[a_b]" in by_name  # no '#' in a KTAP name
    failing = lines.index(by_name["test_outcomes.py::test_fails"])
    assert lines[failing - 3:failing] == ["# AssertionError: the answer # is wrong",
                                          "# assert (6 * 7) == 43", "# at test_outcomes.py:20"]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_a_file_that_cannot_be_collected_is_one_error_in_ktap(
        pytester: pytest.Pytester, not_set_up: Path, workers: list[str]) -> None:
    pytester.makepyfile(test_fine="def test_fine():\n    pass\n",
                        test_broken="import no_such_module\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--viommu-ktap", "out.ktap",
                                  *workers)
    text = (pytester.path / "out.ktap").read_text()
    # pytest stops before running tests when a file cannot be collected; xdist runs the rest
    assert ktap_results(text)["not ok"] == 1
    assert re.search(r"^not ok \d test_broken.py # ERROR collection failed: "
                     r"ModuleNotFoundError", text, re.M), text


def test_results_dir_has_a_summary_of_every_test(pytester: pytest.Pytester,
                                                 not_set_up: Path) -> None:
    pytester.makepyfile(test_outcomes=OUTCOMES)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--viommu-results", "results")
    summary = json.loads((pytester.path / "results" / "results.json").read_text())
    assert summary["totals"] == {"pass": 3, "fail": 1, "xfail": 1, "xpass": 1, "skip": 1,
                                 "error": 2}
    tests = {t["name"]: t for t in summary["tests"]}
    assert tests["test_outcomes.py::test_fails"]["status"] == "FAIL"
    assert tests["test_outcomes.py::test_setup_error"]["status"] == "ERROR"
    assert tests["test_outcomes.py::test_passes"]["artifacts"] is None  # it used no guest
    assert (pytester.path / "results" / "results.ktap").read_text().startswith("KTAP")


class FakeConsole:
    transcript = "booted\n~ # echo before\n~ # viommu-vfio dma 0000:02:00.0\nfault line\n"


@pytest.fixture
def record(tmp_path: Path) -> GuestRecord:
    """A GuestRecord over a VM's logs, without the VM."""
    workdir = tmp_path / "vm"
    workdir.mkdir()
    (workdir / "qemu.log").write_text("from an earlier test\n")
    (workdir / "backend.log").write_text("")
    machine = SimpleNamespace(console=FakeConsole(), workdir=workdir, accel="tcg",
                              profile=SimpleNamespace(iommu="viommu"))
    vm = VmChoice("/home/me/my profile.toml", "aarch64", "6.12", None,
                  "aarch64, kernel 6.12.9-arm64 (Debian 6.12), QEMU 11.1, TCG")
    offsets = {"qemu.log": len("from an earlier test\n"), "backend.log": 0}
    record = GuestRecord(machine, vm, len("booted\n~ # echo before\n"), None, offsets)
    (workdir / "qemu.log").write_text("from an earlier test\nqemu: during this one\n")
    return record


def test_artifacts_hold_what_happened_during_the_test_and_a_reproducer(
        record: GuestRecord, tmp_path: Path) -> None:
    from viommu.testing.reproduce import Injection

    record.injected += [Injection("C_BAD_CD", 0x100, {"ssid": 1}),
                        Injection("F_TRANSLATION", 0x200, {"address": 0x7000, "access": "write",
                                                           "count": 3, "stag": 5})]
    record.take_snapshot()
    nodeid = "tests/test_x.py::test_y[a/b]"
    directory = tmp_path / "results" / artifact_name(nodeid)
    record.write_artifacts(directory, Outcome(nodeid, "fail", "AssertionError: no line"))
    assert artifact_name(nodeid) == "tests_test_x.py_test_y_a_b"
    assert (directory / "console.log").read_text() == (
        "~ # viommu-vfio dma 0000:02:00.0\nfault line\n")
    assert (directory / "qemu.log").read_text() == "qemu: during this one\n"
    assert (directory / "backend.log").read_text().startswith("(nothing during ")
    assert "no viommu backend" in (directory / "backend-trace.txt").read_text()
    test = json.loads((directory / "test.json").read_text())
    assert (test["result"], test["vm"]["kernel"], test["injected"][0]["event"]) == (
        "fail", "6.12", "C_BAD_CD")

    # reproduce.sh, run with a `viommu` that records its arguments: each line parses as
    # the command line it names, with the test's VM and events.
    calls = tmp_path / "calls"
    fake = tmp_path / "viommu"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {calls}; echo >> {calls}\n')
    fake.chmod(0o755)
    subprocess.run([directory / "reproduce.sh", "again"], check=True, capture_output=True,
                   env={"VIOMMU": str(fake), "PATH": "/usr/bin:/bin"})
    commands = [line.strip("\0").split("\0") for line in calls.read_text().splitlines()]
    assert commands[0] == ["up", "/home/me/my profile.toml", "--name", "again", "--arch",
                           "aarch64", "--kernel", "6.12"]
    assert commands[1] == ["inject", "again", "C_BAD_CD", "--sid", "0x100", "--ssid", "0x1"]
    assert commands[2][:3] == ["inject", "again", "F_TRANSLATION"]
    parsed = cli.build_parser().parse_args(commands[2])
    assert (parsed.sid, parsed.addr, parsed.access, parsed.count) == (0x200, 0x7000, "write", 3)
    assert "not expressible as options: {'stag': 5}" in (directory / "reproduce.sh").read_text()
    for command in commands[:2]:
        cli.build_parser().parse_args(command)  # valid `viommu` command lines


def test_the_report_header_names_the_qemu_and_its_version_or_why_viommu_qemu_is_unusable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from viommu.vm.boot import describe_choice

    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 11.1.3'\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("VIOMMU_QEMU", str(qemu))
    assert describe_choice("default").endswith(f", QEMU 11.1 ({qemu})")
    monkeypatch.setenv("VIOMMU_QEMU", str(tmp_path / "missing"))
    header = describe_choice("default")
    assert f"QEMU unusable (VIOMMU_QEMU={tmp_path / 'missing'} is not an executable" in header


def test_logs_of_a_project_outside_the_checkout_stay_in_that_project(
        tmp_path: Path) -> None:
    import viommu
    from viommu.testing.pytest_plugin import logs_root

    checkout = Path(viommu.__file__).resolve().parents[2]
    project = tmp_path / "my-viommu-tests"
    config = SimpleNamespace(rootpath=project, getoption=lambda name: None)
    assert logs_root(config) == project / "test-logs"
    assert checkout not in logs_root(config).parents
    config.getoption = lambda name: str(tmp_path / "elsewhere")
    assert logs_root(config) == tmp_path / "elsewhere"


def test_events_injected_name_the_endpoint_used_when_the_test_gave_none(
        tmp_path: Path) -> None:
    from viommu.vm.machine import Machine

    class Answering(Machine):
        def backend(self, command: str, **args: object) -> dict:
            return {"delivered": 1}

    machine = Answering("default", workdir=tmp_path, accel="tcg")
    record = GuestRecord(machine, VmChoice("default", "x86_64", "7"), 0, None, {})
    with record.recording_injections():
        machine.inject("C_BAD_STE")  # the `inject` fixture's inject("C_BAD_STE")
    [injection] = record.injected
    assert injection.sid == 0x100 and str(injection) == "C_BAD_STE sid=0x100 {}"
    assert "sid=None" not in dict(record.failure_sections())["events injected"]


# --- hot-plug ports: aarch64's virt takes one hot-plug per port per boot ---------------------

class _PortsVm:
    """What ready_port looks at: the profile's ports, those unplugged since boot, reboot."""

    def __init__(self, replug: bool, ports: int = 3) -> None:
        self.platform = SimpleNamespace(replug=replug)
        self.root_ports, self.unplugged_ports, self.reboots = ports, set(), 0

    def fresh_ports(self) -> list[int]:
        return [p for p in range(self.root_ports) if not hotplug.port_spent(self, p)]

    def reboot(self) -> float:
        self.reboots += 1
        self.unplugged_ports.clear()
        return 0.0


def test_a_spent_port_reboots_the_guest_only_when_nothing_plugged_remains() -> None:
    from viommu.testing import pytest_plugin as plugin

    virt = _PortsVm(replug=False)
    virt.unplugged_ports = {0, 1, 2}
    assert plugin.ready_port(virt, 2) == 2 and virt.reboots == 1  # had its turn: reboot
    assert plugin.ready_port(virt, 2) == 2 and virt.reboots == 1  # fresh again
    virt.unplugged_ports = {0, 1, 2}
    assert plugin.ready_port(virt, None) == 2 and virt.reboots == 2  # none fresh: reboot

    holding = _PortsVm(replug=False)
    holding.unplugged_ports = {1}
    plugin._PLUGGED[holding] = {0}  # a test's endpoint is still in the guest: no reboot
    try:
        assert plugin.ready_port(holding, 1) == 1 and holding.reboots == 0
    finally:
        del plugin._PLUGGED[holding]

    q35 = _PortsVm(replug=True)
    q35.unplugged_ports = {0, 1, 2}
    assert plugin.ready_port(q35, 1) == 1 and plugin.ready_port(q35, None) == 2
    assert q35.reboots == 0  # ports take any number of hot-plugs there
