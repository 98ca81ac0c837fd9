"""viommu as a user outside the checkout gets it: a wheel built from the checkout, installed
into a fresh virtualenv in a temporary directory. `viommu setup` and `viommu demo` work from
there, and so does the README's test project of one's own: one test file using the plugin's
fixtures and a profile of one's own, run with plain `pytest`; its results directory's
reproduce.sh boots the same VM again with the installed `viommu`.

The wheel is built once for the module (about a minute); the per-user cache is shared
through VIOMMU_CACHE, as a user's virtualenvs share it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tap.parser import Parser

from viommu.provision.cache import cache_root

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "my-viommu-tests"


def run(*args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 600
        ) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def source_tree(destination: Path) -> Path:
    """The checkout's files as git sees them (tracked, and new ones it does not ignore),
    without builds, caches or the virtualenv: what `pip install git+URL` would build."""
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source, target = ROOT / name, destination / name
        if source.exists() or source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    return destination


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """(the virtualenv's bin directory, the environment a user's shell would have)."""
    work = tmp_path_factory.mktemp("user")
    env = {**os.environ, "VIOMMU_CACHE": str(cache_root()),
           # short: unix socket paths of `viommu up` VMs live there
           "VIOMMU_RUN_DIR": tempfile.mkdtemp(prefix="viommu-user-")}
    for variable in ("VIOMMU_KERNEL", "VIOMMU_ARCH", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(variable, None)
    src = source_tree(work / "src")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", src, "-w", work / "dist",
        cwd=work, env=env)
    [wheel] = (work / "dist").glob("viommu-*.whl")
    run(sys.executable, "-m", "venv", work / "v", cwd=work, env=env)
    run(work / "v" / "bin" / "pip", "install", "-q", wheel, "pytest", cwd=work, env=env)
    env["PATH"] = f"{work / 'v' / 'bin'}{os.pathsep}{env['PATH']}"
    yield work / "v" / "bin", env
    shutil.rmtree(env["VIOMMU_RUN_DIR"], ignore_errors=True)


def test_setup_and_demo_from_an_installed_wheel(user: tuple[Path, dict[str, str]],
                                                tmp_path: Path) -> None:
    bin_dir, env = user
    setup = run(bin_dir / "viommu", "setup", cwd=tmp_path, env=env)
    assert re.search(r"^==> ready \(cache: .*\)$", setup.stdout, re.M), setup.stdout
    demo = run(bin_dir / "viommu", "demo", cwd=tmp_path, env=env)
    assert "RESULT: PASS (3/3 events produced the expected guest line)" in demo.stdout


def readme_project(destination: Path) -> list[str]:
    """Write the README's test project (its code blocks whose first line names a file in
    my-viommu-tests/) into `destination`; returns the file names."""
    readme = (ROOT / "README.md").read_text()
    written = []
    for block in re.findall(r"```\w*\n(.*?)```", readme, re.S):
        first = block.splitlines()[0]
        match = re.fullmatch(rf"# {PROJECT}/(\S+)(: .*)?", first)
        if match:
            (destination / match[1]).write_text(block)
            written.append(match[1])
    return written


def test_a_users_own_test_project_with_plain_pytest(user: tuple[Path, dict[str, str]],
                                                    tmp_path: Path) -> None:
    bin_dir, env = user
    project = tmp_path / PROJECT
    project.mkdir()
    assert sorted(readme_project(project)) == ["my-profile.toml", "test_faults.py"]
    readme = (ROOT / "README.md").read_text()
    command = re.search(rf"^\$ cd {PROJECT} && (pytest .*)$", readme, re.M)[1].split()
    result = run(bin_dir / command[0], *command[1:], cwd=project, env=env)
    assert " 2 passed in " in result.stdout.splitlines()[-1], result.stdout

    results = project / "results"
    ktap = [line for line in Parser().parse_text((results / "results.ktap").read_text())
            if line.category == "test"]
    assert [line.ok for line in ktap] == [True, True]
    [bad_ste] = results.glob("test_faults.py_test_bad_ste*")
    assert "unknown fault from EP 768" in (bad_ste / "console.log").read_text()
    reproducer = bad_ste / "reproduce.sh"
    assert str(project / "my-profile.toml") in reproducer.read_text()

    # The reproducer boots the same VM (the profile by its path) with the installed viommu.
    try:
        out = run(reproducer, "again", cwd=tmp_path, env=env).stdout
        assert "again is up as the test had it" in out
        state = run(bin_dir / "viommu", "state", "again", cwd=tmp_path, env=env).stdout
        assert re.search(r"^0x300\s+03:00\.0\s+\d+\s+translated\s+yes\s+C_BAD_STE$", state,
                         re.M), state
    finally:
        subprocess.run([bin_dir / "viommu", "down", "again"], env=env, capture_output=True,
                       timeout=120)
