"""Fuzz the QMP control server (viommu.transport.control.ControlServer) with the real Backend's
commands registered, fed as `_serve` feeds it: bytes -> incremental UTF-8 decode
(errors="replace") -> `_drain` -> `_execute`, replies to a fake client that serialises them
exactly as `_Client.send` does.

Two kinds of input, chosen by the first byte:
- raw: the rest is the byte stream, cut into chunks as the first byte says;
- structured: N requests built from the registered commands and their declared arguments
  (right and wrong types, edge integers, unknown arguments, odd ids), serialised as JSON
  with assorted separators, possibly after qmp_capabilities, then chunked.

The backend has guest memory (a fake vhost-user connection with one 64 KiB region and the
engine built on it) so memory, stage-2 and attach-table commands run their real paths, and
an asyncio loop that is never run (commands that schedule or listen only register).
`endpoint-create` sockets are sandboxed: the fuzzer's path is mapped to a file in a private
temporary directory (the real one would bind and unlink any path it names, as root here).

Properties: nothing raises out of `_drain`; every complete document gets exactly one reply
(structured: exactly N replies, in order, echoing each id); every reply is {"return": ...}
or {"error": {"class": str, "desc": str}} (+ "id") and serialises as JSON; no reply is the
server's catch-all "internal error" (a handler raised something it did not mean to); one
request does bounded work (at most WORK_BUDGET relay submissions, under SLOW_REQUEST s of
the loop); afterwards the backend still works: a device reset, a new memory table and every
query succeed; no fd leaks.
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time

import atheris
import fuzzutil
from fuzzutil import check, interesting, pick

with fuzzutil.instrumented(__name__):
    from viommu._dataplane import GuestMemory
    from viommu.backend import endpoint_servers as servers_module
    from viommu.backend.backend import Backend, BackendOptions
    from viommu.events.page_requests import POLICIES
    from viommu.transport import control
    from viommu.transport.vfio_user.server import EndpointServer

GPA = 0x4000_0000
UADDR = 0x7F00_0000_0000
MEM_SIZE = 0x10000
ENDPOINTS = (256, 512)
# Bounded work per request: relay submissions one request may make (a burst of 1e6 events
# once took ~8 s of the only loop), and wall time (generous: CI machines are slow).
WORK_BUDGET = 100_000
SLOW_REQUEST = 2.0

# Bugs this harness found are fixed (tests/fuzz/regressions/fuzz_control/); none waived.
KNOWN_BUGS: dict[str, str] = {}

_sandbox: str | None = None


def sandbox() -> str:
    global _sandbox
    if _sandbox is None:
        _sandbox = tempfile.mkdtemp(prefix="viommu-fuzz-control-")
        atexit.register(shutil.rmtree, _sandbox, True)
    return _sandbox


class SandboxedEndpointServer(EndpointServer):
    """The real server, bound at a sandbox path derived from the one asked for (refusing
    what bind() would refuse, as bind() would)."""

    def listen(self, loop) -> None:
        wanted = os.fsencode(self.socket_path)  # UnicodeEncodeError, as bind() raises it
        if b"\0" in wanted:
            raise ValueError("embedded null byte")
        if len(wanted) >= 108:
            raise OSError(36, "AF_UNIX path too long")
        digest = hashlib.sha1(wanted).hexdigest()[:16]
        self.socket_path = os.path.join(sandbox(), f"ep-{digest}.sock")
        super().listen(loop)


@contextlib.contextmanager
def sandboxed():
    """Patch viommu.backend.endpoint_servers for one input only (the replay tests share a
    process with the other tests): endpoint sockets in the sandbox."""
    saved = servers_module.EndpointServer
    servers_module.EndpointServer = SandboxedEndpointServer
    try:
        yield
    finally:
        servers_module.EndpointServer = saved


class FakeClient:
    """`_Client` without a transport: what it sends is kept, serialised as _Client does."""

    def __init__(self) -> None:
        self.negotiated = False
        self.sent: list[dict] = []

    def send(self, msg: dict) -> None:
        json.dumps(msg).encode()  # _Client.send would raise here on anything unserialisable
        self.sent.append(msg)

    @property
    def replies(self) -> list[dict]:
        return [msg for msg in self.sent if "event" not in msg]


def make_backend(policy: str) -> tuple[Backend, asyncio.AbstractEventLoop, GuestMemory]:
    d = sandbox()
    b = Backend(os.path.join(d, "vu.sock"), os.path.join(d, "ctl.sock"), ENDPOINTS,
                options=BackendOptions(page_request_policy=policy))
    loop = asyncio.new_event_loop()
    b.loop.bind(loop)
    b._stopped = asyncio.Event()
    mem = GuestMemory()
    mem.add_region(GPA, MEM_SIZE, UADDR, bytearray(MEM_SIZE))
    b.vhost.memory_changed(mem)
    return b, loop, mem


# --- structured requests ---------------------------------------------------------------------

STRINGS = ["F_TRANSLATION", "C_BAD_STE", "C_BAD_CD", "F_STREAM_DISABLED", "E_PAGE_REQUEST",
           "0x10", "16", "0x1ff", "read", "write", "exec", "rw", "ro", "none", "success",
           "invalid", "failure", "host", "guest", "IN", "CD", "TT", "cd", "00ff", "0", "zz",
           "", " ", "a\0b", "\ud800", "é", "x" * 120, "/tmp", "ep.sock"]
INTS = (0, 1, 2, 256, 512, 0x100, GPA, GPA + 0x1000, 0x1000, 0xFFFF_FFFF, 1 << 32, 1 << 63,
        1 << 64, (1 << 64) - 1, 1 << 20, 1000, 1024, 1025, WORK_BUDGET + 1, -1, -(1 << 63))


def json_value(fdp, depth: int = 0):
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 3 else 4)
    if kind == 0:
        return interesting(fdp, 64, INTS) - (1 << 63 if fdp.ConsumeIntInRange(0, 7) == 0 else 0)
    if kind == 1:
        return pick(fdp, STRINGS) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(12)
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return None
    if kind == 4:
        return pick(fdp, [0.5, -1.0, 1e300, float("nan"), float("inf")])
    if kind <= 6:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {pick(fdp, STRINGS): json_value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 3))}


def argument(fdp, arg: control.Arg):
    if fdp.ConsumeIntInRange(0, 9) == 0:
        return json_value(fdp)  # any type at all
    t = pick(fdp, list(arg.types))
    if t is bool:
        return fdp.ConsumeBool()
    if t is int:
        if fdp.ConsumeIntInRange(0, 7) == 0:
            return -interesting(fdp, 64, INTS)
        return interesting(fdp, 65, INTS)
    return pick(fdp, STRINGS) if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeUnicode(16)


def structured(fdp, server: control.ControlServer) -> tuple[list[str], int]:
    """(documents, how many need a reply of their own)."""
    names = sorted(server.commands)
    docs = []
    if fdp.ConsumeIntInRange(0, 7):
        docs.append(json.dumps({"execute": "qmp_capabilities"}))
    for n in range(fdp.ConsumeIntInRange(1, 8)):
        choice = fdp.ConsumeIntInRange(0, 31)
        name = (pick(fdp, names) if choice else
                pick(fdp, ["qmp_capabilities", "no-such-command", "", "query-commands"]))
        request: dict = {"execute": name}
        command = server.commands.get(name)
        if command is not None and fdp.ConsumeIntInRange(0, 7):
            args = {a.name: argument(fdp, a) for a in command.args
                    if a.required and fdp.ConsumeIntInRange(0, 15) or fdp.ConsumeBool()}
            if fdp.ConsumeIntInRange(0, 15) == 0:
                args[pick(fdp, STRINGS)] = json_value(fdp)
            request["arguments"] = args
        elif fdp.ConsumeIntInRange(0, 7) == 0:
            request["arguments"] = json_value(fdp)
        request["id"] = n if fdp.ConsumeIntInRange(0, 7) else json_value(fdp)
        if fdp.ConsumeIntInRange(0, 31) == 0:
            request[pick(fdp, ["exec-oob", "control", "x"])] = 1
        if fdp.ConsumeIntInRange(0, 31) == 0:
            del request["execute"]
        separators = pick(fdp, [(", ", ": "), (",", ":")])
        docs.append(json.dumps(request, separators=separators))
    return docs, len(docs)


# --- the property ----------------------------------------------------------------------------

def documents(text: str) -> int:
    """How many documents `_drain` will take from this text (control._next_document)."""
    count, buffer = 0, text
    while True:
        doc, buffer = control._next_document(buffer)
        if doc is None:
            return count
        count += 1


def check_reply(reply: dict) -> None:
    keys = set(reply) - {"id"}
    check(keys in ({"return"}, {"error"}), f"reply with members {sorted(reply)}")
    if "error" in reply:
        err = reply["error"]
        check(isinstance(err, dict) and set(err) == {"class", "desc"}
              and isinstance(err["class"], str) and isinstance(err["desc"], str),
              f"malformed error {err!r}")
        check(not err["desc"].startswith("internal error"),
              f"a command handler raised: {err['desc']}")


def feed(b: Backend, client: FakeClient, chunks: list[bytes]) -> int:
    """`_serve`'s loop; returns how many documents the server took."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer, taken = "", 0
    for chunk in chunks:
        buffer += decoder.decode(chunk)
        taken += documents(buffer)
        buffer = b.control._drain(client, buffer)  # must not raise: _serve's task would die
        if len(buffer) > control.MAX_REQUEST_BYTES:
            client.send(control._error(f"request longer than {control.MAX_REQUEST_BYTES} "
                                       f"bytes", None))
            buffer = ""
    return taken


