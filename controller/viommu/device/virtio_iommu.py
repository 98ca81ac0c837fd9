"""virtio-iommu device semantics: domains, endpoints, the request rules of virtio spec 5.13.6.

Transport-independent: requests arrive already parsed by the data plane (ext/), and each
request type is one short method returning the spec's status. Nothing here knows vhost-user.
What follows the device's state registers a DeviceObserver (viommu.device.observers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from viommu._dataplane import MapRules, encode_resv_mem
from viommu.device.config import BYPASS_OFFSET, DeviceConfig, ResourceLimit
from viommu.device.mappings import MappingTable
from viommu.device.observers import DeviceObserver, PageResponder
from viommu.device.request_log import RequestLog
from viommu.device.streams import DECLARED, SERVED, Domain, EndpointState
from viommu.uapi import (
    PAGE_RESP_F_PASID_VALID,
    VIOMMU_F_ATTACH_TABLE,
    VIOMMU_F_PAGE_REQUEST,
    VIRTIO_F_VERSION_1,
    VIRTIO_IOMMU_ATTACH_F_BYPASS,
    Feature,
    InvalidateCache,
    InvalidateFlag,
    InvalidateScope,
    MapFlag,
    PageRespCode,
    RequestType,
    ResvMemSubtype,
    Status,
    TableFormat,
)

__all__ = ["DeviceConfig", "ResourceLimit", "VirtioIommuDevice"]

log = logging.getLogger(__name__)

Reply = tuple[int, bytes]
# Request types of viommu's private extensions, and the feature each needs.
_PRIVATE_TYPES = {
    RequestType.VIRTIO_IOMMU_T_ATTACH_TABLE: VIOMMU_F_ATTACH_TABLE,
    RequestType.VIRTIO_IOMMU_T_INVALIDATE: VIOMMU_F_ATTACH_TABLE,
    RequestType.VIRTIO_IOMMU_T_PAGE_RESP: VIOMMU_F_PAGE_REQUEST,
}


class VirtioIommuDevice:
    """The state and request handling of one virtio-iommu device."""

    OFFERED_FEATURES = (
        (1 << VIRTIO_F_VERSION_1) | (1 << Feature.F_INPUT_RANGE) | (1 << Feature.F_DOMAIN_RANGE)
        | (1 << Feature.F_MAP_UNMAP) | (1 << Feature.F_PROBE) | (1 << Feature.F_BYPASS_CONFIG)
        | (1 << VIOMMU_F_ATTACH_TABLE) | (1 << VIOMMU_F_PAGE_REQUEST)
    )

    def __init__(self, endpoints: Iterable[int], config: DeviceConfig | None = None,
                 trace_len: int = 4096, page_responder: PageResponder | None = None) -> None:
        self.config = config or DeviceConfig()
        self.bypass = self.config.bypass
        self.endpoints = {ep: EndpointState(ep) for ep in endpoints}
        self.domains: dict[int, Domain] = {}
        self.driver_features = 0
        self.requests = RequestLog(trace_len)
        self.page_responder = page_responder
        self._observers: list[DeviceObserver] = []
        self._handlers = {
            RequestType.VIRTIO_IOMMU_T_ATTACH: self._attach,
            RequestType.VIRTIO_IOMMU_T_DETACH: self._detach,
            RequestType.VIRTIO_IOMMU_T_MAP: self._map,
            RequestType.VIRTIO_IOMMU_T_UNMAP: self._unmap,
            RequestType.VIRTIO_IOMMU_T_PROBE: self._probe,
            RequestType.VIRTIO_IOMMU_T_ATTACH_TABLE: self._attach_table,
            RequestType.VIRTIO_IOMMU_T_INVALIDATE: self._invalidate,
            RequestType.VIRTIO_IOMMU_T_PAGE_RESP: self._page_resp,
        }

    def observe(self, observer: DeviceObserver) -> None:
        self._observers.append(observer)

    def unobserve(self, observer: DeviceObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    # --- configuration ------------------------------------------------------------------------

    def accept_features(self, features: int) -> None:
        """The driver's features (those the device offered; the rest is ignored)."""
        self.driver_features = features & self.OFFERED_FEATURES

    def negotiated(self, feature: int) -> bool:
        return bool(self.driver_features & (1 << feature))

    def config_bytes(self) -> bytes:
        return self.config.space(self.bypass)

    def write_config(self, offset: int, data: bytes) -> None:
        """Only `bypass` is driver-writable; bits 1-7 of it are ignored (spec 5.13.4)."""
        if offset <= BYPASS_OFFSET < offset + len(data):
            self.bypass = bool(data[BYPASS_OFFSET - offset] & 1)
            log.info("config: bypass=%d", self.bypass)
            for ep in self.endpoints.values():
                if ep.domain is None and ep.table is None:
                    self._stream_changed(ep.endpoint_id)

    def reset(self) -> None:
        """Device reset: every endpoint detached, every domain gone, every sticky
        configuration fault cleared (the guest programs its streams anew); `bypass` is kept.

        Negotiated features are left alone: over vhost-user the front-end sends SET_FEATURES
        before the ring restart that reveals the reset, and again on every start."""
        self.domains.clear()
        self._map_domains_changed()
        for ep in self.endpoints.values():
            ep.domain = None
            ep.probed = False
            ep.table = None
            ep.config_fault = None
            self._stream_changed(ep.endpoint_id)

    def add_endpoint(self, endpoint_id: int, origin: str = DECLARED) -> None:
        """Know `endpoint_id` as an endpoint; `origin` says who brought it (DECLARED:
        add-endpoint, SERVED: endpoint-create). Adding one known already changes only its
        origin, and only to SERVED (a device is now plugged where it was declared)."""
        if endpoint_id not in self.endpoints and len(self.endpoints) >= self.config.max_endpoints:
            raise ResourceLimit(f"already {len(self.endpoints)} endpoints, the limit")
        if endpoint_id not in self.endpoints:
            self.endpoints[endpoint_id] = EndpointState(endpoint_id, origin=origin)
            self._stream_changed(endpoint_id)
        elif origin == SERVED:
            self.endpoints[endpoint_id].origin = SERVED

    def guest_absence(self, endpoint_id: int, plugged: bool = False) -> str | None:
        """Why the guest does not have this endpoint, or None when it does (or may): one
        from the command line is a device QEMU started with; one declared with add-endpoint
        is the guest's once its driver probed or attached it; one we serve is there while
        QEMU's vfio-user-pci is connected to it (`plugged`)."""
        ep = self.endpoints[endpoint_id]
        if ep.origin == DECLARED and not ep.seen_by_guest:
            return (f"endpoint {endpoint_id:#x} was declared with add-endpoint and the "
                    "guest's driver has not probed it since the last reset: there may be "
                    "no device behind it")
        if ep.origin == SERVED and not plugged:
            return (f"endpoint {endpoint_id:#x} is served over vfio-user but no device is "
                    "plugged for it (never plugged, or hot-unplugged)")
        return None

    def bind_table(self, endpoint_id: int, ste0: int, ste1: int) -> None:
        """Page-table mode for a stream: its STE words, for guests without ATTACH_TABLE."""
        ep = self.endpoints[endpoint_id]
        if ep.domain is not None:
            self._detach_endpoint(ep)
        ep.table = (ste0, ste1)
        ep.config_fault = None
        self._stream_changed(endpoint_id)

    def note_config_fault(self, endpoint_id: int, event_name: str) -> None:
        """A configuration error (C_BAD_STE, C_BAD_CD...) was raised for the stream: shown
        until the guest reprograms it."""
        if endpoint_id in self.endpoints:
            self.endpoints[endpoint_id].config_fault = event_name

    def _stream_changed(self, endpoint_id: int) -> None:
        for observer in self._observers:
            observer.stream_changed(endpoint_id)

    def _map_domains_changed(self) -> None:
        for observer in self._observers:
            observer.map_domains_changed()

    def _pasid_unbound(self, endpoint_id: int, pasid: int | None) -> None:
        for observer in self._observers:
            observer.pasid_unbound(endpoint_id, pasid)

    @property
    def mapping_count(self) -> int:
        """Mappings over every domain, against config.max_mappings. Counted, not kept: the
        request thread (ext/requestq.pxi) adds and removes mappings too."""
        return sum(len(domain.mappings) for domain in self.domains.values())

    def map_domains(self) -> list[tuple[int, MappingTable]]:
        """The domains MAP and UNMAP apply to (not bypass, not page-table)."""
        return [(d.domain_id, d.mappings) for d in self.domains.values() if d.takes_map]

    def map_rules(self) -> MapRules:
        """What MAP and UNMAP accept, as negotiated (ext/mappings.pxi applies them, here
        and on the request thread)."""
        c = self.config
        flags = int(MapFlag.READ | MapFlag.WRITE)
        if self.negotiated(Feature.F_MMIO):
            flags |= int(MapFlag.MMIO)
        return MapRules(c.granule, flags,
                        c.input_range if self.negotiated(Feature.F_INPUT_RANGE) else None,
                        c.resv_msi, c.max_mappings_per_domain, c.max_mappings)

    # --- requests ---------------------------------------------------------------------------------

    def handle_request(self, req) -> Reply | None:
        """Serve one parsed request; None returns it unwritten (used length 0)."""
        handler = self._handlers.get(req.type)
        needs = _PRIVATE_TYPES.get(req.type)
        if handler is None or needs is not None and not self.negotiated(needs):
            return None  # an unrecognised type: returned unwritten
        try:
            status, payload = handler(req)
        except Exception:
            log.exception("internal error serving %r", req)
            status, payload = Status.S_DEVERR, b""
        self.requests.record(req, status)
        return int(status), payload

    def _attach(self, req) -> Reply:
        bypass_allowed = self.negotiated(Feature.F_BYPASS_CONFIG)
        known_flags = VIRTIO_IOMMU_ATTACH_F_BYPASS if bypass_allowed else 0
        if not req.reserved_zero or req.flags & ~known_flags:
            return Status.S_INVAL, b""
        ep = self._attach_target(req)
        if isinstance(ep, Status):
            return ep, b""
        bypass = bool(req.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS)
        domain = self.domains.get(req.domain)
        if domain is not None and (domain.bypass != bypass or domain.table is not None):
            return Status.S_INVAL, b""
        if domain is None:
            if len(self.domains) >= self.config.max_domains:
                return Status.S_NOMEM, b""
            domain = Domain(req.domain, bypass)
        self._join(ep, domain, table=None)
        return Status.S_OK, b""

    def _attach_target(self, req) -> EndpointState | Status:
        """The endpoint an ATTACH or ATTACH_TABLE names, or the status refusing it."""
        ep = self.endpoints.get(req.endpoint)
        if ep is None:
            return Status.S_NOENT
        if not self._domain_in_range(req.domain):
            return Status.S_RANGE
        return ep

    def _join(self, ep: EndpointState, domain: Domain, table: tuple[int, int] | None) -> None:
        """Attach (implicitly detaching from another domain) and reprogram the stream."""
        if ep.domain is not None and ep.domain != domain.domain_id:
            self._detach_endpoint(ep)
        self._pasid_unbound(ep.endpoint_id, None)  # the stream is reprogrammed
        if domain.domain_id not in self.domains:
            self.domains[domain.domain_id] = domain
            self._map_domains_changed()
        domain.endpoints.add(ep.endpoint_id)
        ep.domain = domain.domain_id
        ep.table = table
        ep.config_fault = None
        self._stream_changed(ep.endpoint_id)

    def _attach_table(self, req) -> Reply:
        """Bind the domain to SMMUv3 tables in guest memory (STE words) and attach."""
        if not req.reserved_zero:
            return Status.S_INVAL, b""
        if req.format != TableFormat.ARM_SMMU3:
            return Status.S_UNSUPP, b""
        ep = self._attach_target(req)
        if isinstance(ep, Status):
            return ep, b""
        domain = self.domains.get(req.domain)
        if domain is not None and (domain.bypass or domain.table is None):
            return Status.S_INVAL, b""  # a MAP or bypass domain cannot take tables
        table = (req.ste0, req.ste1)
        if domain is None:
            if len(self.domains) >= self.config.max_domains:
                return Status.S_NOMEM, b""
            domain = Domain(req.domain, bypass=False, table=table)
        elif domain.table != table:
            domain.table = table  # new tables for the whole domain
            for other in domain.endpoints - {ep.endpoint_id}:
                self.endpoints[other].table = table
                self._stream_changed(other)
        self._join(ep, domain, table)
        return Status.S_OK, b""

    def _invalidate(self, req) -> Reply:
        """Drop cached configuration (CDs) and/or translations of a table domain."""
        known_flags = int(InvalidateFlag.LEAF | InvalidateFlag.PASID | InvalidateFlag.ID
                          | InvalidateFlag.GLOBAL)
        if (not req.reserved_zero or req.flags & ~known_flags
                or req.caches & ~int(InvalidateCache.PASID | InvalidateCache.TLB)):
            return Status.S_INVAL, b""
        if req.scope not in set(InvalidateScope):
            return Status.S_INVAL, b""
        domain = self.domains.get(req.domain)
        if domain is None:
            return Status.S_NOENT, b""
        if domain.table is None:
            return Status.S_INVAL, b""  # MAP domains are kept exact by UNMAP
        size = 0
        if req.scope == InvalidateScope.ADDRESS:
            if not 12 <= req.page_size <= 63 or req.nr_pages == 0:
                return Status.S_INVAL, b""
            size = min(req.nr_pages << req.page_size, (1 << 64) - req.address)
        for endpoint_id in sorted(domain.endpoints):
            if req.caches & InvalidateCache.PASID:
                # The guest rewrote context descriptors, as before CFGI_CD: a PASID may have
                # been unbound, so its page requests drain, and CDs are re-read. (CFGI_CD is
                # the host's sync point for that on Arm: linux-kernel, "[RFC PATCHES 00/17]
                # IOMMUFD: Deliver IO page faults to user space", June 2023.)
                pasid = req.pasid if req.scope == InvalidateScope.PASID else None
                self._pasid_unbound(endpoint_id, pasid)
                self.endpoints[endpoint_id].config_fault = None
                self._stream_changed(endpoint_id)
            elif req.caches & InvalidateCache.TLB:
                for observer in self._observers:
                    observer.translations_invalidated(endpoint_id, req.address if size else 0,
                                                      size)
        return Status.S_OK, b""

    def _detach(self, req) -> Reply:
        ep = self.endpoints.get(req.endpoint)
        if ep is None:
            return Status.S_NOENT, b""
        if ep.domain is None or ep.domain != req.domain:
            return Status.S_INVAL, b""
        self._detach_endpoint(ep)
        self._pasid_unbound(ep.endpoint_id, None)
        self._stream_changed(ep.endpoint_id)
        return Status.S_OK, b""

    def _page_resp(self, req) -> Reply:
        """The guest's answer to a page request group it received as an extended fault."""
        if not req.reserved_zero or req.flags & ~PAGE_RESP_F_PASID_VALID:
            return Status.S_INVAL, b""
        if req.code not in set(PageRespCode):
            return Status.S_INVAL, b""
        if req.endpoint not in self.endpoints:
            return Status.S_NOENT, b""
        pasid = req.pasid if req.flags & PAGE_RESP_F_PASID_VALID else None
        if self.page_responder is None or not self.page_responder.guest_response(
                req.endpoint, pasid, req.grpid, PageRespCode(req.code)):
            return Status.S_NOENT, b""  # no such group is waiting (answered, or drained)
        return Status.S_OK, b""

    def _detach_endpoint(self, ep: EndpointState) -> None:
        domain = self.domains[ep.domain]
        domain.endpoints.discard(ep.endpoint_id)
        ep.domain = None
        ep.table = None
        if not domain.endpoints:  # the domain ceases to exist with its mappings
            del self.domains[domain.domain_id]
            self._map_domains_changed()

    def _map(self, req) -> Reply:
        if not self.negotiated(Feature.F_MAP_UNMAP):
            return Status.S_UNSUPP, b""
        domain = self.domains.get(req.domain)
        if domain is None:
            return Status.S_NOENT, b""
        if domain.bypass or domain.table is not None:
            return Status.S_INVAL, b""
        return Status(self.map_rules().map(domain.mappings, req.virt_start, req.virt_end,
                                           req.phys_start, req.flags, self.mapping_count)), b""

    def _unmap(self, req) -> Reply:
        if not self.negotiated(Feature.F_MAP_UNMAP):
            return Status.S_UNSUPP, b""
        if not req.reserved_zero:
            return Status.S_INVAL, b""
        domain = self.domains.get(req.domain)
        if domain is None:
            return Status.S_NOENT, b""
        if domain.bypass or domain.table is not None:
            return Status.S_INVAL, b""
        return Status(self.map_rules().unmap(domain.mappings, req.virt_start,
                                             req.virt_end)), b""

    def _probe(self, req) -> Reply | tuple[Status, bytes]:
        size = self.config.probe_size
        room = req.writable_len - 4
        if room < size:
            return Status.S_INVAL, bytes(room)  # no property written, tail after the buffer
        ep = self.endpoints.get(req.endpoint)
        if ep is None:
            return Status.S_NOENT, bytes(size)
        ep.probed = True
        props = self.probe_properties()
        return Status.S_OK, props + bytes(size - len(props))

    def probe_properties(self) -> bytes:
        return encode_resv_mem(ResvMemSubtype.MSI, *self.config.resv_msi)

    def _domain_in_range(self, domain_id: int) -> bool:
        if not self.negotiated(Feature.F_DOMAIN_RANGE):
            return True
        lo, hi = self.config.domain_range
        return lo <= domain_id <= hi

    # --- queries -------------------------------------------------------------------------------

    def endpoint_state(self, endpoint_id: int) -> dict:
        ep = self.endpoints[endpoint_id]
        domain = self.domains.get(ep.domain) if ep.domain is not None else None
        if ep.table is not None:
            mode = "page-table"
        elif domain is not None:
            mode = "bypass" if domain.bypass else "translated"
        else:
            mode = "bypass" if self.bypass else "blocked"
        state = {"endpoint": ep.endpoint_id, "domain": ep.domain, "mode": mode,
                 "probed": ep.probed, "config_fault": ep.config_fault, "origin": ep.origin}
        if ep.table is not None:
            state["ste"] = [f"{word:#018x}" for word in ep.table]
        return state
