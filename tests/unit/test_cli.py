"""The command line without a VM: parsing, every subcommand's --help, run directories and
stale VMs, errors that say what to do, and the trace cursor the `trace` command follows."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from viommu.backend.backend import Backend
from viommu.cli import endpoints, inject_options, readiness, views
from viommu.cli import main as cli
from viommu.cli.tracing import TraceFollower, format_entry
from viommu.events.smmuv3 import EventId, EventRecord
from viommu.transport.control import CommandError
from viommu.vm import runs

SUBCOMMANDS = ["up", "ls", "down", "console", "inject", "trace", "state", "attach", "detach",
               "shell", "demo", "backend", "setup"]
NAMED = ["down", "console", "trace", "state", "shell"]


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "run"
    monkeypatch.setenv("VIOMMU_RUN_DIR", str(root))
    return root


def fake_vm(name: str, qemu_pid: int, qmp_token: str = "") -> Path:
    directory = runs.run_dir(name)
    directory.mkdir()
    runs.RunState(name=name, profile="default", accel="tcg", qemu_pid=qemu_pid,
                  backend_pid=None, started=0.0, workdir=str(directory),
                  sockets={"qmp": qmp_token or str(directory / "qmp.sock")}).save(directory)
    return directory


@pytest.fixture
def live_vm(tmp_path: Path):
    """A 'QEMU': a process whose command line holds the VM's QMP socket path, as QEMU's does."""
    token = str(runs.run_root() / "alive" / "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    deadline = time.monotonic() + 10
    while not runs.process_alive(proc.pid, token):  # /proc shows argv once exec is done
        assert time.monotonic() < deadline
        time.sleep(0.01)
    directory = fake_vm("alive", proc.pid, token)
    yield directory
    proc.kill()
    proc.wait()


# --- parsing and help ---------------------------------------------------------------------


def test_every_subcommand_has_help_with_examples(capsys: pytest.CaptureFixture) -> None:
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: viommu {name}" in out and "examples:" in out, name


def test_top_level_help_lists_the_subcommands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_inject_help_lists_every_smmuv3_event(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["inject", "--help"])
    out = capsys.readouterr().out
    assert all(e.name in out for e in EventId)


def test_inject_parses_names_in_any_case_and_numbers_in_hex() -> None:
    args = cli.build_parser().parse_args(
        ["inject", "vm", "f_translation", "--sid", "0x100", "--addr", "0x10000", "--access",
         "write", "--class", "TT"])
    assert (args.event, args.sid, args.addr, args.access, args.event_class) == (
        "F_TRANSLATION", 0x100, 0x10000, "write", "TT")


def test_inject_refuses_an_unknown_event(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["inject", "vm", "C_BAD_THING"])
    assert exit_info.value.code == 2
    assert "C_BAD_STE" in capsys.readouterr().err


def test_attach_needs_a_port() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["attach", "vm"])
    args = cli.build_parser().parse_args(["attach", "vm", "--port", "2", "--pri"])
    assert (args.port, args.pri, args.vfio) == (2, True, False)


# --- names, run directories, stale VMs --------------------------------------------------------


@pytest.mark.parametrize("command", NAMED + ["inject", "attach", "detach"])
def test_unknown_vm_name_lists_the_running_ones(command: str, live_vm: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    extra = {"inject": ["C_BAD_STE"], "attach": ["--port", "1"], "detach": ["dma1"]}
    assert cli.main([command, "nope", *extra.get(command, [])]) == 1
    err = capsys.readouterr().err
    assert "no VM named 'nope'" in err and "running: alive" in err


def test_unknown_vm_name_with_none_running_says_how_to_start_one(
        capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["state", "nope"]) == 1
    assert "viommu up default" in capsys.readouterr().err


def test_bad_vm_names_are_refused_before_any_path_is_built(
        capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["down", "../etc"]) == 1
    assert "use 1-32 letters" in capsys.readouterr().err


def test_ls_shows_running_and_stale_vms_and_prune_removes_stale(
        live_vm: Path, capsys: pytest.CaptureFixture) -> None:
    stale = fake_vm("gone", 2**22 + 1)  # above the default pid_max: no such process
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "alive" in out and "running" in out and "stale" in out
    assert cli.main(["ls", "--prune"]) == 0
    assert "stale: removed" in capsys.readouterr().out
    assert not stale.exists() and live_vm.exists()
    assert cli.main(["ls", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["name"], entry["alive"]) == ("alive", True)


def test_using_a_stale_vm_says_so_and_down_cleans_it(capsys: pytest.CaptureFixture) -> None:
    stale = fake_vm("gone", 2**22 + 1)
    assert cli.main(["state", "gone"]) == 1
    assert "stale" in capsys.readouterr().err
    assert cli.main(["down", "gone"]) == 0
    assert not stale.exists()


def test_up_refuses_a_name_that_is_running(live_vm: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["up", "default", "--name", "alive"]) == 1
    assert "viommu down alive" in capsys.readouterr().err


def test_run_root_follows_xdg_runtime_dir_else_a_private_temp_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIOMMU_RUN_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runs.run_root() == tmp_path / "viommu"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    root = runs.run_root()
    assert root.parent == tmp_path / "tmp" and root.stat().st_mode & 0o777 == 0o700


def test_a_process_that_reused_the_pid_is_not_the_vm(live_vm: Path) -> None:
    state = runs.RunState.load(live_vm)
    assert state.alive
    assert not runs.process_alive(state.qemu_pid, "/some/other/qmp.sock")


# --- errors that say what to do -----------------------------------------------------------


def test_too_old_qemu_points_at_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    old = tmp_path / "qemu-system-x86_64"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 8.2.2'\n")
    old.chmod(0o755)
    monkeypatch.setenv("VIOMMU_QEMU", str(old))
    assert cli.main(["up", "default", "--name", "old"]) == 1
    err = capsys.readouterr().err
    assert "is QEMU 8.2" in err and "viommu setup" in err


def test_setup_flag_runs_setup_for_the_vm_it_boots(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(readiness, "ensure", lambda arch, kernels: calls.append((arch, kernels)))
    for argv in (["up", "default", "--setup", "--kernel", "6.12"], ["demo", "--setup"], ["demo"]):
        args = cli.build_parser().parse_args(argv)
        readiness.setup_if_asked(args, getattr(args, "profile", "default"))
    assert calls == [("x86_64", ("6.12",)), ("x86_64", ("7",))]


def test_a_profile_path_is_kept_absolute_and_a_name_stays_a_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert readiness.profile_argument("default") == "default"
    assert readiness.profile_argument("./mine.toml") == str(tmp_path / "mine.toml")
    assert readiness.profile_argument("sub/mine") == str(tmp_path / "sub" / "mine")


def test_unknown_profile_lists_the_known_ones(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["up", "no-such-profile"]) == 1
    assert "known: default" in capsys.readouterr().err


def test_attach_to_a_taken_port_names_the_free_ones() -> None:
    class FakeVm:
        from viommu.vm.profile import load_profile
        profile = load_profile("default")

    state = runs.RunState("vm", "default", "tcg", 1, None, 0.0, "/x",
                          endpoints=[{"name": "dma1", "endpoint_id": 0x200, "port": 1}])
    with pytest.raises(cli.CliError, match=r"taken by ep0; free ports: 2, 3"):
        endpoints.check_port_free(FakeVm(), state, 0)
    with pytest.raises(cli.CliError, match="taken by dma1"):
        endpoints.check_port_free(FakeVm(), state, 1)


# --- trace cursors and tables ---------------------------------------------------------------


@pytest.fixture
def backend(tmp_path: Path) -> Backend:
    return Backend(str(tmp_path / "vu.sock"), None, [0x100])


def test_query_commands_return_what_follows_a_since_cursor(backend: Backend) -> None:
    for _ in range(5):
        backend.relay.submit(EventRecord(EventId.C_BAD_STE, sid=0x100))
    backend.translator.note_dma(0x100, -1, 0x1000, 0x2000, 64, 64)
    trace = backend.control.call("query-events", {"since": 2, "limit": 2})["trace"]
    seqs = [e["seq"] for e in trace]
    assert seqs == [3, 4]  # the oldest after the cursor: a poller misses nothing
    assert [e["seq"] for e in backend.control.call("query-events", {"limit": 2})["trace"]] == [4, 5]
    assert backend.control.call("query-events", {"since": 5})["trace"] == []
    [dma] = backend.control.call("query-translations", {"since": 0})["trace"]
    assert (dma["sid"], dma["pasid"], dma["length"], dma["done"]) == (0x100, None, 64, 64)


def test_trace_limit_past_any_list_size_returns_everything(backend: Backend) -> None:
    for _ in range(3):
        backend.relay.submit(EventRecord(EventId.C_BAD_STE, sid=0x100))
    for args in ({"limit": 2**64}, {"limit": 2**64, "since": 0}):
        assert len(backend.control.call("query-events", args)["trace"]) == 3
    with pytest.raises(CommandError, match="limit must be >= 0"):
        backend.control.call("query-events", {"limit": -1})


def test_follower_reports_only_new_entries_once(backend: Backend) -> None:
    backend.relay.submit(EventRecord(EventId.C_BAD_STE, sid=0x100))

    def call(command: str, **args: object) -> dict:
        return backend.control.call(command, args)

    follower = TraceFollower(call)
    assert follower.poll() == []  # what happened before is not followed
    backend.relay.submit(EventRecord(EventId.F_TRANSLATION, sid=0x100, address=0x5000,
                                     rnw=True))
    [entry] = follower.poll()
    assert entry["kind"] == "fault" and entry["type"] == "F_TRANSLATION"
    assert "F_TRANSLATION sid=0x100" in format_entry(entry)
    assert follower.poll() == []
    assert len(TraceFollower(call, from_start=True).poll()) == 2


def test_table_aligns_columns_and_marks_empty_ones() -> None:
    assert views.table(("a", "bb"), [(1, None), ("long", 2)]).splitlines() == [
        "a     bb", "1     -", "long  2"]
    assert views.table(("a",), []).endswith("(none)")
    wide = "x" * 300  # never wrapped, whatever the terminal; brackets are text, not markup
    assert views.table(("a", "b"), [(wide, "[bold]R[/]")]).splitlines()[1] == (
        f"{wide}  [bold]R[/]")


def test_inject_options_become_inject_event_arguments_and_back(backend: Backend) -> None:
    argv = ["inject", "vm", "F_CD_FETCH", "--sid", "0x100", "--ssid", "1", "--fetch-addr",
            "0x1000", "--count", "2"]
    fields = inject_options.fields_from_args(cli.build_parser().parse_args(argv))
    assert fields == {"ssid": 1, "fetch-addr": 0x1000, "count": 2}
    reply = backend.control.call("inject-event", {"type": "F_CD_FETCH", "sid": 0x100, **fields})
    assert reply["pending"] + reply["delivered"] + reply["lost"] == 2  # the backend takes them
    options, rest = inject_options.options_from_fields(
        {**fields, "privileged": True, "class": "TT", "fetch_addr": 0x2000, "stag": 3})
    again = cli.build_parser().parse_args(["inject", "vm", "F_CD_FETCH", *options])
    assert inject_options.fields_from_args(again) == {
        **fields, "privileged": True, "class": "TT", "fetch-addr": 0x2000}
    assert rest == {"stag": 3}  # no option for it


def test_a_kernel_lacking_an_option_is_refused_in_one_line_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from test_provision import GOOD_CONFIG, build_tree

    tree = build_tree(tmp_path, GOOD_CONFIG.replace("CONFIG_VIRTIO_IOMMU=m\n", ""))
    monkeypatch.setenv("VIOMMU_RUN_DIR", str(tmp_path / "runs"))
    assert cli.main(["up", "default", "--name", "refused", "--kernel", str(tree)]) == 1
    err = capsys.readouterr().err
    assert "lacks what viommu needs: CONFIG_VIRTIO_IOMMU (the guest's virtio-iommu driver)" in err
    errors = [line for line in err.splitlines() if not line.startswith("viommu: note:")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert not (tmp_path / "runs" / "refused" / "state.json").exists()


def test_kconfig_prints_a_fragment_and_checks_a_kernel(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from test_provision import GOOD_CONFIG, build_tree

    assert cli.main(["kconfig", "--feature", "vfio"]) == 0
    fragment = capsys.readouterr().out
    assert "CONFIG_VIRTIO_IOMMU=y" in fragment and "CONFIG_VFIO_PCI=y" in fragment
    assert "CONFIG_VIRTIO_BLK=y" not in fragment  # only the features asked for
    good = build_tree(tmp_path / "good")
    assert cli.main(["kconfig", "--kernel", str(good)]) == 0
    assert "has what viommu needs" in capsys.readouterr().out
    bad = build_tree(tmp_path / "bad", GOOD_CONFIG.replace("CONFIG_ACPI_VIOT=y\n", ""))
    assert cli.main(["kconfig", "--kernel", str(bad)]) == 1
    assert "CONFIG_ACPI_VIOT" in capsys.readouterr().out


# --- a dead backend (issue 14) --------------------------------------------------------------


@pytest.fixture
def watched_backend(live_vm: Path) -> Iterator[int]:
    """A 'backend' of the live VM under the real watcher (viommu.vm.backend_watch), as `viommu
    up` starts one; its pid, recorded in state.json."""
    from viommu.vm import backend_watch

    token = str(live_vm / "control.sock")
    reader, writer = os.pipe()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "viommu.vm.backend_watch", "--record",
         str(live_vm / backend_watch.EXIT_RECORD), "--pid-fd", str(writer), "--",
         sys.executable, "-c", "import time; time.sleep(60)", token], pass_fds=[writer])
    os.close(writer)
    with os.fdopen(reader) as pipe:
        pid = int(pipe.readline())
    state = runs.RunState.load(live_vm)
    state.backend_pid, state.sockets["control"] = pid, token
    state.save(live_vm)
    deadline = time.monotonic() + 10
    while not runs.process_alive(pid, token):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    watcher.wait(10)


def test_ls_shows_a_killed_backend_as_dead_within_a_second_and_how_it_died(
        live_vm: Path, watched_backend: int, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["ls"]) == 0
    assert re.search(r"^alive\s.*\srunning$", capsys.readouterr().out, re.M)
    os.kill(watched_backend, signal.SIGKILL)
    killed = time.monotonic()
    while True:
        assert cli.main(["ls"]) == 0
        out = capsys.readouterr().out
        if "backend dead" in out:
            break
        assert time.monotonic() - killed < 1.0, out
        time.sleep(0.05)
    assert time.monotonic() - killed < 1.0
    assert re.search(r"^alive\s.*\sbackend dead \(killed by SIGKILL at \d\d:\d\d:\d\d\)$", out,
                     re.M), out
    assert "`viommu down alive` ends alive" in out
    assert cli.main(["ls", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["backend_alive"] is False and entry["backend_exit"]["how"] == "killed by SIGKILL"


def test_ls_waits_for_the_watchers_record_of_a_backend_that_has_just_died(
        live_vm: Path, capsys: pytest.CaptureFixture) -> None:
    """The moment between a backend's death and its watcher's record: ls reports how it died,
    not 'how unrecorded' (a SIGKILLed process leaves /proc before its parent reaps it)."""
    from viommu.vm import backend_watch

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = runs.RunState.load(live_vm)
    state.backend_pid = gone.pid
    state.save(live_vm)
    late = threading.Timer(0.2, lambda: backend_watch._write_record(
        str(live_vm / backend_watch.EXIT_RECORD), gone.pid, -signal.SIGKILL))
    late.start()
    try:
        assert cli.main(["ls"]) == 0
    finally:
        late.join()
    assert re.search(r"^alive\s.*\sbackend dead \(killed by SIGKILL at \d\d:\d\d:\d\d\)$",
                     capsys.readouterr().out, re.M)


@pytest.mark.parametrize("command", [["state"], ["inject", "C_BAD_STE"], ["trace"],
                                     ["attach", "--port", "1"]])
def test_a_command_needing_a_dead_backend_says_so_in_one_line_with_what_to_do(
        live_vm: Path, watched_backend: int, command: list[str],
        capsys: pytest.CaptureFixture) -> None:
    os.kill(watched_backend, signal.SIGKILL)
    assert cli.main([command[0], "alive", *command[1:]]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"alive's backend (pid {watched_backend}) died (killed by SIGKILL at " in err
    assert "`viommu down alive` ends the VM" in err


def test_down_ends_a_vm_whose_backend_died_by_pid_and_removes_its_run_directory(
        live_vm: Path, watched_backend: int, capsys: pytest.CaptureFixture) -> None:
    qemu_pid = runs.RunState.load(live_vm).qemu_pid
    os.kill(watched_backend, signal.SIGKILL)
    started = time.monotonic()
    assert cli.main(["down", "alive"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1].startswith("alive is down"), out
    assert "Traceback" not in err
    assert not runs.process_alive(qemu_pid, str(live_vm / "qmp.sock"))
    assert not live_vm.exists()
    assert time.monotonic() - started < 10


def test_ls_names_the_qemu_binary_and_version_of_each_vm(
        live_vm: Path, capsys: pytest.CaptureFixture) -> None:
    state = runs.RunState.load(live_vm)
    state.qemu = "/opt/qemu/bin/qemu-system-x86_64 (QEMU 11.1)"
    state.save(live_vm)
    assert cli.main(["ls"]) == 0
    assert "/opt/qemu/bin/qemu-system-x86_64 (QEMU 11.1): alive" in capsys.readouterr().out


# --- signals (issue 14) ---------------------------------------------------------------------


def test_ctrl_c_prints_one_line_and_no_traceback(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_ls", interrupted)
    assert cli.main(["ls"]) == 130
    assert capsys.readouterr().err.strip() == "viommu ls: interrupted (Ctrl-C)"


def test_main_leaves_the_signal_handlers_as_it_found_them() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    cli.main(["ls"])
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_clean_up_under_deferred_signals_finishes_before_sighup_and_ctrl_c_act() -> None:
    from viommu.cli.main import Terminated, _terminated
    from viommu.vm.signals import deferred_signals

    previous = signal.signal(signal.SIGHUP, _terminated)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGHUP)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handlers would run here, in the middle of clean-up
                done.append("cleaned up")
        assert done == ["cleaned up"]
        assert isinstance(raised.value, (Terminated, KeyboardInterrupt))
        assert signal.getsignal(signal.SIGHUP) is _terminated  # as before the block
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_viommu_qemu_naming_a_missing_file_is_an_error_not_the_bundled_qemu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-qemu"
    monkeypatch.setenv("VIOMMU_QEMU", str(missing))
    assert cli.main(["up", "default", "--name", "missing"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("viommu up: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"VIOMMU_QEMU={missing} is not an executable file" in err and "unset it" in err
    assert not runs.run_dir("missing").exists()