def chunked(fdp, data: bytes) -> list[bytes]:
    cuts = sorted(fdp.ConsumeIntInRange(0, len(data)) for _ in range(fdp.ConsumeIntInRange(0, 3)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def health_check(b: Backend, mem: GuestMemory) -> None:
    """The backend must still serve after whatever the commands did."""
    b.vhost.reset("fuzz: device reset after the input")
    b.vhost.memory_changed(mem)
    for query in ("query-status", "query-endpoints", "query-domains", "query-events",
                  "query-requests", "query-page-requests"):
        json.dumps(b.control.call(query))


def one_input(data: bytes) -> None:
    """First byte: bit 0 raw (0) or structured (1); raw: bits 1-2 the chunk size, bits 3-4
    the page request policy."""
    if not data:
        return
    with sandboxed():
        one_session(data[0], data[1:])


def one_session(mode: int, data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    policy = POLICIES[(mode >> 3 & 3) % len(POLICIES)] if mode & 1 == 0 else pick(fdp, POLICIES)
    before = fuzzutil.open_fds()
    b, loop, mem = make_backend(policy)
    client = FakeClient()
    b.control._clients.add(client)
    work = [0]
    for name in ("submit", "submit_page_request"):  # relay work, counted per call
        real = getattr(b.relay, name)
        setattr(b.relay, name, lambda *args, _real=real: (work.__setitem__(0, work[0] + 1),
                                                          _real(*args))[1])
    real_execute = b.control._execute

    def execute(client, request):  # one request, bounded work
        work[0] = 0
        start = time.monotonic()
        reply = real_execute(client, request)
        took = time.monotonic() - start
        check(work[0] <= WORK_BUDGET, f"one request made {work[0]} relay submissions")
        check(took < SLOW_REQUEST, f"one request held the loop {took:.1f} s: {request!r:.200}")
        return reply
    b.control._execute = execute
    try:
        if mode & 1 == 0:  # raw bytes
            size = (1, 3, 16, 1 << 20)[mode >> 1 & 3]
            taken = feed(b, client, [data[i:i + size] for i in range(0, len(data), size)])
            check(len(client.replies) == taken,
                  f"{taken} documents, {len(client.replies)} replies: {client.replies[:4]}")
        else:
            docs, expected = structured(fdp, b.control)
            text = pick(fdp, ["", "\n", "\r\n", " "]).join(docs) + pick(fdp, ["", "\n"])
            feed(b, client, chunked(fdp, text.encode()))
            replies = client.replies
            check(len(replies) == expected, f"{expected} requests, {len(replies)} replies")
            for doc, reply in zip(docs, replies, strict=True):
                request = json.loads(doc)
                if isinstance(request, dict) and request.get("id") is not None:
                    rid = request["id"]
                    check(reply.get("id") == rid or rid != rid,  # NaN is not equal to itself
                          f"reply id {reply.get('id')!r} for request id {rid!r}")
        for reply in client.replies:
            check_reply(reply)
        health_check(b, mem)
    finally:
        b.endpoints.close()
        loop.close()
    leaked = fuzzutil.leaked_fds(before)
    check(not leaked, f"fds open after the input: {leaked}")


if __name__ == "__main__":
    fuzzutil.run(one_input)
