"""The backend's QMP control server, served by an in-process Backend: through qemu.qmp as
tools use it, and on the raw wire for protocol details."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from viommu.backend.backend import Backend, BackendOptions
from viommu.events.smmuv3 import EventId

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
    ({"type": "C_BAD_STE", "sid": 7}, "sid 7"),
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
