"""The readers of an iommufd fault fd (FaultQueue) and vEVENTQ fd (VeventQueue): whole
groups out, page responses in, lost events counted; the rules they follow are in the
package docstring, the records they decode in `uapi`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import stat
import time
from collections.abc import Callable, Mapping

from viommu.events.page_requests import PageRequest, ResponseCode
from viommu.events.smmuv3 import EventRecord
from viommu.transport.iommufd.uapi import (
    HWPT_PGFAULT,
    IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
    IOMMUFD_PAGE_RESP_INVALID,
    IOMMUFD_PAGE_RESP_SUCCESS,
    VEVENT_ARM_SMMUV3_SIZE,
    VEVENT_HEADER,
    VEVENT_SEQUENCE_MAX,
    HwptPageResponse,
    HwptPgfault,
    VeventHeader,
)

log = logging.getLogger(__name__)

# Read sizes. The fault fd wants a multiple of 40 and never splits a group, so the buffer must
# hold the largest group a device can send (bounded by its outstanding page requests).
FAULT_READ_SIZE = 1024 * HWPT_PGFAULT.size
VEVENTQ_READ_SIZE = 256 * (VEVENT_HEADER.size + VEVENT_ARM_SMMUV3_SIZE)


class IommufdError(Exception):
    """Misuse of a fault or event queue; the text says what to do instead."""


class UnknownCookie(IommufdError, LookupError):
    """The cookie names no group waiting for an answer. Nothing was written."""


class PriMustBeDisabled(IommufdError):
    """Response Failure was asked for. iommufd has no such code, so the group has been answered
    INVALID; the caller must now emulate the failure by disabling PRI for the function."""

    def __init__(self, cookie: int, sid: int, dev_id: int) -> None:
        self.cookie, self.sid, self.dev_id = cookie, sid, dev_id
        super().__init__(
            f"fault group {cookie} from endpoint {sid} (iommufd dev_id {dev_id}) was answered "
            "INVALID: iommufd has no Response Failure (PRI may be shared with other functions). "
            f"Emulate it: disable PRI for endpoint {sid} (clear PRI Enable, as after a vPRI "
            "reset) and stop forwarding its page requests")


# ---- reading either kind of fd ----------------------------------------------------------


class _Reader:
    """Non-blocking reads that tell "nothing queued" from "peer closed" (see the package
    docstring), and the count of what could not be read."""

    def __init__(self, fd: int, read_size: int, what: str) -> None:
        self.fd = fd
        self._read_size = read_size
        self._what = what  # for the log
        self._buffer = b""
        self.errors = 0
        self.last_error = ""
        os.set_blocking(fd, False)
        mode = os.fstat(fd).st_mode
        # Only sockets and pipes have an EOF; an iommufd anon inode returns 0 when empty.
        self._zero_is_eof = stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def _error(self, what: str) -> None:
        self.errors += 1
        self.last_error = what
        log.warning("iommufd %s: %s", self._what, what)

    def _read(self) -> bytes:
        if self.closed:
            return b""
        try:
            data = os.read(self.fd, self._read_size)
        except (BlockingIOError, InterruptedError):
            return b""
        if not data and self._zero_is_eof:
            self.closed = True
        return data

    def _wait_readable(self, deadline: float | None) -> bool:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))


# ---- fault queue ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaultGroup:
    """One page request group as delivered: answer it once with FaultQueue.respond(cookie)."""

    cookie: int
    dev_id: int
    requests: tuple[PageRequest, ...]
    records: tuple[HwptPgfault, ...]  # as read, e.g. for the exact stall address

    @property
    def sid(self) -> int:
        return self.requests[-1].sid

    @property
    def is_stop_marker(self) -> bool:
        """No fault: the function stopped using the PASID. iommufd still holds a cookie for
        it, so it stays pending here until answered (or close())."""
        return self.requests[-1].is_stop_marker


_IOMMUFD_CODE = {
    ResponseCode.SUCCESS: IOMMUFD_PAGE_RESP_SUCCESS,
    ResponseCode.INVALID_REQUEST: IOMMUFD_PAGE_RESP_INVALID,
    # Not writable: answered INVALID, then PriMustBeDisabled tells the caller to disable PRI.
    ResponseCode.RESPONSE_FAILURE: IOMMUFD_PAGE_RESP_INVALID,
}


class FaultQueue(_Reader):
    """Reads IO page fault groups from a fault fd and answers them.

    `dev_to_sid` maps iommufd dev_id to the virtio-iommu endpoint ID and is consulted at read
    time, so devices may be added later. A group that cannot be turned into PageRequests (no
    endpoint for its dev_id, or fields PRI cannot hold) is answered INVALID at once: nobody
    else could answer it, and an unanswered group stalls the device.
    """

    def __init__(self, fd: int, dev_to_sid: Mapping[int, int],
                 on_group: Callable[[FaultGroup], None] | None = None) -> None:
        super().__init__(fd, FAULT_READ_SIZE, "fault queue")
        self.dev_to_sid = dev_to_sid
        self.on_group = on_group
        self._partial: dict[int, list[HwptPgfault]] = {}  # cookie -> records before LAST_PAGE
        self._pending: dict[int, FaultGroup] = {}
        self._shut = False
        self.records = 0
        self.groups = 0
        self.answered = 0
        self.rejected = 0

    def on_readable(self) -> list[FaultGroup]:
        """Read what is there (for loop.add_reader); returns, and calls back with, each group
        completed by this read."""
        self._buffer += self._read()
        complete = []
        while len(self._buffer) >= HWPT_PGFAULT.size:
            raw, self._buffer = (self._buffer[:HWPT_PGFAULT.size],
                                 self._buffer[HWPT_PGFAULT.size:])
            group = self._take(HwptPgfault.decode(raw))
            if group is not None:
                complete.append(group)
        if self.closed and (self._buffer or self._partial):
            self._error(f"fault stream ended inside a record or group ({len(self._buffer)} "
                        f"stray bytes, incomplete cookies {sorted(self._partial)})")
            self._buffer, self._partial = b"", {}
        for group in complete:
            if self.on_group is not None:
                self.on_group(group)
        return complete

    def read_groups(self, timeout: float | None = None) -> list[FaultGroup]:
        """Block until at least one whole group has arrived, the peer closed, or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            if not self._wait_readable(deadline):
                return []
            groups = self.on_readable()
            if groups:
                return groups
        return []

    def respond(self, cookie: int, code: ResponseCode) -> None:
        """Answer a pending group once. SUCCESS → 0, INVALID_REQUEST → 1. RESPONSE_FAILURE
        writes INVALID (1) and raises PriMustBeDisabled: the caller must disable PRI."""
        code = ResponseCode(code)
        group = self._pending.get(cookie)
        if group is None:
            raise UnknownCookie(
                f"fault group cookie {cookie} is not pending (never read, already answered, "
                f"or the queue is closed); nothing written. Pending: {self.pending()}")
        self._write(cookie, _IOMMUFD_CODE[code])
        if code is ResponseCode.RESPONSE_FAILURE:
            raise PriMustBeDisabled(cookie, group.sid, group.dev_id)

    def pending(self) -> list[int]:
        """Cookies of groups read but not answered yet."""
        return sorted(self._pending)

    def close(self) -> int:
        """Answer every pending group INVALID, as destroying the fault object does; refuse
        further answers and reject groups read later. The fd stays open: its owner closes it.
        Returns the number of groups answered."""
        answered = 0
        for cookie in self.pending():
            try:
                self._write(cookie, IOMMUFD_PAGE_RESP_INVALID)
                answered += 1
            except OSError as exc:
                self._error(f"could not answer fault group {cookie} on close: {exc}")
                self._pending.pop(cookie, None)
        self._shut = True
        return answered

    def counters(self) -> dict:
        return {"records": self.records, "groups": self.groups, "pending": len(self._pending),
                "answered": self.answered, "rejected": self.rejected, "errors": self.errors}

    def _take(self, record: HwptPgfault) -> FaultGroup | None:
        """Add one record; a LAST_PAGE record closes its cookie's group."""
        self.records += 1
        if record.cookie in self._pending:
            self._error(f"record for cookie {record.cookie} whose group is already pending; "
                        "dropped (the kernel never reuses a cookie before its answer)")
            return None
        records = self._partial.setdefault(record.cookie, [])
        records.append(record)
        if not record.last_page:
            return None
        del self._partial[record.cookie]
        return self._group(record.cookie, records)

    def _group(self, cookie: int, records: list[HwptPgfault]) -> FaultGroup | None:
        dev_id = records[-1].dev_id
        sid = self.dev_to_sid.get(dev_id)
        try:
            if self._shut:
                raise ValueError("the queue is closed")
            if sid is None:
                raise ValueError(f"no endpoint for iommufd dev_id {dev_id}; add it to "
                                 "dev_to_sid when binding the device")
            requests = tuple(r.to_page_request(sid) for r in records)
        except ValueError as exc:
            self._reject(cookie, str(exc))
            return None
        group = FaultGroup(cookie, dev_id, requests, tuple(records))
        self._pending[cookie] = group
        self.groups += 1
        return group

    def _reject(self, cookie: int, why: str) -> None:
        self.rejected += 1
        log.warning("fault group %d answered INVALID: %s", cookie, why)
        try:
            os.write(self.fd, HwptPageResponse(cookie, IOMMUFD_PAGE_RESP_INVALID).encode())
        except OSError as exc:
            self._error(f"could not reject fault group {cookie}: {exc}")

    def _write(self, cookie: int, iommufd_code: int) -> None:
        raw = HwptPageResponse(cookie, iommufd_code).encode()
        if os.write(self.fd, raw) != len(raw):
            raise OSError(f"short write answering fault group {cookie}; it is still pending")
        del self._pending[cookie]
        self.answered += 1


