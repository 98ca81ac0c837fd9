"""Plain-text tables for the command line: `viommu ls` and `viommu state`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

MAX_MAPPINGS_SHOWN = 20


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row]
                                           for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in cells]
    return "\n".join(line.rstrip() for line in lines) + ("" if rows else "\n(none)")


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
                "upstream_lost")})),
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
