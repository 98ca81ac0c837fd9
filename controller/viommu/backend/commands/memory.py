"""Guest memory from the host's side: read and write guest-physical memory (tables in the
reserved area), and the host's stage 2 over it (revoke or write-protect DMA)."""

from __future__ import annotations

from typing import Any

from viommu._dataplane import Engine, GuestMemory
from viommu.dataplane.translation import Translator
from viommu.transport.control import Arg, Command, CommandError, ControlServer

MAX_MEMORY_ACCESS = 1 << 20
_NO_MEMORY = "no guest memory yet: the VM has not sent its memory table"


class MemoryCommands:
    def __init__(self, translator: Translator) -> None:
        self.translator = translator  # it follows the guest's memory table

    def register(self, control: ControlServer) -> None:
        control.register(Command("memory-read", self.memory_read, (
            Arg("gpa", (int,), True), Arg("size", (int,), True)),
            help="Read guest-physical memory (hex)"))
        control.register(Command("memory-write", self.memory_write, (
            Arg("gpa", (int,), True), Arg("data", (str,), True, "hex bytes")),
            help="Write guest-physical memory, e.g. page tables in the reserved range"))
        control.register(Command("stage2-set", self.stage2_set, (
            Arg("ipa", (int,), True), Arg("size", (int,), True),
            Arg("access", (str,), True, "rw, ro or none")),
            help="Host stage 2: revoke (none) or write-protect (ro) guest RAM for DMA"))
        control.register(Command("stage2-reset", self.stage2_reset,
                                 help="Host stage 2: every guest RAM page read-write again"))

    def _memory(self) -> GuestMemory:
        mem = self.translator.mem
        if mem is None or not mem.regions_info:
            raise CommandError(_NO_MEMORY)
        return mem

    def _engine(self) -> Engine:
        if self.translator.engine is None:
            raise CommandError(_NO_MEMORY)
        return self.translator.engine

    def memory_read(self, args: dict[str, Any]) -> dict:
        size = args["size"]
        if not 0 < size <= MAX_MEMORY_ACCESS:
            raise CommandError(f"size must be 1..{MAX_MEMORY_ACCESS}, got {size}")
        gpa = address_arg(args, "gpa")
        try:
            return {"data": self._memory().read(gpa, size).hex()}
        except (ValueError, OverflowError) as exc:
            raise CommandError(str(exc)) from None

    def memory_write(self, args: dict[str, Any]) -> dict:
        try:
            data = bytes.fromhex(args["data"])
        except ValueError:
            raise CommandError("data must be hex digits, two per byte") from None
        if not 0 < len(data) <= MAX_MEMORY_ACCESS:
            raise CommandError(f"data must be 1..{MAX_MEMORY_ACCESS} bytes, got {len(data)}")
        gpa = address_arg(args, "gpa")
        try:
            self._memory().write(gpa, data)
        except (ValueError, OverflowError) as exc:
            raise CommandError(str(exc)) from None
        return {"written": len(data)}

    def stage2_set(self, args: dict[str, Any]) -> dict:
        access = args["access"]
        if access not in ("rw", "ro", "none"):
            raise CommandError(f"access must be rw, ro or none, not {access!r}")
        ipa, size = address_arg(args, "ipa"), args["size"]
        if size <= 0:
            raise CommandError(f"size must be positive, got {size}")
        try:
            pages = self._engine().s2_set_perm(ipa, size, access != "none", access == "rw")
        except (ValueError, OverflowError) as exc:
            raise CommandError(str(exc)) from None
        return {"pages": pages}

    def stage2_reset(self, args: dict[str, Any]) -> dict:
        self._engine().s2_reset()
        return {}


def address_arg(args: dict[str, Any], name: str) -> int:
    """A guest-physical address argument: a 64-bit unsigned number."""
    value = args[name]
    if not 0 <= value < 1 << 64:
        raise CommandError(f"{name} is a 64-bit guest-physical address, 0..{(1 << 64) - 1:#x}; "
                           f"got {value}")
    return value
