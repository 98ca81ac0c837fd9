"""The virtio-iommu as a vhost-user device: what the front-end negotiates, the config space,
and the two rings, served by the request and event queues. It also keeps the device's
health: a driver that corrupts a ring breaks the device until the guest resets it.
"""

from __future__ import annotations

import logging

from viommu import _dataplane as hw
from viommu._dataplane import DataplaneLock, GuestMemory
from viommu.dataplane.eventq import EventQueue
from viommu.dataplane.requestq import RequestQueue, RequestThreadOptions
from viommu.dataplane.rings import Ring
from viommu.dataplane.translation import Translator
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.events.page_requests import Announcer, PageRequestRelay
from viommu.events.relay import EventRelay
from viommu.transport.sockets import Readers
from viommu.transport.vhost_user.connection import Vring
from viommu.transport.vhost_user.messages import ProtocolFeature
from viommu.uapi import NUM_QUEUES, VHOST_USER_F_PROTOCOL_FEATURES, VIOMMU_F_PAGE_REQUEST

log = logging.getLogger(__name__)

REQUESTQ = hw.VIRTIO_IOMMU_REQUESTQ
EVENTQ = hw.VIRTIO_IOMMU_EVENTQ


class IommuVhostDevice:
    """Implements `VhostUserDevice` for one `VirtioIommuDevice`."""

    num_queues = NUM_QUEUES

    def __init__(self, device: VirtioIommuDevice, relay: EventRelay,
                 page_requests: PageRequestRelay, translator: Translator,
                 announcer: Announcer,
                 requests: RequestThreadOptions | None = None) -> None:
        self.device = device
        self.relay = relay
        self.page_requests = page_requests
        self.translator = translator
        self.announcer = announcer
        self.request_options = requests or RequestThreadOptions()
        # Set by `use_threads` when the backend's loop shares the data plane with threads.
        self.thread: tuple[DataplaneLock, Readers] | None = None
        self.requestq: RequestQueue | None = None
        self.eventq = EventQueue(relay, self)
        self.memory: GuestMemory | None = None
        self.resets = 0
        self._broken: str | None = None

    def use_threads(self, lock: DataplaneLock, readers: Readers, requests: bool = True,
                    events: bool = True) -> None:
        """Serve the requestq and the eventq on threads of their own (ext/requestq.pxi,
        ext/eventq.pxi), sharing the data plane under `lock` with the loop whose `readers`
        hear their wake-ups."""
        if requests:
            self.thread = (lock, readers)
        if events:
            self.eventq.use_thread(lock, readers)

    # --- negotiation and config space ---------------------------------------------------

    def features(self) -> int:
        return VirtioIommuDevice.OFFERED_FEATURES | (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def protocol_features(self) -> int:
        return (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)

    def set_acked_features(self, features: int) -> None:
        self.device.accept_features(features)
        answers = self.device.negotiated(VIOMMU_F_PAGE_REQUEST)
        self.relay.extended = answers  # 32-byte records with PASID and group ID
        self.page_requests.guest_can_answer = answers
        if self.requestq is not None:
            self.requestq.configure()

    def get_config(self) -> bytes:
        return self.device.config_bytes()

    def set_config(self, offset: int, data: bytes) -> None:
        self.device.write_config(offset, data)

    def memory_changed(self, mem: GuestMemory) -> None:
        self.memory = mem
        self.translator.memory_changed(mem)

    # --- rings ------------------------------------------------------------------------------

    def queue_started(self, index: int, vring: Vring) -> bool:
        if index == EVENTQ:
            threaded = self.eventq.started(vring)
            log.info("queue %d started (size %d): the eventq%s", index, vring.vq.num,
                     ", served by the event thread" if threaded else "")
            return threaded
        self.requestq = RequestQueue(self.device, vring, self, self.thread,
                                     self.request_options)
        log.info("queue %d started (size %d): the requestq%s", index, vring.vq.num,
                 ", served by the request thread" if self.requestq.threaded else "")
        return self.requestq.threaded

    def queue_stopped(self, index: int) -> None:
        if index == EVENTQ:
            self.eventq.stopped()
        elif self.requestq is not None:
            self.requestq.stop()
            self.requestq = None
        log.info("queue %d stopped", index)

    def queue_call_changed(self, index: int) -> None:
        if index == EVENTQ:
            self.eventq.call_changed()

    def queue_kicked(self, index: int) -> None:
        if index == EVENTQ:
            self.eventq.kicked()
        elif self.requestq is not None:
            self.requestq.kicked()

    def rings(self) -> dict[int, Ring]:
        """The running rings, by queue index."""
        running: dict[int, Ring] = {}
        if self.requestq is not None:
            running[REQUESTQ] = self.requestq.ring
        if self.eventq.ring is not None:
            running[EVENTQ] = self.eventq.ring
        return running

    # --- health and reset ---------------------------------------------------------------------

    @property
    def broken(self) -> str | None:
        return self._broken

    def ring_broken(self, why: str, ring: Ring) -> None:
        # The driver corrupted a ring: stop serving it rather than guess. The next guest
        # reset restarts the rings and clears this.
        self._broken = why
        if self.requestq is not None:
            self.requestq.pause()
        self.eventq.pause()
        signalled = ring.signal_error()
        log.error("device broken until the guest resets it: %s (vring error fd %s)", why,
                  "signalled" if signalled else "absent")
        self.announcer.emit("DEVICE_BROKEN", {"reason": why, "vring_error_signalled": signalled})

    def reset(self, reason: str) -> None:
        self.resets += 1
        self._broken = None
        if self.requestq is not None:
            self.requestq.pause(False)
        self.eventq.pause(False)
        for sid in {g.key[0] for g in self.page_requests.pending.values()}:
            self.page_requests.drain(sid)  # nobody is left to answer them
        lost = self.relay.drop_pending(f"dropped by device reset: {reason}")
        self.device.reset()
        log.warning("device reset: %s (%d pending events counted lost)", reason, lost)
        self.announcer.emit("DEVICE_RESET", {"reason": reason, "lost_events": lost})