# ---- vEVENTQ ----------------------------------------------------------------------------


class VeventQueue(_Reader):
    """Reads an ARM SMMUv3 vEVENTQ: each event to `on_event`, each loss to `on_lost(count)`.

    Losses are found two ways and counted once: a jump in `sequence` (k missing numbers = k
    events) and a LOST_EVENTS header (the dropped event whose number it carries, plus any jump
    before it). `expect_sequence` is the first number due (0 on a fresh queue; None to take the
    first record as it comes). Malformed input is counted in `errors`, never raised: the
    buffered bytes are dropped, since a real fd starts every read on a record boundary.
    """

    def __init__(self, fd: int, on_event: Callable[[EventRecord], None],
                 on_lost: Callable[[int], None] | None = None, *,
                 expect_sequence: int | None = 0) -> None:
        super().__init__(fd, VEVENTQ_READ_SIZE, "vEVENTQ")
        self.on_event = on_event
        self.on_lost = on_lost
        self._expected = expect_sequence
        self.received = 0
        self.lost = 0
        self.gaps = 0
        self.lost_headers = 0

    def on_readable(self) -> list[EventRecord]:
        """Read what is there (for loop.add_reader); returns the events it decoded."""
        self._buffer += self._read()
        events = []
        while len(self._buffer) >= VEVENT_HEADER.size:
            header = VeventHeader.decode(self._buffer[:VEVENT_HEADER.size])
            if not self._plausible(header):
                break
            if header.lost_events:
                self._buffer = self._buffer[VEVENT_HEADER.size:]
                self.lost_headers += 1
                self._account(header.sequence, lost_itself=1)
                continue
            end = VEVENT_HEADER.size + VEVENT_ARM_SMMUV3_SIZE
            if len(self._buffer) < end:
                break  # the rest of the record comes with the next read
            payload, self._buffer = self._buffer[VEVENT_HEADER.size:end], self._buffer[end:]
            self._account(header.sequence, lost_itself=0)
            events.append(self._deliver(payload))
        if self.closed and self._buffer:
            self._garbage(f"stream ended {len(self._buffer)} bytes into a record")
        return [e for e in events if e is not None]

    def counters(self) -> dict:
        return {"received": self.received, "lost": self.lost, "gaps": self.gaps,
                "lost_headers": self.lost_headers, "errors": self.errors}

    def _plausible(self, header: VeventHeader) -> bool:
        if header.flags & ~IOMMU_VEVENTQ_FLAG_LOST_EVENTS:
            self._garbage(f"unknown vEVENT header flags {header.flags:#x}")
        elif header.sequence > VEVENT_SEQUENCE_MAX:
            self._garbage(f"vEVENT sequence {header.sequence:#x} exceeds INT_MAX")
        else:
            return True
        return False

    def _account(self, sequence: int, lost_itself: int) -> None:
        gap = 0 if self._expected is None else (sequence - self._expected) & VEVENT_SEQUENCE_MAX
        if gap > VEVENT_SEQUENCE_MAX // 2:
            # Far more than any queue depth: the sequence went backwards. Resynchronise.
            self._error(f"vEVENT sequence {sequence} is behind the expected {self._expected}")
            gap = 0
        self._expected = (sequence + 1) & VEVENT_SEQUENCE_MAX
        if gap:
            self.gaps += 1
        if gap + lost_itself:
            self.lost += gap + lost_itself
            log.warning("vEVENTQ lost %d event(s) before sequence %d", gap + lost_itself,
                        sequence + 1)
            if self.on_lost is not None:
                self.on_lost(gap + lost_itself)

    def _deliver(self, payload: bytes) -> EventRecord | None:
        try:
            event = EventRecord.decode(payload)
        except ValueError as exc:
            self._error(f"undecodable SMMUv3 record {payload.hex()}: {exc}")
            return None
        self.received += 1
        self.on_event(event)
        return event

    def _garbage(self, what: str) -> None:
        self._error(f"{what}; dropped {len(self._buffer)} buffered bytes")
        self._buffer = b""
