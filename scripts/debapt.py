"""Fetch Debian packages with a private apt state: nothing on the system changes, no root.

The archive URI is taken from the system's own apt sources (so a local mirror or proxy is
honoured); VIOMMU_DEBIAN_MIRROR overrides it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def progress(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def system_mirror() -> str:
    env = os.environ.get("VIOMMU_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    candidates += [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(
                r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in uri and "debian" in uri:
                return uri.rstrip("/")
    sys.exit("error: no Debian archive found in /etc/apt; set VIOMMU_DEBIAN_MIRROR to the "
             "URI of a Debian archive")


class PrivateApt:
    """apt-get/apt-cache over a state directory of our own, for one or more suites."""

    def __init__(self, state: Path, suites: list[str], default_release: str = "") -> None:
        self.state = state
        self.suites = suites
        self.default_release = default_release
        for sub in ("lists/partial", "cache/archives/partial"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        (state / "status").touch()
        mirror = system_mirror()
        lines = [f"deb [signed-by={KEYRING}] {mirror} {suite} main" for suite in suites]
        (state / "sources.list").write_text("\n".join(lines) + "\n")

    def _options(self) -> list[str]:
        s = self.state
        opts = {
            "Dir::Etc::SourceList": s / "sources.list", "Dir::Etc::SourceParts": "/dev/null",
            "Dir::State::Lists": s / "lists", "Dir::State::Status": s / "status",
            "Dir::Cache": s / "cache", "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null", "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else os.environ.get("USER", ""),
            "APT::Architecture": "amd64", "APT::Architectures": "amd64",
            "APT::Install-Recommends": "0",
            "APT::Default-Release": self.default_release,
        }
        out = []
        for key, value in opts.items():
            if value != "":
                out += ["-o", f"{key}={value}"]
        return out

    def run(self, tool: str, *args: str, quiet: bool = True) -> str:
        cmd = [tool, *self._options(), *args]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"error: {' '.join([tool, *args])} failed:\n{result.stderr.strip()}")
        return result.stdout

    def update(self) -> None:
        progress(f"reading Debian package lists ({', '.join(self.suites)})")
        self.run("apt-get", "update")

    def download_closure(self, *packages: str, release: str | None = None) -> list[Path]:
        """Download packages and everything they depend on; returns the .deb files."""
        args = ["install", "--download-only", "-y", "--no-install-recommends"]
        if release:
            args += ["-t", release]
        self.run("apt-get", *args, *packages)
        return sorted((self.state / "cache" / "archives").glob("*.deb"))

    def download(self, package: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", *self._options(), "download", package], cwd=dest,
                       check=True, capture_output=True)
        return max(dest.glob(f"{package.split('=')[0]}_*.deb"), key=lambda p: p.stat().st_mtime)

    def depends_on(self, package: str, prefix: str) -> list[str]:
        """Dependencies of `package` whose names start with `prefix` (resolves a metapackage
        such as linux-image-amd64 to the versioned packages it stands for)."""
        out = self.run("apt-cache", "depends", package)
        names = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Depends:"):
                name = line.removeprefix("Depends:").strip()
                if name.startswith(prefix):
                    names.append(name)
        return names


def extract(deb: Path, dest: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
