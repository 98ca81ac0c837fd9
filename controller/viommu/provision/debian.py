"""Debian packages through a private apt state: nothing on the system changes, no root.

The archive URI is taken from the system's own apt sources (so a local mirror or proxy is
honoured); VIOMMU_DEBIAN_MIRROR overrides it. One state directory per set of suites and
architecture, under the cache.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from viommu.provision.cache import SetupMissing, progress

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def system_mirror() -> str:
    env = os.environ.get("VIOMMU_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    sources = Path("/etc/apt/sources.list.d")
    candidates = sorted(sources.glob("*.sources"))
    candidates += [Path("/etc/apt/sources.list"), *sources.glob("*.list")]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(
                r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in uri and "debian" in uri:
                return uri.rstrip("/")
    raise SetupMissing("no Debian archive found in /etc/apt; set VIOMMU_DEBIAN_MIRROR to the "
                       "URI of a Debian archive (e.g. http://deb.debian.org/debian)")


class PrivateApt:
    """apt-get/apt-cache over a state directory of our own, for some suites and one
    architecture."""

    def __init__(self, state: Path, suites: list[str], architecture: str,
                 default_release: str = "") -> None:
        self.state = state
        self.suites = suites
        self.architecture = architecture
        self.default_release = default_release
        self._updated = False
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
            "APT::Architecture": self.architecture, "APT::Architectures": self.architecture,
            "APT::Install-Recommends": "0",
            "APT::Default-Release": self.default_release,
        }
        return [arg for key, value in opts.items() if value != ""
                for arg in ("-o", f"{key}={value}")]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        cmd = [tool, *self._options(), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
        if result.returncode != 0:
            raise SetupMissing(f"{' '.join([tool, *args])} failed:\n{result.stderr.strip()}")
        return result.stdout

    def update(self) -> None:
        if not self._updated:
            progress(f"reading Debian package lists ({', '.join(self.suites)}, "
                     f"{self.architecture})")
            self.run("apt-get", "update")
            self._updated = True

    def download_closure(self, *packages: str, release: str | None = None) -> list[Path]:
        """Download packages and everything they depend on; returns the .deb files."""
        self.update()
        args = ["install", "--download-only", "-y", "--no-install-recommends"]
        if release:
            args += ["-t", release]
        self.run("apt-get", *args, *packages)
        return sorted((self.state / "cache" / "archives").glob("*.deb"))

    def download(self, package: str, dest: Path) -> Path:
        """One package's .deb into `dest` (kept there: a second call downloads nothing)."""
        self.update()
        dest.mkdir(parents=True, exist_ok=True)
        self.run("apt-get", "download", package, cwd=dest)
        name = package.split("=")[0].split(":")[0]
        return max(dest.glob(f"{name}_*.deb"), key=lambda p: p.stat().st_mtime)

    def depends_on(self, package: str, prefix: str) -> list[str]:
        """Dependencies of `package` whose names start with `prefix` (resolves a metapackage
        such as linux-image-amd64 to the versioned packages it stands for)."""
        self.update()
        names = []
        for line in self.run("apt-cache", "depends", package).splitlines():
            line = line.strip()
            if line.startswith("Depends:"):
                name = line.removeprefix("Depends:").strip()
                if name.startswith(prefix):
                    names.append(name)
        return names

    def candidate(self, package: str) -> str | None:
        """The version apt would install."""
        self.update()
        match = re.search(r"Candidate:\s*(\S+)", self.run("apt-cache", "policy", package))
        return match[1] if match and match[1] != "(none)" else None


def extract(deb: Path, dest: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


def deb_version(deb: Path) -> tuple[str, str]:
    """(package, version) from a .deb's file name (name_version_arch.deb, ':' as %3a)."""
    name, version, _ = deb.name.removesuffix(".deb").split("_")
    return name, version.replace("%3a", ":")
