"""The backend's QMP control server, served by an in-process Backend: through qemu.qmp as
tools use it, and on the raw wire for protocol details."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from viommu.backend.backend import Backend, BackendOptions
from viommu.events.relay import HOST_EVENT_LOG_BURST, EventRelay
from viommu.events.smmuv3 import EventId, EventRecord, PageHint

# --- helpers ---------------------------------------------------------------------------------


class RawQmp:
    """A QMP client on a plain socket: sends bytes, reads one JSON line per reply."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()

    def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.sock.sendall(data)

    def recv(self) -> dict:
        line = self.file.readline()
        assert line, "the server closed the connection"
        return json.loads(line)

    def execute(self, name: str, **extra) -> dict:
        self.send({"execute": name, **extra})
        return self.recv()

    def negotiate(self) -> None:
        assert self.execute("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def start_backend():
    """Starts in-process backends (sockets in a short /tmp directory); stops them after."""
    started = []

    def start(**kwargs) -> Backend:
        workdir = tempfile.mkdtemp(dir="/tmp", prefix="viommu-ctl-")
        backend = Backend(os.path.join(workdir, "vu.sock"), os.path.join(workdir, "qmp.sock"),
                          [256], options=BackendOptions(**kwargs))
        started.append((backend, workdir))
        backend.start_in_thread()
        return backend

    yield start
    for backend, workdir in started:
        backend.stop()
        backend.join(5)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def backend(start_backend) -> Backend:
    return start_backend()


@pytest.fixture
def qmp(backend):
    client = QEMUMonitorProtocol(backend.control_path)
    client.connect()
    yield client
    client.close()


@pytest.fixture
def raw(backend):
    client = RawQmp(backend.control_path)
    yield client
    client.close()


def inject(qmp, **args) -> dict:
    return qmp.cmd_raw("inject-event", args)


def error_desc(response: dict) -> str:
    assert "error" in response, response
    return response["error"]["desc"]


# --- the QMP protocol --------------------------------------------------------------------------


def test_greeting_has_qemu_version_triple_and_capabilities_list(raw) -> None:
    greeting = raw.greeting["QMP"]
    version = greeting["version"]["qemu"]
    assert sorted(version) == ["major", "micro", "minor"]
    assert all(isinstance(v, int) for v in version.values())
    assert isinstance(greeting["capabilities"], list)


def test_command_before_qmp_capabilities_is_command_not_found(raw) -> None:
    error = raw.execute("query-commands")["error"]
    assert error["class"] == "CommandNotFound" and "capabilities" in error["desc"]


def test_id_is_echoed_in_a_return(raw) -> None:
    raw.negotiate()
    assert raw.execute("query-commands", id="r-1")["id"] == "r-1"


def test_id_is_echoed_in_an_error(raw) -> None:
    raw.negotiate()
    assert raw.execute("no-such-command", id={"n": 7})["id"] == {"n": 7}


def test_unknown_command_is_command_not_found_naming_it(qmp) -> None:
    error = qmp.cmd_raw("no-such-command")["error"]
    assert error["class"] == "CommandNotFound" and "no-such-command" in error["desc"]


def test_malformed_json_gets_an_error_and_the_next_command_is_served(raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": oops}\n')
    assert "error" in raw.recv()
    assert "return" in raw.execute("query-commands")


def test_command_split_inside_a_string_across_two_reads_is_served(raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "query-comm')
    time.sleep(0.5)  # let the server read the first half on its own
    raw.send(b'ands", "id": 1}\n')
    assert "return" in raw.recv()


def test_query_commands_lists_the_backend_commands(qmp) -> None:
    names = {c["name"] for c in qmp.cmd_raw("query-commands")["return"]}
    assert {"inject-event", "query-endpoints", "query-domains", "query-events"} <= names


# --- inject-event arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("args,named", [
    ({"type": "C_BAD_STE"}, "'sid'"),
    ({"type": "C_BAD_STE", "sid": 256, "colour": "red"}, "'colour'"),
    ({"type": "C_BAD_STE", "sid": "256"}, "'sid'"),
    ({"type": "C_BAD_STE", "sid": True}, "'sid'"),
    ({"type": "C_BAD_STE", "sid": 7}, "sid 0x7"),
    ({"type": "C_BAD_STE", "sid": 256, "count": 0}, "count"),
], ids=["missing-sid", "unexpected-parameter", "sid-as-string", "sid-as-bool", "unknown-sid",
        "count-0"])
def test_inject_event_with_a_bad_argument_is_an_error_naming_it(qmp, args, named) -> None:
    assert named in error_desc(inject(qmp, **args))


@pytest.mark.parametrize("event_type", [
    "C_NO_SUCH_EVENT",
    "0x77",
    0x77,
])
def test_inject_event_of_unknown_type_lists_the_known_names(qmp, event_type) -> None:
    desc = error_desc(inject(qmp, type=event_type, sid=256))
    assert all(name in desc for name in EventId.__members__)


def test_rejected_inject_event_injects_nothing(backend, qmp) -> None:
    inject(qmp, type="C_BAD_STE", sid=256, count=0)
    assert backend.relay.injected == 0


# --- event accounting ----------------------------------------------------------------------------


def test_inject_event_without_a_guest_leaves_the_event_pending(qmp) -> None:
    assert inject(qmp, type="C_BAD_STE", sid=256)["return"]["pending"] == 1


def test_query_events_counters_account_for_every_injected_event(qmp) -> None:
    inject(qmp, type="C_BAD_STE", sid=256, count=3)
    inject(qmp, type="C_BAD_STREAMID", sid=256)
    c = qmp.cmd_raw("query-events")["return"]
    assert c["injected"] == 4
    assert c["injected"] == (c["delivered"] + c["pending"] + c["lost"] + c["not_forwarded"]
                             + c["drained"])


def test_host_only_event_is_not_forwarded(qmp) -> None:
    result = inject(qmp, type="C_BAD_STREAMID", sid=256)["return"]
    assert (result["not_forwarded"], result["pending"]) == (1, 0)


@pytest.fixture
def small_fifo_qmp(start_backend):
    client = QEMUMonitorProtocol(start_backend(event_capacity=8).control_path)
    client.connect()
    yield client
    client.close()


def test_injecting_past_the_fifo_capacity_counts_the_overflow_lost(small_fifo_qmp) -> None:
    result = inject(small_fifo_qmp, type="C_BAD_STE", sid=256, count=20)["return"]
    assert (result["pending"], result["lost"]) == (8, 12)


def test_query_events_reports_the_fifo_overflow_lost(small_fifo_qmp) -> None:
    inject(small_fifo_qmp, type="C_BAD_STE", sid=256, count=20)
    assert small_fifo_qmp.cmd_raw("query-events")["return"]["lost"] == 12


# --- queries and asynchronous events --------------------------------------------------------------


def test_query_endpoints_reports_unattached_endpoint_blocked(qmp) -> None:
    endpoints = qmp.cmd_raw("query-endpoints")["return"]
    assert [(e["endpoint"], e["mode"]) for e in endpoints] == [(256, "blocked")]


def test_client_receives_the_device_reset_event(backend, qmp) -> None:
    backend.loop.loop.call_soon_threadsafe(backend.vhost.reset, "test")
    event = qmp.pull_event(wait=5.0)
    assert (event["event"], event["data"]["reason"]) == ("DEVICE_RESET", "test")


def test_memory_read_before_the_vm_sent_its_memory_table_is_an_error(qmp) -> None:
    response = qmp.cmd_raw("memory-read", {"gpa": 0, "size": 8})
    assert "no guest memory yet" in error_desc(response)


def test_memory_write_with_bad_hex_is_an_error_naming_the_format(qmp) -> None:
    response = qmp.cmd_raw("memory-write", {"gpa": 0, "data": "xyz"})
    assert "hex" in error_desc(response)


def test_add_endpoint_makes_it_known(qmp) -> None:
    assert qmp.cmd_raw("add-endpoint", {"endpoint": 0x200})["return"]["mode"] == "blocked"
    endpoints = qmp.cmd_raw("query-endpoints")["return"]
    assert [e["endpoint"] for e in endpoints] == [0x100, 0x200]


@pytest.mark.parametrize("document", [
    b'{"execute": "query-commands", "arguments": ' + b"[" * 1200 + b"]" * 1200 + b"}\n",
    b'{"execute": "query-commands", "id": ' + b"9" * 4301 + b"}\n",
], ids=["nested-1200-deep", "id-of-4301-digits"])
def test_json_past_the_parsers_limits_gets_an_error_and_the_connection_serves_on(
        raw, document) -> None:
    raw.negotiate()
    raw.send(document)
    assert raw.recv()["error"]["desc"].startswith("JSON parse error")
    assert "return" in raw.execute("query-commands")


# --- robustness and event fidelity (issue 14) ------------------------------------------------


def test_a_bare_json_string_gets_an_error_reply_instead_of_a_hang(raw) -> None:
    raw.negotiate()
    raw.send(b'"query-status"\n')
    assert raw.recv()["error"]["desc"] == "QMP input must be a JSON object"
    assert "return" in raw.execute("query-commands")


def test_stream_ids_in_errors_are_hex_as_in_every_other_view(qmp) -> None:
    desc = error_desc(inject(qmp, type="C_BAD_STE", sid=0xBEEF))
    assert desc == "sid 0xbeef is not an endpoint of this vIOMMU (known: 0x100)"


def test_an_injected_e_page_request_carries_its_page_address_and_access(backend, qmp) -> None:
    reply = inject(qmp, type="E_PAGE_REQUEST", sid=256, address=0xDEAD_B000, access="write",
                   span=2)["return"]
    assert reply["guest_line"] == "page fault from EP 256 at 0xdeadb000 [W]"
    event = backend.relay.trace[-1].event
    assert (event.address, event.span, event.page_hints) == (0xDEAD_B000, 2, PageHint.UW)
    privileged = inject(qmp, type="E_PAGE_REQUEST", sid=256, address=0x7000, access="exec",
                        privileged=True)["return"]
    assert privileged["guest_line"] == "page fault from EP 256 at 0x7000 [X]"
    assert backend.relay.trace[-1].event.page_hints == PageHint.PX
    assert "page address" in error_desc(inject(qmp, type="E_PAGE_REQUEST", sid=256,
                                               address=0x7001))
    assert "carry no ipa" in error_desc(inject(qmp, type="E_PAGE_REQUEST", sid=256, ipa=0x1000))


def test_a_fault_for_an_endpoint_the_guest_does_not_have_is_refused_unless_forced(qmp) -> None:
    qmp.cmd_raw("add-endpoint", {"endpoint": 0x300})
    desc = error_desc(inject(qmp, type="C_BAD_STE", sid=0x300))
    assert "declared with add-endpoint" in desc and "force" in desc
    assert qmp.cmd_raw("query-events")["return"]["injected"] == 0
    reply = inject(qmp, type="C_BAD_STE", sid=0x300, force=True, count=2)["return"]
    assert reply["pending"] == 2 and "declared with add-endpoint" in reply["note"]
    counters = qmp.cmd_raw("query-events")["return"]
    assert (counters["injected"], counters["to_absent_endpoints"]) == (2, 2)
    assert inject(qmp, type="C_BAD_STE", sid=256)["return"]["note"] is None  # on the command line
    assert qmp.cmd_raw("query-events")["return"]["to_absent_endpoints"] == 2


def test_a_served_endpoint_nothing_is_plugged_into_does_not_take_faults_unforced(
        backend, qmp) -> None:
    socket_path = os.path.join(os.path.dirname(backend.control_path), "ep.sock")
    qmp.cmd_raw("endpoint-create", {"endpoint": 0x200, "socket": socket_path})
    assert "no device is plugged" in error_desc(inject(qmp, type="C_BAD_CD", sid=0x200))
    qmp.cmd_raw("endpoint-delete", {"endpoint": 0x200})  # as after a hot-unplug
    assert "no device is plugged" in error_desc(inject(qmp, type="C_BAD_CD", sid=0x200))


def test_host_side_events_reach_the_log_as_warnings_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    relay = EventRelay()
    with caplog.at_level(logging.WARNING, logger="viommu.events.relay"):
        relay.submit(EventRecord(event_id=EventId.F_STE_FETCH, sid=0xBEEF, fetch_addr=0x1000))
        for _ in range(30):
            relay.submit(EventRecord(event_id=EventId.C_BAD_STREAMID, sid=0x100))
        relay.submit_burst(EventRecord(event_id=EventId.F_TLB_CONFLICT, sid=0x100), 1000)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines[0].startswith("F_STE_FETCH for stream 0xbeef (event #1)")
    assert "not forwarded to the guest" in lines[0]
    assert len(lines) == HOST_EVENT_LOG_BURST  # 1031 events, one window
    assert relay.not_forwarded == 1031


# --- a client that never reads (issue 14, defect 2) ------------------------------------------


def backend_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, str]:
    directory = tempfile.mkdtemp(dir="/tmp", prefix="viommu-ctl-")
    control = os.path.join(directory, "ctl.sock")
    proc = subprocess.Popen([sys.executable, "-m", "viommu.backend", "--socket",
                             os.path.join(directory, "vu.sock"), "--control", control,
                             "--endpoint", "0x100", "--persist"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(control):
        assert time.monotonic() < deadline and proc.poll() is None, "the backend did not start"
        time.sleep(0.05)
    return proc, control


def round_trips(path: str, count: int = 200) -> float:
    """The median seconds of a query-status round trip on a connection of its own."""
    client = RawQmp(path)
    client.negotiate()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        assert "return" in client.execute("query-status")
        samples.append(time.perf_counter() - started)
    client.close()
    return statistics.median(samples)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_client_that_never_reads_its_replies_does_not_slow_the_others(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    proc, path = backend_process(tmp_path_factory)
    try:
        filler = RawQmp(path)
        filler.negotiate()
        assert filler.execute("inject-event", arguments={
            "type": "C_BAD_STE", "sid": 256, "count": 4096})["return"]["count"] == 4096
        filler.close()
        alone = round_trips(path)
        rss_before = rss_kib(proc.pid)
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog.connect(path)
        hog.setblocking(False)
        request = b'{"execute": "query-events", "arguments": {"limit": 100000}}\n'
        hog.send(b'{"execute": "qmp_capabilities"}\n')
        sent = 0
        for _ in range(300):  # as many as the socket takes: the backend reads on or not
            try:
                hog.send(request)
                sent += 1
            except BlockingIOError:
                break
        time.sleep(1)  # whatever the backend does for them, it has started doing
        beside = round_trips(path)
        grown = rss_kib(proc.pid) - rss_before
        hog.close()
    finally:
        proc.kill()
        proc.wait()
    assert sent >= 100
    # (before the fix, the other client waited 5 s and more: seconds of replies were built)
    assert beside / alone < 10, f"round trip {alone * 1e3:.2f} ms alone, {beside * 1e3:.2f} ms " \
                               "beside a client that never reads"
    assert grown < 40 * 1024, f"the backend grew {grown} KiB for a client that never reads"


def test_endpoint_create_replaces_only_a_stale_socket_of_ours(backend, qmp) -> None:
    directory = os.path.dirname(backend.control_path)
    regular = os.path.join(directory, "notes.txt")
    with open(regular, "w") as f:
        f.write("keep me")
    desc = error_desc(qmp.cmd_raw("endpoint-create", {"endpoint": 0x200, "socket": regular}))
    assert "is not a socket; refusing to replace it" in desc
    assert open(regular).read() == "keep me"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy_path = os.path.join(directory, "busy.sock")
    busy.bind(busy_path)
    busy.listen(1)
    desc = error_desc(qmp.cmd_raw("endpoint-create", {"endpoint": 0x200, "socket": busy_path}))
    assert "in use" in desc
    busy.close()  # the file stays: a stale socket now, which endpoint-create may replace
    reply = qmp.cmd_raw("endpoint-create", {"endpoint": 0x200, "socket": busy_path})["return"]
    assert reply["socket"] == busy_path
    qmp.cmd_raw("endpoint-delete", {"endpoint": 0x200})
