"""A Machine's NIC: a tap on its private network segment, which QEMU inherits as an fd."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viommu.vm.profile import NetworkSpec
from viommu.vm.qemu_cmdline import Nic

if TYPE_CHECKING:
    from viommu.vm.network import PrivateNetwork, Tap


class NicTap:
    def __init__(self, spec: NetworkSpec | None, network: PrivateNetwork | None) -> None:
        """`spec`: the profile's [network]; `network`: the segment to join. With neither
        there is no NIC; with a spec and no segment, the VM gets a segment of its own."""
        self.spec = spec or (NetworkSpec() if network is not None else None)
        self.network = network
        self._own_network: PrivateNetwork | None = None
        self._tap: Tap | None = None

    def nic(self) -> Nic | None:
        """The NIC for QEMU's command line; its tap is made on first use."""
        if self.spec is None:
            return None
        if self.network is None:
            from viommu.vm.network import PrivateNetwork  # pyroute2: only when a NIC is wanted

            self.network = self._own_network = PrivateNetwork(self.spec.name)
        if self._tap is None:
            self._tap = self.network.add_tap()
        return Nic(self.spec, self._tap.fd, self._tap.index)

    def pass_fds(self) -> tuple[int, ...]:
        return (self._tap.fd,) if self._tap is not None else ()

    def close(self) -> None:
        """Once QEMU is gone: remove the segment of its own (nothing holds it now)."""
        if self._own_network is not None:
            self._own_network.close()
            self.network = self._own_network = self._tap = None
