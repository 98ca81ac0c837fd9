"""Machine profiles: the data in qemu-configs/*.toml, checked against their schema
(viommu.vm.profile_schema), and what follows from it (BDFs, endpoint IDs, the VIOT ranges)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from viommu.vm import paths, profile_schema
from viommu.vm.viot import PciRange, bdf


class ProfileError(ValueError):
    """A profile that cannot be used: one line per problem, each naming the file, the key
    and what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclasses.dataclass(frozen=True)
class EndpointSpec:
    name: str
    port: int
    device: str
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """The profile's [network] table: one NIC on a private network segment
    (controller/network.py). The NIC sits on the root bus, which the VIOT does not cover: its
    DMA bypasses the vIOMMU."""

    name: str = "net0"  # the segment: the bridge's name, and QEMU's netdev id
    model: str = "virtio-net-pci"
    addr: int = 8  # slot on pcie.0
    # The VM's MAC is this plus the tap's index on the segment: unique on the segment.
    mac_prefix: str = "52:54:00:12:34"

    def mac(self, index: int) -> str:
        if not 0 <= index <= 0xff:
            raise ValueError(f"network {self.name}: a segment has MACs for 256 VMs, "
                             f"not {index + 1}")
        return f"{self.mac_prefix}:{index:02x}"


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    memory_mib: int = 512
    cpus: int = 1
    iommu_addr: int = 3
    # "viommu": our out-of-process device; "qemu": QEMU's own virtio-iommu-pci, the in-process
    # device users compare against (QEMU then builds the VIOT; no backend runs); "none": no
    # vIOMMU at all (the baseline for boot time).
    iommu: str = "viommu"
    root_ports: int = 4
    root_port_first_addr: int = 4
    # The guest architecture (x86_64, aarch64) and kernel SPEC (viommu.provision.kernels);
    # None: the Machine's, the environment's (VIOMMU_ARCH, VIOMMU_KERNEL) or the defaults.
    arch: str | None = None
    kernel: str | None = None
    kernel_modules: str | None = None  # with a kernel image: its lib/modules/<release>
    # The platform adds its serial console (console=ttyS0 or ttyAMA0) unless this names one.
    cmdline: str = "deferred_probe_timeout=-1 panic=-1 loglevel=4"
    cmdline_append: str = ""  # [kernel] append: after cmdline (iommu.strict=1, ...)
    endpoints: tuple[EndpointSpec, ...] = ()
    extra_args: tuple[str, ...] = ()
    # Guest-physical range the guest kernel never uses (memmap=SIZE$BASE marks it reserved):
    # tests write page tables and context descriptors there.
    table_area_base: int = 0x1000_0000
    table_area_size: int = 0x100_0000
    network: NetworkSpec | None = None

    @property
    def iommu_bdf(self) -> int:
        return bdf(0, self.iommu_addr)

    def port_bus(self, port: int) -> int:
        """Firmware numbers the root ports' secondary buses in slot order from 1."""
        if not 0 <= port < self.root_ports:
            raise ValueError(f"profile {self.name!r} has root ports 0..{self.root_ports - 1}, "
                             f"not {port}")
        return port + 1

    def endpoint_id(self, endpoint: EndpointSpec | str) -> int:
        """VIOT endpoint ID (= requester ID) of the function 0 device on the endpoint's port."""
        spec = self.endpoint(endpoint) if isinstance(endpoint, str) else endpoint
        return bdf(self.port_bus(spec.port), 0)

    def endpoint(self, name: str) -> EndpointSpec:
        for spec in self.endpoints:
            if spec.name == name:
                return spec
        raise KeyError(f"profile {self.name!r} has no endpoint {name!r}")

    def viot_ranges(self) -> list[PciRange]:
        """Every root port's bus: the endpoints plugged there are all the backend's."""
        return [PciRange(bdf(self.port_bus(p), 0), bdf(self.port_bus(p), 31, 7))
                for p in range(self.root_ports)]


def load_profile(name_or_path: str | Path) -> Profile:
    """The profile by name (qemu-configs/NAME.toml) or path; FileNotFoundError naming the
    known ones, ProfileError with one line per problem."""
    path = Path(name_or_path)
    if not path.suffix:
        path = paths.QEMU_CONFIGS / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in paths.QEMU_CONFIGS.glob("*.toml")))
        raise FileNotFoundError(f"no machine profile {name_or_path!r} (known: {known})")
    try:
        data = tomllib.loads(path.read_text(errors="replace"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError([f"{path}: not valid TOML: {exc}"]) from None
    problems = profile_schema.problems(path, data)
    if problems:
        raise ProfileError(problems)
    machine = {k: int(v, 0) if k.startswith("table_area") and isinstance(v, str) else v
               for k, v in data.get("machine", {}).items()}
    endpoints = tuple(
        EndpointSpec(ep["name"], ep["port"], ep["device"], ep.get("options", {}))
        for ep in data.get("endpoints", []))
    network = NetworkSpec(**data["network"]) if "network" in data else None
    return Profile(name=path.stem, endpoints=endpoints, network=network, **{
        k: tuple(v) if isinstance(v, list) else v for k, v in machine.items()},
        **_kernel_fields(path, data.get("kernel", {})))


# [kernel] keys and the Profile fields they set.
_KERNEL_KEYS = {"cmdline": "cmdline", "append": "cmdline_append", "source": "kernel",
                "modules": "kernel_modules"}


def _kernel_fields(path: Path, table: dict) -> dict:
    """[kernel]: `cmdline`, `append` (more arguments after it), `source` (a kernel SPEC: a
    Debian series, a build tree or an image) and `modules` (an image's
    lib/modules/<release>); paths are relative to the profile's own directory."""
    fields = {_KERNEL_KEYS[k]: v for k, v in table.items()}
    for key in ("kernel", "kernel_modules"):
        value = fields.get(key)
        if isinstance(value, str) and ("/" in value or value.startswith((".", "~"))):
            given = Path(value).expanduser()
            fields[key] = str(given if given.is_absolute() else path.parent / given)
    return fields
