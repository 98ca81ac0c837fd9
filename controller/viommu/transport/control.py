"""A control server speaking QMP's wire protocol (QEMU docs/interop/qmp-spec.rst).

Greeting, `qmp_capabilities` negotiation, `execute` → `return`/`error` with `id` echoed,
asynchronous events: so qemu.qmp and qmp-shell drive the backend as they drive QEMU.
Commands declare their arguments; a bad argument gets a QMP error naming it.

A client that does not read its replies costs the others nothing: its next request is read
only once its unsent replies are below PAUSE_BYTES (so its requests are not executed, and
its replies not built, meanwhile), and one whose unsent replies and events pass
MAX_UNSENT_BYTES anyway (events keep coming) is dropped, with the reason in the log.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from viommu.transport.sockets import listen_private_unix

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 1 << 20
# Unsent output of one client: past PAUSE_BYTES its requests wait (asyncio's write-buffer
# high-water mark; they go on below a quarter of it); past MAX_UNSENT_BYTES before a reply or
# an event is added, it is dropped. One reply may be bigger than either (a full trace is a
# few MiB): it is always sent whole.
PAUSE_BYTES = 256 << 10
MAX_UNSENT_BYTES = 16 << 20


class CommandError(Exception):
    """Raised by a command handler: becomes a QMP error answer with this description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    types: tuple[type, ...]
    required: bool = False
    help: str = ""


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    handler: Callable[[dict[str, Any]], Any]
    args: tuple[Arg, ...] = ()
    help: str = ""

    def validate(self, arguments: Any) -> dict[str, Any]:
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise CommandError("'arguments' must be a JSON object")
        known = {a.name: a for a in self.args}
        for key in arguments:
            if key not in known:
                expected = ", ".join(known) or "none"
                raise CommandError(f"Parameter '{key}' is unexpected (accepted: {expected})")
        for arg in self.args:
            if arg.name not in arguments:
                if arg.required:
                    raise CommandError(f"Parameter '{arg.name}' is missing")
                continue
            value = arguments[arg.name]
            if isinstance(value, bool) and bool not in arg.types or not isinstance(
                    value, arg.types):
                names = " or ".join(_JSON_TYPE_NAMES[t] for t in arg.types)
                raise CommandError(f"Invalid parameter type for '{arg.name}', expected: {names}")
        return arguments


_JSON_TYPE_NAMES = {int: "integer", str: "string", bool: "boolean", list: "array",
                    dict: "object", float: "number"}


