"""A private network segment for test VMs: a network namespace of our own with a bridge and
one tap per VM NIC, made with pyroute2.

Nothing is created in the host's namespace: the VMs talk to each other through the bridge
and to nothing else, and parallel test processes (pytest-xdist workers) each get their own
namespace. QEMU gets each tap as an open fd (`-netdev tap,fd=N`); a tap QEMU opened by name
would be looked up, or created, in the host's namespace instead.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import logging
import os
import struct
import threading

import psutil
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

NAMESPACE_PREFIX = "viommu-"
TUN_DEVICE = "/dev/net/tun"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# QEMU's own choice for a tap it opens itself: no packet-info header, and a virtio-net header
# so that virtio-net can hand checksum and segmentation offloads through.
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR

_counter = itertools.count()


class NetworkError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Tap:
    """A tap on the segment's bridge, and the fd that QEMU takes as `-netdev tap,fd=`."""

    name: str
    index: int  # the n-th tap of its network, from 0
    fd: int


class PrivateNetwork:
    """A bridge named `name` in a fresh network namespace; `add_tap()` plugs one VM NIC in.

    The namespace is created by the constructor and removed by `close()` (idempotent), or at
    the end of a `with` block. Needs root, or CAP_SYS_ADMIN and CAP_NET_ADMIN.
    """

    def __init__(self, name: str = "net0") -> None:
        self.name = name
        # Unique per process and per object: pytest-xdist workers and several segments in one
        # process never share a namespace.
        self.namespace = f"{NAMESPACE_PREFIX}{os.getpid()}-{next(_counter)}"
        self.taps: list[Tap] = []
        self._ipr: IPRoute | None = None
        self._lock = threading.Lock()
        remove_stale_namespaces()
        try:
            netns.create(self.namespace)
            self._ipr = IPRoute(netns=self.namespace, flags=0)
            # Ports forward at once: with STP off there is no listening/learning delay.
            self._ipr.link("add", ifname=name, kind="bridge", br_forward_delay=0)
            self._bridge = self._ipr.link_lookup(ifname=name)[0]
            self._ipr.link("set", index=self._bridge, state="up")
        except BaseException as exc:
            self.close()
            if isinstance(exc, (OSError, NetlinkError)):
                raise _explain(exc, f"creating bridge {name} in network namespace "
                                    f"{self.namespace}") from exc
            raise
        log.info("network %s: bridge %s in namespace %s", name, name, self.namespace)

    def __enter__(self) -> PrivateNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_tap(self) -> Tap:
        """A new tap on the bridge, up, with an fd open on it for QEMU (close-on-exec: pass it
        with `subprocess.Popen(pass_fds=...)`). It lives until `close()`."""
        with self._lock:
            if self._ipr is None:
                raise NetworkError(f"network {self.name} is closed: create a new "
                                   "PrivateNetwork")
            index = len(self.taps)
            name = f"tap{index}"
            try:
                # Persistent, so it outlives QEMU's fd and a VM can boot again on it.
                self._ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                               ifr={"no_pi": True, "vnet_hdr": True})
                self._ipr.link("set", ifname=name, master=self._bridge, state="up")
                fd = self._open_tap(name)
            except (OSError, NetlinkError) as exc:
                raise _explain(exc, f"creating tap {name} in {self.namespace}") from exc
            tap = Tap(name, index, fd)
            self.taps.append(tap)
            return tap

    def _open_tap(self, name: str) -> int:
        """An fd on tap `name`, opened by a thread that has entered the namespace: the tun
        device finds taps in the opener's namespace, and setns() changes only the calling
        thread, so this process never leaves the host's namespace, even on an error. (Python
        3.11 has no os.setns; pyroute2's is used.)"""
        fds: list[int] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                netns.setns(self.namespace, flags=0)
                fds.append(_open_tap(name))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{self.namespace}")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return fds[0]

    def close(self) -> None:
        """Close the taps' fds and remove the namespace (its bridge and taps go with it).
        A QEMU still running keeps its own tap fds, and with them the namespace, until it
        exits; nothing is left behind after that."""
        with self._lock:
            for tap in self.taps:
                try:
                    os.close(tap.fd)
                except OSError:
                    pass
            self.taps.clear()
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            if self.namespace in netns.listnetns():
                netns.remove(self.namespace)
                log.info("network %s: namespace %s removed", self.name, self.namespace)


def _open_tap(name: str) -> int:
    """Attach a new fd to tap `name` of the calling thread's namespace."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_namespaces() -> list[str]:
    """Remove the namespaces of PrivateNetworks whose process is gone (killed before it could
    close them); returns their names."""
    removed = []
    for name in netns.listnetns():
        pid = name.removeprefix(NAMESPACE_PREFIX).split("-")[0]
        if name.startswith(NAMESPACE_PREFIX) and pid.isdigit() and not psutil.pid_exists(int(pid)):
            try:
                netns.remove(name)
                removed.append(name)
            except OSError as exc:
                log.warning("could not remove stale network namespace %s: %s", name, exc)
    return removed




def _explain(exc: OSError | NetlinkError, doing: str) -> NetworkError:
    """The error in terms of what the user can do about it."""
    code = exc.errno if isinstance(exc, OSError) else exc.code
    if code in (errno.EPERM, errno.EACCES):
        advice = ("this needs root (CAP_SYS_ADMIN to mount the namespace under /run/netns, "
                  "CAP_NET_ADMIN for its links): run as root, or use a profile without a "
                  "[network] table")
    elif code == errno.ENOENT and getattr(exc, "filename", None) == TUN_DEVICE:
        advice = f"{TUN_DEVICE} is missing: load the tun module (modprobe tun)"
    elif code == errno.EOPNOTSUPP:
        advice = "the kernel lacks bridge or tun support: load the bridge and tun modules"
    else:
        advice = "see the error above"
    return NetworkError(f"{doing}: {exc}; {advice}")
