"""The CI matrix (.github/workflows/viommu.yml): actionlint (with shellcheck on its scripts)
finds nothing, and the matrix is what the README says: guest kernel x architecture, the test
command with options the plugin has, the results uploaded whatever the outcome."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "viommu.yml"
PLUGIN = ROOT / "controller" / "viommu" / "testing" / "pytest_plugin.py"


def tool(name: str) -> str:
    """A command the test extra installs into this environment (actionlint, shellcheck)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"no {name}: install the test extra (pip install -e '.[test]')")
    return found


def actionlint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("actionlint"), "-shellcheck", tool("shellcheck"), "-no-color",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_actionlint_finds_nothing_in_the_workflow() -> None:
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_and_shellcheck_do_check_it(tmp_path: Path) -> None:
    broken = tmp_path / ".github" / "workflows" / "viommu.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text().replace("${{ matrix.kernel }}", "${{ matrix.kernels }}", 1)
    broken.write_text(text.replace('"$GUEST_ARCH" = "$(uname -m)"', "$GUEST_ARCH = `uname -m`"))
    result = actionlint(broken)
    assert result.returncode == 1
    assert 'property "kernels" is not defined' in result.stdout
    assert "SC2006" in result.stdout  # shellcheck: backticks in a run script


def test_the_matrix_is_kernel_by_architecture_and_keeps_the_results() -> None:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    guest = jobs["guest"]
    assert guest["strategy"]["matrix"] == {"kernel": ["7", "6.12"], "arch": ["x86_64", "aarch64"]}
    assert guest["strategy"]["fail-fast"] is False
    steps = {step.get("name", step.get("uses")): step for step in guest["steps"]}
    assert "/dev/kvm" in steps["Use KVM where the runner offers it, else TCG"]["run"]

    command = steps["Test"]["run"].split()
    assert command[:2] == ["./scripts/test", "tests/e2e"]
    known = set(re.findall(r'addoption\("(--viommu-[a-z-]+)"', PLUGIN.read_text()))
    used = {word for word in command if word.startswith("--viommu-")}
    assert used == {"--viommu-kernel", "--viommu-arch", "--viommu-results"} and used <= known
    assert command[command.index("--viommu-results") + 1] == "results"

    for job in jobs.values():
        [upload] = [s for s in job["steps"] if s.get("uses", "").startswith(
            "actions/upload-artifact@")]
        assert upload["if"] == "always()" and upload["with"]["path"] == "results"
