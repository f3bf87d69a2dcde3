"""A disk that fills up during `fluxc export` / `fluxc compile`: a one-line error naming the
file being written and the option to change, exit code 2, and nothing half-written left under
a name a later run would trust (no temp names, no manifest/report marked complete).

The full disk is real: a small tmpfs mounted for the test (needs root, as in this project's CI
container). Without the permission to mount, the tests skip and say why."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_compile import REPO, make_workspace
from tests.fixtures_export import EXPORT_ARGS


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(size) -> a folder on a fresh tmpfs of that size; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill up ({r.stderr.strip() or r.returncode}); needs root")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "fluxc.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)


def _disk_full_line(res: subprocess.CompletedProcess, disk: Path, option: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    line = errors[0]
    assert "disk full while writing" in line and str(disk) in line and option in line, line
    return line


def _temp_names(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or ".export-" in p.name]


def test_export_onto_a_full_disk(tiny_schnell: Path, small_disk) -> None:
    disk = small_disk("4m")  # the tiny export needs ~17 MB: several pieces fit, then the disk is full
    out = disk / "onnx"
    res = _cli(["export", tiny_schnell, "--out", out, *EXPORT_ARGS])
    line = _disk_full_line(res, disk, "--out")
    print(line)
    assert list(out.glob("*.onnx")), "the disk filled up before any piece: make it bigger for this test"
    assert not _temp_names(disk), _temp_names(disk)
    m = out / "manifest.json"
    assert not m.exists() or json.loads(m.read_text()).get("complete") is not True


def test_compile_onto_a_full_disk(export_schnell_tinyvae: Path, small_disk, tmp_path: Path) -> None:
    disk = small_disk("1m")  # the build cache of the first piece does not fit
    ws = make_workspace(tmp_path / "ws", export_schnell_tinyvae)
    res = _cli(["compile", "--models", ws, "--build-dir", disk / "build", "--quantize", "W4BF16",
                "--flux-type", "schnell", "--tiny-vae", "--jobs", "1"])
    line = _disk_full_line(res, disk, "--build-dir")
    print(line)
    assert not _temp_names(disk), _temp_names(disk)
    assert not list(disk.rglob("COMPLETE"))
    assert not (ws / "BM1684X" / "compile_report.json").exists()
