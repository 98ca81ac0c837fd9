"""Trace queries shared by the command groups: `limit` and the `since` cursor."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from viommu.transport.control import Arg, CommandError

TRACE_ARGS = (
    Arg("limit", (int,), help="trace entries to return (default 100): the newest, or with "
                              "`since` the oldest after it"),
    Arg("since", (int,), help="only entries with a larger seq: a cursor for following the trace"),
)


def _limit(args: dict) -> int:
    limit = args.get("limit", 100)
    if limit < 0:
        raise CommandError(f"limit must be >= 0, got {limit}")
    return min(limit, sys.maxsize)  # any larger limit means "all" (islice takes no more)


def trace_slice(trace: Iterable[Any], seq: Callable[[Any], int], args: dict) -> list:
    """The newest `limit` entries; with `since`, the oldest `limit` after it, so a client
    polling with the last seq it saw as its cursor misses nothing that is still kept."""
    limit = _limit(args)
    if "since" not in args:
        return list(trace)[-limit:] if limit else []
    since = args["since"]
    return list(itertools.islice((e for e in trace if seq(e) > since), limit))
