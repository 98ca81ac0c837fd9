"""What a machine profile (qemu-configs/*.toml) may say: every table, key, type and range,
checked before anything is built from it. `problems()` returns one line per problem, each
naming the file, the key and what is allowed, so that a bad profile ends in those lines and
never in a traceback or a QEMU command line with `-m lots`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from viommu.provision.arch import ARCHES

MAX_SLOT = 31  # PCI device numbers on the root bus pcie.0 (0 is the host bridge)
IOMMU_KINDS = ("viommu", "qemu", "none")
QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")  # QEMU's id_wellformed()
MAC_PREFIX = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){4}")
BRIDGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # a Linux interface name (IFNAMSIZ - 1)


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a table: what it must be (a check returning the problem, or None) and the
    words that say so."""

    allowed: str
    check: Callable[[Any], bool]
    required: bool = False


def _integer(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _address(v: Any) -> bool:
    """An integer, or a string holding one ("0x10000000")."""
    return _as_int(v) is not None and _as_int(v) >= 0


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            return None
    return None


def _string(pattern: re.Pattern | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and (pattern is None or bool(pattern.fullmatch(v)))


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _string_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(item, str) for item in v)


def _option_table(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(item, (str, int, bool)) for item in v.values())


MACHINE = {
    "memory_mib": Key("an integer number of MiB, 64..1048576", _integer(64, 1 << 20)),
    "cpus": Key("an integer, 1..256", _integer(1, 256)),
    "iommu": Key(f"one of {', '.join(IOMMU_KINDS)}", _one_of(*IOMMU_KINDS)),
    "iommu_addr": Key(f"a slot on pcie.0, 1..{MAX_SLOT}", _integer(1, MAX_SLOT)),
    "root_ports": Key(f"an integer, 0..{MAX_SLOT}", _integer(0, MAX_SLOT)),
    "root_port_first_addr": Key(f"a slot on pcie.0, 1..{MAX_SLOT}", _integer(1, MAX_SLOT)),
    "arch": Key(f"one of {', '.join(sorted(ARCHES))}", _one_of(*ARCHES)),
    "table_area_base": Key('a guest-physical address: an integer or a string like '
                           '"0x10000000"', _address),
    "table_area_size": Key('a size in bytes: an integer or a string like "0x1000000"',
                           _address),
    "extra_args": Key("a list of strings (QEMU arguments)", _string_list),
}
KERNEL = {
    "cmdline": Key("a string (the kernel command line)", _string()),
    "append": Key("a string (more kernel arguments, after cmdline)", _string()),
    "source": Key("a string: a Debian series (7, 6.12), a kernel build tree or an image",
                  _string()),
    "modules": Key("a string: an image's lib/modules/<release> directory", _string()),
}
ENDPOINT = {
    "name": Key("a QEMU device id: a letter, then letters, digits, '_', '.', '-'",
                _string(QEMU_ID), required=True),
    "port": Key("the number of a root port of [machine] root_ports", _integer(0, MAX_SLOT),
                required=True),
    "device": Key("a string: the QEMU device (pci-testdev, ...)", _string(), required=True),
    "options": Key("a table of -device properties (strings, integers, booleans)",
                   _option_table),
}
NETWORK = {
    "name": Key("an interface name: 1-15 letters, digits, '_', '.', '-'",
                _string(BRIDGE_NAME)),
    "model": Key("a string: the NIC's QEMU device", _string()),
    "addr": Key(f"a slot on pcie.0, 1..{MAX_SLOT}", _integer(1, MAX_SLOT)),
    "mac_prefix": Key("five octets like 52:54:00:12:34", _string(MAC_PREFIX)),
}
TABLES = {"machine": MACHINE, "kernel": KERNEL, "endpoints": ENDPOINT, "network": NETWORK}
# What the Profile dataclass falls back on (viommu.vm.profile), for the checks across keys.
DEFAULTS = {"memory_mib": 512, "iommu_addr": 3, "root_ports": 4, "root_port_first_addr": 4,
            "table_area_base": 0x1000_0000, "table_area_size": 0x100_0000}


def problems(path: Path, data: dict) -> list[str]:
    """Every problem of a parsed profile, one line each."""
    found = []
    for table in data:
        if table not in TABLES:
            found.append(f"{path}: unknown table [{table}] (known: "
                         f"{', '.join(f'[{t}]' for t in TABLES)})")
    for table in ("machine", "kernel", "network"):
        if table in data:
            found += _table(path, f"[{table}]", data[table], TABLES[table])
    endpoints = data.get("endpoints", [])
    if not isinstance(endpoints, list):
        found.append(f"{path}: endpoints must be an array of tables ([[endpoints]])")
        endpoints = []
    for index, endpoint in enumerate(endpoints):
        found += _table(path, f"[[endpoints]] #{index + 1}", endpoint, ENDPOINT)
    if not found:
        found += _across(path, data.get("machine", {}), endpoints, data.get("network"))
    return found


def _table(path: Path, where: str, table: Any, keys: dict[str, Key]) -> list[str]:
    if not isinstance(table, dict):
        return [f"{path}: {where} must be a table"]
    found = [f"{path}: {where} unknown key {key!r} (known: {', '.join(keys)})"
             for key in table if key not in keys]
    for key, spec in keys.items():
        if key not in table:
            if spec.required:
                found.append(f"{path}: {where} {key} is missing: {spec.allowed}")
        elif not spec.check(table[key]):
            found.append(f"{path}: {where} {key} must be {spec.allowed}, not {table[key]!r}")
    return found


def _across(path: Path, machine: dict, endpoints: list[dict], network: dict | None
            ) -> list[str]:
    """What one key allows given another: ports within root_ports, slots apart, the table
    area within RAM."""
    m = {**DEFAULTS, **machine}
    found = []
    ports = range(m["root_ports"])
    first, last = m["root_port_first_addr"], m["root_port_first_addr"] + m["root_ports"] - 1
    if m["root_ports"] and last > MAX_SLOT:
        found.append(f"{path}: [machine] root ports take slots {first}..{last} of pcie.0, "
                     f"which has {MAX_SLOT}: fewer root_ports, or a lower root_port_first_addr")
    if m["root_ports"] and first <= m["iommu_addr"] <= last:
        found.append(f"{path}: [machine] iommu_addr {m['iommu_addr']} is a root port's slot "
                     f"({first}..{last}): pick another")
    seen: dict[str, dict] = {}
    for index, endpoint in enumerate(endpoints, 1):
        if endpoint["port"] not in ports:
            found.append(f"{path}: [[endpoints]] #{index} port must be a root port, "
                         f"0..{m['root_ports'] - 1} ([machine] root_ports = {m['root_ports']}), "
                         f"not {endpoint['port']}")
        for key in ("name", "port"):
            if endpoint[key] in seen.get(key, {}):
                found.append(f"{path}: [[endpoints]] #{index} {key} {endpoint[key]!r} is "
                             f"already endpoint #{seen[key][endpoint[key]]}'s")
            seen.setdefault(key, {})[endpoint[key]] = index
    base, size = _as_int(m["table_area_base"]), _as_int(m["table_area_size"])
    if size and base + size > m["memory_mib"] << 20:
        found.append(f"{path}: [machine] the table area {base:#x}..{base + size - 1:#x} "
                     f"(table_area_base, table_area_size) is past the {m['memory_mib']} MiB of "
                     "RAM: move it, shrink it, or give more memory_mib")
    if size and (base % 4096 or size % 4096):
        found.append(f"{path}: [machine] table_area_base and table_area_size must be "
                     f"multiples of 4 KiB, not {base:#x} and {size:#x}")
    if network is not None and "addr" in network:
        taken = {m["iommu_addr"], *range(first, last + 1)}
        if network["addr"] in taken:
            found.append(f"{path}: [network] addr {network['addr']:#x} is taken by the IOMMU "
                         f"or a root port (taken: {sorted(taken)}); pick another pcie.0 slot")
    return found