class ControlServer:
    def __init__(self, product: str, version: tuple[int, int, int]) -> None:
        self.product = product
        self.version = version
        self.commands: dict[str, Command] = {}
        self._clients: set[_Client] = set()
        self._server: asyncio.AbstractServer | None = None
        # CLOCK_MONOTONIC ns when the bytes of the command being served arrived
        self.arrival_ns = 0
        self.register(Command("query-commands", self._query_commands,
                              help="List the commands this server accepts"))

    def register(self, command: Command) -> None:
        self.commands[command.name] = command

    @property
    def listening(self) -> bool:
        return self._server is not None

    def call(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command in this process, as a client's `execute` would (CommandError for
        what a client would get as a QMP error)."""
        command = self.commands.get(name)
        if command is None:
            raise CommandError(f"The command {name} has not been found", "CommandNotFound")
        self.arrival_ns = time.monotonic_ns()
        return command.handler(command.validate(arguments))

    async def listen_unix(self, path: str, fd: int | None = None) -> None:
        """Serve on `path`; or on `fd`, a socket already listening there."""
        sock = listen_private_unix(path) if fd is None else socket.socket(fileno=fd)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("control: QMP server on %s", path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.writer.close()

    def emit(self, event: str, data: dict | None = None) -> None:
        """Send an asynchronous event to every client past capabilities negotiation."""
        now = time.time()
        msg = {"event": event, "data": data or {},
               "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        for client in list(self._clients):
            if client.negotiated:
                client.send(msg)

    def _query_commands(self, args: dict) -> list[dict]:
        return [{"name": name} for name in sorted(self.commands)]

    def greeting(self) -> dict:
        major, minor, micro = self.version
        return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                    "package": self.product},
                        "capabilities": []}}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=PAUSE_BYTES)
        client = _Client(writer)
        self._clients.add(client)
        client.send(self.greeting())
        # A multi-byte character may be split between two reads.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer = ""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                self.arrival_ns = time.monotonic_ns()
                buffer += decoder.decode(chunk)
                while True:
                    document, buffer = _next_document(buffer)
                    if document is None:
                        break
                    client.send(self._answer(client, document))
                    # Returns at once unless the client leaves its replies unread: then its
                    # next request waits, and nothing more is built for it.
                    await writer.drain()
                if len(buffer) > MAX_REQUEST_BYTES:
                    client.send(_error(f"request longer than {MAX_REQUEST_BYTES} bytes", None))
                    buffer = ""
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
            writer.close()

    def _drain(self, client: _Client, buffer: str) -> str:
        """Answer every complete request in the buffer; return the incomplete rest."""
        while True:
            document, buffer = _next_document(buffer)
            if document is None:
                return buffer
            client.send(self._answer(client, document))

    def _answer(self, client: _Client, document: str) -> dict:
        """The reply to one document: parsed and executed, or why it could not be."""
        try:
            request = json.loads(document)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            return _error(f"JSON parse error, {reason}", None)
        return self._execute(client, request)

    def _execute(self, client: _Client, request: Any) -> dict:
        if not isinstance(request, dict):
            return _error("QMP input must be a JSON object", None)
        msg_id = request.get("id")
        name = request.get("execute")
        if not isinstance(name, str):
            return _error("QMP input lacks member 'execute'", msg_id)
        unexpected = set(request) - {"execute", "arguments", "id"}
        if unexpected:
            return _error(f"QMP input member '{sorted(unexpected)[0]}' is unexpected", msg_id)
        if name == "qmp_capabilities":
            if client.negotiated:
                return _error("Capabilities negotiation is already complete, command ignored",
                              msg_id, "CommandNotFound")
            client.negotiated = True
            return _return({}, msg_id)
        if not client.negotiated:
            return _error("Expecting capabilities negotiation with 'qmp_capabilities'",
                          msg_id, "CommandNotFound")
        command = self.commands.get(name)
        if command is None:
            return _error(f"The command {name} has not been found", msg_id, "CommandNotFound")
        try:
            result = command.handler(command.validate(request.get("arguments")))
        except CommandError as exc:
            return _error(exc.desc, msg_id, exc.error_class)
        except Exception as exc:
            log.exception("control: %s failed", name)
            return _error(f"internal error in {name}: {exc}", msg_id)
        return _return({} if result is None else result, msg_id)


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, msg: dict) -> None:
        if self.writer.is_closing():
            return
        unsent = self.writer.transport.get_write_buffer_size()
        if unsent > MAX_UNSENT_BYTES:
            log.warning("control: dropping a client that reads nothing: %d bytes of replies "
                        "and events unsent (limit %d)", unsent, MAX_UNSENT_BYTES)
            self.writer.transport.abort()
            return
        self.writer.write(json.dumps(msg).encode() + b"\r\n")


def _next_document(buffer: str) -> tuple[str | None, str]:
    """Split off the first complete top-level JSON object (or stray line) from a stream;
    (None, buffer) while it is incomplete. Tracks strings, so braces or a read boundary
    inside a string do not confuse it."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(buffer):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:  # a bare string: a document (not an object) to answer
                    return buffer[:i + 1], buffer[i + 1:]
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                return buffer[:i + 1], buffer[i + 1:]
        elif depth == 0 and not ch.isspace():
            end = buffer.find("\n", i)  # not JSON object syntax: reject up to end of line
            if end < 0:
                return None, buffer
            return buffer[i:end], buffer[end + 1:]
    if depth == 0 and not in_string:
        return None, ""  # only whitespace
    return None, buffer


def _return(value: Any, msg_id: Any) -> dict:
    out = {"return": value}
    if msg_id is not None:
        out["id"] = msg_id
    return out


def _error(desc: str, msg_id: Any, error_class: str = "GenericError") -> dict:
    out = {"error": {"class": error_class, "desc": desc}}
    if msg_id is not None:
        out["id"] = msg_id
    return out
