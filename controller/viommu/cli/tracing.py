"""Following a running backend's traces (`viommu trace`): the guest's requests, faults,
page requests and endpoints' DMA translations, as they happen.

The backend keeps bounded traces with a sequence number in every entry; the follower polls
each with `since` = the last seq it has seen, so nothing still kept is missed or repeated.
Page request groups waiting for the controller (policy `host`) are not in a trace: they are
followed by their increasing group id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

# kind -> the control command that holds its trace
TRACES = {"request": "query-requests", "event": "query-events",
          "translation": "query-translations"}
BATCH = 500


class TraceFollower:
    def __init__(self, backend: Callable[..., Any], from_start: bool = False) -> None:
        """`backend(command, **args)` runs a control command. Unless `from_start`, only
        what happens from now on is followed."""
        self.backend = backend
        self.cursors = {kind: 0 for kind in TRACES}
        self.group_cursor = 0
        if not from_start:
            for kind, command in TRACES.items():
                newest = backend(command, limit=1)["trace"]
                self.cursors[kind] = newest[-1]["seq"] if newest else 0
            self.group_cursor = max(self._groups(), default=0)

    def poll(self) -> list[dict]:
        """New entries since the last poll, oldest first, each with a `kind`: request,
        fault, page-request, page-request-group or translation."""
        found: list[dict] = []
        for kind, command in TRACES.items():
            found += self._drain(kind, command)
        for group in self.backend("query-page-requests")["pending"]:
            if group["id"] > self.group_cursor:
                self.group_cursor = group["id"]
                found.append({"kind": "page-request-group", "time": time.time(), **group})
        return sorted(found, key=lambda e: e["time"])

    def _drain(self, kind: str, command: str) -> Iterator[dict]:
        while True:
            entries = self.backend(command, since=self.cursors[kind], limit=BATCH)["trace"]
            for entry in entries:
                yield {"kind": _kind(kind, entry), **entry}
            if entries:
                self.cursors[kind] = entries[-1]["seq"]
            if len(entries) < BATCH:
                return

    def _groups(self) -> list[int]:
        return [g["id"] for g in self.backend("query-page-requests")["pending"]]

    def follow(self, interval: float = 0.2) -> Iterator[dict]:
        """poll() forever, `interval` seconds apart."""
        while True:
            yield from self.poll()
            time.sleep(interval)


def _kind(trace: str, entry: dict) -> str:
    if trace != "event":
        return trace
    return "page-request" if entry.get("type") == "PAGE_REQUEST" else "fault"


def format_entry(entry: dict) -> str:
    """One human-readable line."""
    stamp = time.strftime("%H:%M:%S", time.localtime(entry["time"]))
    stamp += f".{int(entry['time'] * 1000) % 1000:03d}"
    return f"{stamp} {entry['kind']:<18} {_FORMATS[entry['kind']](entry)}"


def _request(e: dict) -> str:
    fields = [f"{k}={_hex(k, e[k])}" for k in ("domain", "endpoint", "virt_start", "virt_end",
                                               "phys_start", "flags", "address", "nr_pages")
              if e.get(k) is not None]
    return f"#{e['seq']} {e['type']} {' '.join(fields)} -> {e['status']}"


def _fault(e: dict) -> str:
    pasid = f" pasid={e['pasid']}" if e.get("pasid") is not None else ""
    line = f" guest: {e['guest_line']}" if e.get("guest_line") else ""
    note = f" ({e['note']})" if e.get("note") else ""
    return f"#{e['seq']} {e['type']} sid={e['sid']:#x}{pasid} {e['state']}{line}{note}"


def _page_request(e: dict) -> str:
    r = e["request"]
    access = "".join(c for c, key in (("R", "read"), ("W", "write"), ("X", "exec")) if r[key])
    return (f"#{e['seq']} sid={r['sid']:#x} pasid={r['pasid']} grpid={r['grpid']} "
            f"page={r['address']:#x} [{access}]{' last' if r['last'] else ''} {e['state']}")


def _group(e: dict) -> str:
    pages = " ".join(f"{r['address']:#x}" for r in e["requests"])
    return (f"group {e['id']} sid={e['sid']:#x} pasid={e['pasid']} grpid={e['grpid']} "
            f"pages {pages}: waiting for page-response (policy {e['policy']})")


def _translation(e: dict) -> str:
    pasid = f" pasid={e['pasid']}" if e["pasid"] is not None else ""
    result = "ok" if e["done"] == e["length"] else f"FAULT after {e['done']} bytes"
    return (f"#{e['seq']} sid={e['sid']:#x}{pasid} copy {e['length']} bytes "
            f"{e['src']:#x} -> {e['dst']:#x}: {result}")


def _hex(key: str, value: object) -> str:
    return f"{value:#x}" if key in ("virt_start", "virt_end", "phys_start", "address") \
        else str(value)


_FORMATS: dict[str, Callable[[dict], str]] = {
    "request": _request, "fault": _fault, "page-request": _page_request,
    "page-request-group": _group, "translation": _translation}
