"""PrivateNetwork (controller/network.py): everything it makes lives in its own namespace,
and close() takes it all away. Also the profile's [network] table."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from viommu.vm.network import PrivateNetwork, remove_stale_namespaces
from viommu.vm.profile import NetworkSpec, load_profile
from viommu.vm.viot import bdf

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a private network namespace "
                                "needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
TUNGETIFF = 0x800454D2
VNET_HDR = bytes(10)  # virtio_net_hdr: no offloads


def _links(namespace: str | None = None) -> dict[str, int | None]:
    """Link name → index of its master, in `namespace` (None: the host's)."""
    with IPRoute(**({"netns": namespace, "flags": 0} if namespace else {})) as ipr:
        by_index = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {link.get_attr("IFLA_IFNAME"): by_index.get(link.get_attr("IFLA_MASTER"))
                for link in ipr.get_links()}


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@needs_root
def test_bridge_and_taps_live_in_the_namespace_and_close_removes_them() -> None:
    host_before, fds_before = _links(), _open_fds()
    network = PrivateNetwork("seg0")
    taps = [network.add_tap(), network.add_tap()]
    assert network.namespace in netns.listnetns()
    links = _links(network.namespace)
    assert links["seg0"] is None
    assert {tap.name: links[tap.name] for tap in taps} == {"tap0": "seg0", "tap1": "seg0"}
    # Each fd is attached to its own tap, the one in the namespace.
    for tap in taps:
        ifr = fcntl.ioctl(tap.fd, TUNGETIFF, bytes(18))
        assert ifr[:16].rstrip(b"\0").decode() == tap.name
    assert _links() == host_before  # nothing was made in the host's namespace

    network.close()
    network.close()  # idempotent
    assert network.namespace not in netns.listnetns()
    assert not Path("/run/netns", network.namespace).exists()
    assert _open_fds() == fds_before
    assert _links() == host_before


@needs_root
def test_a_frame_sent_into_one_tap_comes_out_of_the_other() -> None:
    with PrivateNetwork() as network:
        a, b = network.add_tap(), network.add_tap()
        frame = (b"\xff" * 6 + bytes.fromhex("525400123400") + b"\x88\xb5"  # local experimental
                 + b"viommu".ljust(46, b"\0"))
        os.write(a.fd, VNET_HDR + frame)
        assert select.select([b.fd], [], [], 5)[0], "the bridge did not forward the frame"
        assert os.read(b.fd, 2048)[len(VNET_HDR):] == frame


@needs_root
def test_two_networks_get_two_namespaces() -> None:
    with PrivateNetwork() as one, PrivateNetwork() as two:
        assert one.namespace != two.namespace
        assert {one.namespace, two.namespace} <= set(netns.listnetns())


@needs_root
def test_a_dead_process_namespace_is_removed_by_the_next_network() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    name = f"viommu-{dead}-0"
    netns.create(name)
    try:
        assert name in remove_stale_namespaces()
        assert name not in netns.listnetns()
    finally:
        if name in netns.listnetns():
            netns.remove(name)


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_privileges_the_error_says_what_to_do() -> None:
    before = set(netns.listnetns())
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "from viommu.vm.network import PrivateNetwork; PrivateNetwork()"],
        capture_output=True, text=True)
    assert result.returncode != 0
    assert "NetworkError" in result.stderr and "needs root" in result.stderr
    assert set(netns.listnetns()) == before


def test_the_net_profile_puts_the_nic_on_the_root_bus() -> None:
    profile = load_profile("net")
    assert profile.network == NetworkSpec(name="net0", model="virtio-net-pci", addr=8)
    assert profile.network.mac(1) == "52:54:00:12:34:01"
    # The VIOT names only the root ports' buses: the NIC's requester ID is in none of them.
    nic = bdf(0, profile.network.addr)
    assert not any(r.bdf_start <= nic <= r.bdf_end for r in profile.viot_ranges())


def test_a_network_slot_taken_by_a_root_port_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "clash.toml"
    path.write_text('[machine]\nroot_ports = 4\n\n[network]\naddr = 5\n')
    with pytest.raises(ValueError, match="pick another pcie.0 slot"):
        load_profile(path)
