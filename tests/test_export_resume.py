"""kill -9 during `fluxc export`: the next run leaves no temporary behind and completes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fluxc.export.manifest import load_manifest
from tests.fixtures_export import EXPORT_ARGS

REPO = Path(__file__).resolve().parents[1]


def _temps(out: Path) -> list[Path]:
    return [p for pat in (".*.export-*", ".*.staged-*", ".*.rebind-*") for p in out.glob(pat)]


def test_kill_during_export_then_resume(tiny_dev, tmp_path):
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "fluxc.cli", "export", str(tiny_dev), "--out", str(out), *EXPORT_ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and not _temps(out) and proc.poll() is None:
            time.sleep(0.05)
        assert _temps(out), "the export finished before a temporary appeared"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _temps(out)  # what a kill -9 leaves behind
    assert not (out / "manifest.json").exists() or load_manifest_incomplete(out)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _temps(out) == []
    m = load_manifest(out)
    assert all((out / s.file).is_file() for s in m.specs)


def load_manifest_incomplete(out: Path) -> bool:
    import json

    return json.loads((out / "manifest.json").read_text()).get("complete") is not True
