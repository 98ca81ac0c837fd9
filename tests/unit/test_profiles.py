"""Machine profiles checked against their schema: a bad one ends in one line per problem,
each naming the file, the key and what is allowed, never in a traceback or a QEMU command
line built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from viommu.cli import main as cli
from viommu.vm import paths
from viommu.vm.profile import ProfileError, load_profile

ENDPOINT = '[[endpoints]]\nname = "ep0"\nport = 0\ndevice = "pci-testdev"\n'


@pytest.mark.parametrize("text,expected", [
    ("[machine\nmemory_mib = 512\n", ["not valid TOML: "]),
    ("[machine]\nmemroy_mib = 512\n", ["[machine] unknown key 'memroy_mib' (known: memory_mib"]),
    ('[machine]\nmemory_mib = "lots"\n',
     ["[machine] memory_mib must be an integer number of MiB, 64..1048576, not 'lots'"]),
    (ENDPOINT.replace("port = 0", "port = 9"),
     ["[[endpoints]] #1 port must be a root port, 0..3 ([machine] root_ports = 4), not 9"]),
    ('[[endpoints]]\nname = "ep0"\nport = 0\n',
     ["[[endpoints]] #1 device is missing: a string: the QEMU device"]),
    ('[machine]\ncpus = 0\niommu = "intel"\n\n[kernal]\ncmdline = ""\n',
     ["unknown table [kernal] (known: [machine], [kernel], [endpoints], [network])",
      "[machine] cpus must be an integer, 1..256, not 0",
      "[machine] iommu must be one of viommu, qemu, none, not 'intel'"]),
    (ENDPOINT + ENDPOINT.replace("port = 0", "port = 1"),
     ["[[endpoints]] #2 name 'ep0' is already endpoint #1's"]),
    ('[machine]\nmemory_mib = 128\n', ["the table area 0x10000000..0x10ffffff (table_area_base, "
                                       "table_area_size) is past the 128 MiB of RAM"]),
], ids=["malformed-toml", "unknown-key", "memory-not-a-number", "port-out-of-range",
        "endpoint-without-device", "several-at-once", "duplicate-endpoint",
        "table-area-past-ram"])
def test_a_bad_profile_is_one_line_per_problem_naming_file_and_key(
        tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    lines = str(error.value).splitlines()
    assert len(lines) == len(expected), lines
    for line, wanted in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}: ") and wanted in line, line


def test_a_bad_profile_given_to_up_is_those_lines_and_no_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("VIOMMU_RUN_DIR", str(tmp_path / "run"))
    path = tmp_path / "bad.toml"
    path.write_text('[machine]\nmemory_mib = "lots"\nroot_ports = "four"\n')
    assert cli.main(["up", str(path), "--name", "bad"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"viommu up: error: {path}: [machine] memory_mib must be an integer number of MiB, "
        "64..1048576, not 'lots'",
        f"{path}: [machine] root_ports must be an integer, 0..31, not 'four'"]


@pytest.mark.parametrize("name", sorted(p.stem for p in paths.QEMU_CONFIGS.glob("*.toml")))
def test_every_shipped_profile_passes_its_schema(name: str) -> None:
    assert load_profile(name).name == name
