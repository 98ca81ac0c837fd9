"""reproduce.sh: the `viommu up` command line that boots a test's VM again (profile, kernel,
architecture), then the events the test injected, as `viommu inject` commands."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from viommu import __version__
from viommu.cli.inject_options import options_from_fields


@dataclasses.dataclass(frozen=True)
class Injection:
    """One inject-event a test sent: its type, stream and arguments."""

    event: str
    sid: int | None
    fields: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.event} sid={self.sid if self.sid is None else hex(self.sid)} {self.fields}"


@dataclasses.dataclass(frozen=True)
class VmChoice:
    """What `viommu up` needs to boot the same VM."""

    profile: str  # a name in qemu-configs/ or an absolute path
    arch: str
    kernel: str | None  # the kernel SPEC, None for the default
    modules: str | None = None  # with an image kernel: its modules
    described: str = ""  # the exact kernel and QEMU the test ran on, for the comment


def up_command(vm: VmChoice, name: str = '"$NAME"') -> str:
    args = ["--arch", vm.arch]
    args += ["--kernel", vm.kernel] if vm.kernel else []
    args += ["--modules", vm.modules] if vm.modules else []
    return f'"$VIOMMU" up {shlex.quote(vm.profile)} --name {name} {shlex.join(args)}'


def inject_command(injection: Injection, name: str = '"$NAME"') -> str:
    options, rest = options_from_fields(injection.fields)
    sid = ["--sid", hex(injection.sid)] if injection.sid is not None else []
    line = f'"$VIOMMU" inject {name} ' + shlex.join([injection.event, *sid, *options])
    return line + (f"  # not expressible as options: {rest}" if rest else "")


def script(nodeid: str, vm: VmChoice, injections: list[Injection]) -> str:
    lines = [
        "#!/bin/sh",
        f"# Boots the VM of {nodeid} again (viommu {__version__}) and injects the",
        "# events the test injected, in order. The test ran on:",
        f"#   {vm.described or vm.arch}",
        "# Usage: ./reproduce.sh [NAME]; VIOMMU=/path/to/viommu picks the command. The VM",
        "# keeps running: `viommu console NAME`, `viommu trace NAME`, `viommu down NAME`.",
        "set -eu",
        'NAME="${1:-repro}"',
        'VIOMMU="${VIOMMU:-viommu}"',
        up_command(vm),
        *(inject_command(injection) for injection in injections),
        'echo "$NAME is up as the test had it: $VIOMMU console $NAME; $VIOMMU down $NAME"',
    ]
    return "\n".join(lines) + "\n"
