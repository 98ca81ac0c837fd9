"""The guest tool's results on a console the kernel writes to as well: framed lines, read
whole and exact whatever kernel lines land inside them, or not at all."""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import pytest

from viommu.provision.arch import get_arch
from viommu.provision.initramfs import guest_tools
from viommu.vm import guest_tool

KERNEL = "[   77.231802] virtio_iommu virtio0: page fault from EP 512 at 0x300000 [W]\n"


def framed(payload: str) -> str:
    line = f"viommu-vfio: {payload}"
    return f"{line} crc={zlib.crc32(line.encode()):08x}\n"


DMA = framed("dma step=1 status=done error=0 fault_addr=0 bytes=4096 verify=ok irq=1 msi=ok "
             "repeat=1 ns=1058051")


@pytest.mark.parametrize("cut", [20, DMA.index("ns=") + 8, DMA.index("crc=") + 6, len(DMA) - 1],
                         ids=["early", "inside-a-value", "inside-the-crc", "before-the-newline"])
def test_a_kernel_line_inside_a_result_line_is_taken_out_and_the_result_read_exactly(
        cut: int) -> None:
    """As seen in DMA runs: `... ns=1058051[   77.231802] virtio_iommu virtio0: page
    fault ...` with the rest of the tool's line after the kernel's."""
    text = "~ # " + DMA[:cut] + KERNEL + DMA[cut:] + KERNEL
    [result] = guest_tool.results(text)
    assert result.kind == "dma"
    assert (result["step"], result["status"], result["ns"]) == ("1", "done", "1058051")


def test_half_a_result_line_or_a_damaged_one_is_no_result() -> None:
    assert guest_tool.results(DMA[:-12]) == []  # still arriving
    assert guest_tool.results(DMA.replace("status=done", "status=dome")) == []
    assert guest_tool.results(DMA.replace("ns=1058051", "ns=10580\n51")) == []  # not the kernel


def test_results_keep_their_order_words_and_quoted_values() -> None:
    text = (framed("dma ready step=1") + KERNEL + framed('error=2 what="open /dev/vfio: gone"')
            + "viommu-vfio: unframed=1\n" + framed("mapped iova=0x200000 size=0x3000 ro=0"))
    found = guest_tool.results(text)
    assert [r.kind for r in found] == ["dma ready", "", "mapped"]
    assert found[1]["what"] == "open /dev/vfio: gone"
    assert found[2].matches("mapped", iova="0x200000", size="0x3000")


def test_the_tool_frames_its_lines_as_the_parser_reads_them(tmp_path: Path) -> None:
    """The guest tool, built for this host, fails at once without VFIO: its error line,
    with a kernel line pushed inside it, is read back exactly."""
    arch = next(get_arch(name) for name in ("x86_64", "aarch64") if get_arch(name).native)
    path = tmp_path / "viommu-vfio"
    path.write_bytes(guest_tools(arch)["viommu-vfio"])
    path.chmod(0o755)
    printed = subprocess.run([path, "maplat", "0000:99:00.0", "1"], capture_output=True,
                             text=True).stdout
    [result] = guest_tool.results(printed[:30] + KERNEL + printed[30:])
    assert result.kind == "" and result["what"].startswith("open /dev/vfio/vfio: ")
