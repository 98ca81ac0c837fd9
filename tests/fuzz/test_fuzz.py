"""The atheris harnesses in CI: a short fuzzing run per harness, the committed corpora
replayed in-process, and each reported bug's regression input (tests/fuzz/crashes/).

    .venv/bin/python -m pytest tests/fuzz -q          # ~1 minute on 2 cores
    VIOMMU_FUZZ_SECONDS=120 .venv/bin/python -m pytest tests/fuzz -q -k runs_clean

A crash file (tests/fuzz/crashes/<harness>/) is named `<bug>--<variant>`, `<bug>` a key
of its harness's KNOWN_BUGS: while the bug is open the harness waives it, so fuzzing goes on
finding other bugs, and `test_no_crash_input_is_open` fails: nothing lands with an open bug.
Fix it, delete the waiver and move the file to tests/fuzz/regressions/<harness>/, whose
inputs (bugs found and fixed) must pass, strictly.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fuzzutil
import pytest

FUZZ_DIR = Path(__file__).resolve().parent
HARNESSES = ["fuzz_virtqueue", "fuzz_vhost_user", "fuzz_vfio_user", "fuzz_control",
             "fuzz_pagetables", "fuzz_iommufd", "fuzz_request_thread", "fuzz_blk_queue",
             "fuzz_event_thread"]
CI_SECONDS = int(os.environ.get("VIOMMU_FUZZ_SECONDS", "8"))
EXTRA_ARGS = {"fuzz_control": [f"-dict={FUZZ_DIR / 'control.dict'}"]}
MAX_SEED = 4096

pytestmark = pytest.mark.fuzz


def corpus(harness: str) -> list[Path]:
    return sorted((FUZZ_DIR / "corpus" / harness).iterdir())


@pytest.mark.parametrize("harness", HARNESSES)
def test_fuzzer_runs_clean(harness: str, tmp_path: Path) -> None:
    """libFuzzer for CI_SECONDS from a copy of the committed corpus: exits 0, no artifact."""
    work = tmp_path / "corpus"
    shutil.copytree(FUZZ_DIR / "corpus" / harness, work)
    env = {k: v for k, v in os.environ.items() if k != "VIOMMU_FUZZ_STRICT"}
    cmd = [sys.executable, str(FUZZ_DIR / f"{harness}.py"), f"-max_total_time={CI_SECONDS}",
           "-rss_limit_mb=2048", "-timeout=15", f"-artifact_prefix={tmp_path}/",
           *EXTRA_ARGS.get(harness, []), str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=CI_SECONDS + 90)
    artifacts = [p.name for p in tmp_path.iterdir()
                 if p.name.startswith(("crash-", "timeout-", "oom-", "leak-", "slow-unit-"))]
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0 and not artifacts, (
        f"{harness} exited {proc.returncode}, artifacts {artifacts}:\n{tail}")
    done = re.search(r"#(\d+)\s+DONE", proc.stderr)
    assert done and int(done.group(1)) > 0, f"{harness} ran nothing:\n{tail}"


@pytest.mark.parametrize("harness", HARNESSES)
def test_corpus_replays(harness: str) -> None:
    """Every committed seed passes the property, in-process (fast regression)."""
    module = importlib.import_module(harness)
    seeds = corpus(harness)
    assert seeds, f"no corpus for {harness}"
    for path in seeds:
        data = path.read_bytes()
        assert len(data) < MAX_SEED, f"{path.name}: {len(data)} bytes"
        module.one_input(data)


def input_dirs(kind: str) -> list[Path]:
    """tests/fuzz/<kind>/<harness>/ directories (crashes: open bugs; regressions: fixed)."""
    root = FUZZ_DIR / kind
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_no_crash_input_is_open() -> None:
    """tests/fuzz/crashes/<harness>/ holds inputs of bugs still open; nothing lands with one.
    Fix the bug, move its input to regressions/<harness>/ and drop its waiver."""
    open_inputs = [f"{d.name}/{p.name}" for d in input_dirs("crashes") for p in d.iterdir()]
    assert open_inputs == [], f"open fuzzing bugs (see tests/fuzz/crashes/README.md): {open_inputs}"


def test_a_crash_input_replays_strictly_as_its_bug() -> None:
    """How an open crash input is replayed while it waits for its fix: strictly (waivers
    off), so it fails with its bug. Checked on a synthetic input so that the mechanism
    stays tested while no bug is open."""
    def one_input(data: bytes) -> None:
        if data.startswith(b"bad"):
            fuzzutil.known_bug("example", "an example bug")

    one_input(b"bad input")  # waived while fuzzing
    with pytest.raises(fuzzutil.KnownBug, match="^example: an example bug"):
        replay_strictly(one_input, b"bad input")
    replay_strictly(one_input, b"good input")


def replay_strictly(one_input, data: bytes) -> None:
    was = fuzzutil.strict()
    fuzzutil.set_strict(True)
    try:
        one_input(data)
    finally:
        fuzzutil.set_strict(was)


def regression_cases():
    for harness_dir in input_dirs("regressions"):
        for path in sorted(harness_dir.iterdir()):
            yield pytest.param(harness_dir.name, path, id=f"{harness_dir.name}/{path.name}")


@pytest.mark.parametrize(("harness", "path"), list(regression_cases()))
def test_fixed_bug_regression(harness: str, path: Path) -> None:
    """An input that once showed a bug, since fixed: it passes, with every waiver off."""
    replay_strictly(importlib.import_module(harness).one_input, path.read_bytes())


def test_every_waiver_has_a_regression_input() -> None:
    for harness in HARNESSES:
        module = importlib.import_module(harness)
        crash_dir = FUZZ_DIR / "crashes" / harness
        paths = crash_dir.iterdir() if crash_dir.is_dir() else []
        files = {p.name.split("--")[0] for p in paths}
        known = set(getattr(module, "KNOWN_BUGS", {}))
        assert files == known, f"{harness}: waived {sorted(known)}, crash files {sorted(files)}"
