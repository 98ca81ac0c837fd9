"""The run's results for kernel CI, written when the session ends (by xdist's controller, which
sees every worker's reports): KTAP (--viommu-ktap FILE), and with --viommu-results DIR a
results.json (every test, with KCIDB's status words) and results.ktap beside the per-test
directories the workers write (viommu.testing.guest_record)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from viommu import __version__
from viommu.testing import ktap
from viommu.testing.guest_record import artifact_name
from viommu.testing.outcomes import KCIDB_STATUS, OutcomeLog


class ResultsReporter:
    """A plugin object: collects outcomes from the reports, writes the files at the end."""

    def __init__(self, ktap_path: str | None, results_dir: str | None, header: list[str],
                 choice: dict[str, Any]) -> None:
        self.ktap_path = Path(ktap_path) if ktap_path else None
        self.results_dir = Path(results_dir) if results_dir else None
        self.header = header
        self.choice = choice
        self.log = OutcomeLog()
        self.started = time.time()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.log.add(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.log.add_collection_error(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        totals = self.log.totals()
        text = ktap.render(self.log.outcomes, self.header, totals)
        if self.ktap_path is not None:
            _write(self.ktap_path, text)
        if self.results_dir is not None:
            _write(self.results_dir / "results.ktap", text)
            _write(self.results_dir / "results.json", json.dumps(
                self.summary(totals), indent=1) + "\n")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for path in (self.ktap_path, self.results_dir):
            if path is not None:
                terminalreporter.write_line(f"viommu: results in {path}")

    def summary(self, totals: dict[str, int]) -> dict[str, Any]:
        tests = []
        for outcome in self.log.outcomes:
            artifacts = self.results_dir / artifact_name(outcome.nodeid)
            tests.append({"name": outcome.nodeid, "result": outcome.result,
                          "status": KCIDB_STATUS[outcome.result], "reason": outcome.reason,
                          "duration": round(outcome.duration, 3),
                          "artifacts": artifacts.name if artifacts.is_dir() else None})
        return {"viommu": __version__, "guest": " ".join(self.header), **self.choice,
                "started": self.started, "duration": round(time.time() - self.started, 3),
                "totals": totals, "tests": tests}


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)
