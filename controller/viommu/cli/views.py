"""Tables for the command line (`viommu ls` and `viommu state`), laid out by rich."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

MAX_MAPPINGS_SHOWN = 20


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, no borders (so that scripts and grep read
    them as words); None shows as '-'."""
    grid = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0),
                 header_style=None)
    for header in headers:
        grid.add_column(str(header), no_wrap=True, overflow="ignore")
    for row in rows:
        grid.add_row(*("-" if v is None else str(v) for v in row))
    out = io.StringIO()
    Console(file=out, width=1 << 16, color_system=None, markup=False, highlight=False,
            emoji=False).print(grid)
    text = "\n".join(line.rstrip() for line in out.getvalue().splitlines())
    return text + ("" if rows else "\n(none)")


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def state_report(backend: Callable[..., Any]) -> str:
    """Endpoints, domains, mappings and counters of a running backend, as tables."""
    sections = [("endpoints", _endpoints(backend("query-endpoints")))]
    domains = backend("query-domains")
    sections += [("domains", _domains(domains)), ("mappings", _mappings(domains))]
    sections += [("counters", _counters(backend("query-requests", limit=0),
                                        backend("query-events", limit=0),
                                        backend("query-translations", limit=0)))]
    return "\n\n".join(f"{title}\n{body}" for title, body in sections)


def _endpoints(endpoints: list[dict]) -> str:
    return table(("endpoint", "bdf", "domain", "mode", "probed", "config fault"), [
        (f"{e['endpoint']:#x}", _bdf(e["endpoint"]), e["domain"], e["mode"],
         "yes" if e["probed"] else "no", e["config_fault"]) for e in endpoints])


def _domains(domains: list[dict]) -> str:
    return table(("domain", "endpoints", "bypass", "mappings", "tables (ste)"), [
        (d["domain"], " ".join(f"{e:#x}" for e in d["endpoints"]) or None,
         "yes" if d["bypass"] else "no", len(d["mappings"]), " ".join(d.get("ste", [])) or None)
        for d in domains])


def _mappings(domains: list[dict]) -> str:
    rows = [(d["domain"], f"{m['virt_start']:#x}", f"{m['virt_end']:#x}",
             f"{m['phys_start']:#x}", _map_flags(m["flags"]))
            for d in domains for m in d["mappings"]]
    text = table(("domain", "iova start", "iova end", "phys", "flags"),
                 rows[:MAX_MAPPINGS_SHOWN])
    if len(rows) > MAX_MAPPINGS_SHOWN:
        text += f"\n... {len(rows) - MAX_MAPPINGS_SHOWN} more (viommu state --json lists all)"
    return text


def _counters(requests: dict, events: dict, translations: dict) -> str:
    pri = events["page_requests"]
    rows = [("requests", _pairs(requests["counts"])),
            ("request status", _pairs(requests["status"])),
            ("events", _pairs({k: events[k] for k in (
                "injected", "delivered", "pending", "lost", "not_forwarded", "drained",
                "upstream_lost", "to_absent_endpoints")})),
            ("page requests", _pairs({k: pri[k] for k in (
                "requests", "groups", "pending_groups", "stop_markers", "timeouts",
                "overflows")}) + f" policy={pri['policy']}"),
            ("translations", f"transfers={translations['transfers']}")]
    return table(("what", "counts"), rows)


def _pairs(counts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items()) or "none"


def _map_flags(flags: int) -> str:
    # virtio-iommu VIRTIO_IOMMU_MAP_F_READ/WRITE/MMIO
    return "".join(c for bit, c in ((1, "R"), (2, "W"), (4, "M")) if flags & bit) or "-"


def _bdf(rid: int) -> str:
    return f"{rid >> 8:02x}:{rid >> 3 & 31:02x}.{rid & 7}"
