"""Test results as KTAP version 1 (Linux, Documentation/dev-tools/ktap.rst): what kernel CI
reads from kselftest and KUnit. One result line per pytest test, flat (every test is a
top-level test case, so TAP parsers that do not know KTAP's nesting still count them all):

    KTAP version 1
    # viommu: x86_64, kernel 7.0.4+deb13-amd64 (Debian 7), QEMU 11.1 (...)
    1..3
    ok 1 tests/test_faults.py::test_bad_ste # time=812ms
    # AssertionError: no console line matched ...
    not ok 2 tests/test_faults.py::test_bad_cd # time=20114ms
    ok 3 tests/test_faults.py::test_pri # SKIP needs a PRI endpoint
    # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0

A failure's reason and the last lines of its report come as diagnostic lines just before its
result line, as the specification recommends. SKIP, XFAIL and ERROR are KTAP directives;
`time=Nms` is free diagnostic data in the form netdev's CI (NIPA) takes durations from; the
closing `# Totals:` line is kselftest's (tools/testing/selftests/kselftest.h).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from viommu.testing.outcomes import Outcome

DIRECTIVES = {"skip": "SKIP", "xfail": "XFAIL", "error": "ERROR"}


def description(nodeid: str) -> str:
    """A test's name as KTAP allows it: no '#' (it starts the directive), one line."""
    return re.sub(r"\s+", " ", nodeid.replace("#", "_")).strip() or "unnamed"


def diagnostic(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines() if line.strip()]


def result_line(number: int, outcome: Outcome) -> str:
    status = "not ok" if outcome.failed else "ok"
    line = f"{status} {number} {description(outcome.nodeid)}"
    directive = DIRECTIVES.get(outcome.result)
    if directive:
        reason = " ".join(outcome.reason.replace("#", "_").split())
        return f"{line} # {directive} {reason}".rstrip()
    return f"{line} # time={round(outcome.duration * 1000)}ms"


def render(outcomes: Iterable[Outcome], header: Iterable[str] = (),
           totals: dict[str, int] | None = None) -> str:
    outcomes = list(outcomes)
    lines = ["KTAP version 1", *diagnostic("\n".join(header)), f"1..{len(outcomes)}"]
    for number, outcome in enumerate(outcomes, 1):
        if outcome.failed:
            lines += diagnostic(outcome.details or outcome.reason)
        lines.append(result_line(number, outcome))
    if totals is not None:
        lines.append("# Totals: " + " ".join(f"{k}:{v}" for k, v in totals.items()))
    return "\n".join(lines) + "\n"
