"""./scripts/bench checks its arguments before it starts a run that takes half an hour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True,
                          timeout=60)


def test_bench_help_describes_its_options_and_runs_nothing() -> None:
    proc = bench("--help")
    assert proc.returncode == 0
    assert "--rounds" in proc.stdout and "--boot-rounds" in proc.stdout
    assert "==>" not in proc.stdout


def test_a_bad_bench_argument_is_one_line_before_anything_runs() -> None:
    for args, complaint in ((["--rounds", "x"], "'x': give a whole number >= 1"),
                            (["--maps", "0"], "'0': give a whole number >= 1"),
                            (["--bogus"], "unrecognized arguments: --bogus")):
        proc = bench(*args)
        assert proc.returncode == 2, args
        assert "==>" not in proc.stdout, args
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and complaint in errors[0], proc.stderr
