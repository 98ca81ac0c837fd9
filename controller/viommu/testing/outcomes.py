"""What became of each test: pytest reports a test in phases (setup, call, teardown); this
folds them into one outcome per test, in the order tests finished, for the KTAP and JSON
results (viommu.testing.ktap, viommu.testing.results). Only pytest and the standard library
are imported here: the plugin loads it in every pytest run."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

# What a result counts as, as kselftest counts (tools/testing/selftests/kselftest.h).
RESULTS = ("pass", "fail", "xfail", "xpass", "skip", "error")
FAILED = ("fail", "error")
# KCIDB's test status vocabulary (kernelci/kcidb-io schema), for results.json.
KCIDB_STATUS = {"pass": "PASS", "fail": "FAIL", "xfail": "PASS", "xpass": "PASS",
                "skip": "SKIP", "error": "ERROR"}
DETAIL_LINES = 15


@dataclasses.dataclass
class Outcome:
    nodeid: str
    result: str = "pass"  # one of RESULTS
    reason: str = ""  # one line: why it failed, erred or was skipped
    details: str = ""  # the failure as pytest printed it (its last lines)
    duration: float = 0.0

    @property
    def failed(self) -> bool:
        return self.result in FAILED


def _reason(report: Any) -> str:
    """One line saying why: a skip's reason, else the exception pytest reported."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, message)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else (report.longreprtext or "")
    # pytest's "E   " marks the exception's lines
    lines = [re.sub(r"^E\s+", "", line.strip()) for line in str(text).splitlines()
             if line.strip()]
    return lines[0] if crash is not None and lines else (lines[-1] if lines else "")


def _details(report: Any) -> str:
    """The exception pytest reported and where the test was when it was raised; else the
    last lines of the report."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is None:
        return "\n".join((report.longreprtext or "").rstrip().splitlines()[-DETAIL_LINES:])
    where = _test_frame(report) or f"{crash.path}:{crash.lineno}"
    return "\n".join([*crash.message.splitlines()[:DETAIL_LINES], f"at {where}"])


def _test_frame(report: Any) -> str | None:
    """path:line of the innermost traceback entry in the test's own file."""
    test_file = Path(report.location[0]).name
    entries = getattr(getattr(report.longrepr, "reprtraceback", None), "reprentries", [])
    places = [entry.reprfileloc for entry in entries
              if getattr(entry, "reprfileloc", None) is not None]
    mine = [p for p in places if Path(p.path).name == test_file]
    return f"{mine[-1].path}:{mine[-1].lineno}" if mine else None


class OutcomeLog:
    """Outcomes as the reports of their phases arrive (in xdist's controller too)."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._running: dict[str, Outcome] = {}

    def add(self, report: Any) -> Outcome | None:
        """Fold in one phase's TestReport; returns the test's Outcome once it is complete."""
        outcome = self._running.setdefault(report.nodeid, Outcome(report.nodeid))
        outcome.duration += report.duration
        xfail = hasattr(report, "wasxfail")
        if report.when == "setup" and not report.passed:
            outcome.result = "error" if report.failed else "xfail" if xfail else "skip"
            outcome.reason = report.wasxfail if xfail else _reason(report)
        elif report.when == "call":
            if xfail:  # pytest reports an expected failure as skipped, a non-strict pass passed
                outcome.result = "xfail" if report.skipped else "xpass"
                outcome.reason = report.wasxfail
            elif not report.passed:
                outcome.result = "fail" if report.failed else "skip"
                outcome.reason = _reason(report)
        elif report.when == "teardown" and report.failed and not outcome.failed:
            outcome.result = "error"
            outcome.reason = f"teardown: {_reason(report)}"
        if report.failed and not outcome.details:
            outcome.details = _details(report)
        if report.when != "teardown":
            return None
        self.outcomes.append(self._running.pop(report.nodeid))
        return outcome

    def add_collection_error(self, report: Any) -> None:
        """A test file that could not be collected: its tests never ran, which CI must see
        (once, though every xdist worker reports it)."""
        nodeid = report.nodeid or "collection"
        if all(outcome.nodeid != nodeid for outcome in self.outcomes):
            self.outcomes.append(Outcome(nodeid, "error", f"collection failed: "
                                         f"{_reason(report)}", _details(report)))

    def totals(self) -> dict[str, int]:
        counts = dict.fromkeys(RESULTS, 0)
        for outcome in self.outcomes:
            counts[outcome.result] += 1
        return counts
