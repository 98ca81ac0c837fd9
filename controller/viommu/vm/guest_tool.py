"""The results of the guest tool (`viommu-vfio`, guest-images/tools/), read from the console.

The tool shares the serial console with the kernel, and the kernel's lines land anywhere,
even inside one of the tool's lines: printk writes to the UART directly while the tty layer
is still sending the tool's line, so a line arrives as `viommu-vfio: dma ... ns=10580` +
`[   77.231802] virtio_iommu virtio0: page fault ...` + `51 crc=...`. The kernel's lines are
whole (one console record is written at once), the tool's are one write() each. So:

- the tool frames each result: `viommu-vfio: WORDS key=value ... crc=XXXXXXXX`, the CRC-32
  of everything before ` crc=`;
- `program_text` takes every kernel line out of the text, wherever it starts;
- `results` keeps the framed lines whose CRC holds. A line still arriving, or damaged in any
  other way, is not a result: nothing is ever read from half a line or a line with a kernel
  line inside it.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
import zlib
from typing import TYPE_CHECKING

from viommu.vm.console import KERNEL_LINE, ConsoleError

if TYPE_CHECKING:
    from viommu.vm.console import Console

PREFIX = "viommu-vfio: "
# A framed line, wherever it starts (after a prompt, say) and up to the end of its line.
FRAMED = re.compile(rf"({re.escape(PREFIX)}[^\n]*) crc=([0-9a-f]{{8}})$", re.M)


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """One result line: its leading words (`kind`: "dma", "dma ready", "mapped", "maplat",
    "" for `bound=...`) and its key=value fields, as text."""

    kind: str
    fields: dict[str, str]
    line: str

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def matches(self, kind: str, **fields: object) -> bool:
        return self.kind == kind and all(self.fields.get(k) == str(v) for k, v in fields.items())


def program_text(text: str) -> str:
    """`text` without the kernel's console lines, wherever they landed."""
    return KERNEL_LINE.sub("", text)


def results(text: str) -> list[ToolResult]:
    """Every whole, intact result line in console text, in order."""
    found = []
    for match in FRAMED.finditer(program_text(text)):
        line, crc = match.group(1), int(match.group(2), 16)
        if zlib.crc32(line.encode()) != crc:
            continue
        words, fields = [], {}
        for token in shlex.split(line[len(PREFIX):]):
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
            else:
                words.append(token)
        found.append(ToolResult(" ".join(words), fields, line))
    return found


def wait_result(console: Console, kind: str, since: int = 0, timeout: float = 30,
                **fields: object) -> ToolResult:
    """The first result of `kind` (with these field values) printed after `since`; waits up
    to `timeout` seconds for it (ConsoleError after)."""
    deadline = time.monotonic() + timeout
    while True:
        for found in results(console.transcript[since:]):
            if found.matches(kind, **fields):
                return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            wanted = " ".join([kind, *(f"{k}={v}" for k, v in fields.items())])
            raise ConsoleError(f"the guest tool printed no {wanted!r} result within "
                               f"{timeout:g} s; console since the mark:\n"
                               f"{console.transcript[since:][-2000:]}")
        console.pump(min(remaining, 0.2))
