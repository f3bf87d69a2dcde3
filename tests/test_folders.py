"""Every folder a command writes is taken as it is by the next command (issue 12).

A workspace (onnx/ + BM1684X/), an export folder (what `fluxc export --out X` writes: manifest.json)
and a bmodel folder (what `fluxc compile --out X` writes: fluxc_build.json, whose record names the
export it was built from) are each recognised by fluxc.workspace.locate. The runs below use the
session's tiny schnell W4BF16 build (real compiler, real simulator) and compare with its
workspace run: the same image, bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fluxc import workspace
from tests.fixtures_runtime import RUNTIME_GUIDANCE, RUNTIME_PROMPT, RUNTIME_SEED, RUNTIME_STEPS, invoke


def test_locate_tells_the_three_folders_apart(compiled_schnell_w4, tmp_path):
    ws = Path(compiled_schnell_w4)
    loc = workspace.locate(ws)
    assert (loc.kind, loc.export, loc.chip) == ("workspace", ws / "onnx", ws / "BM1684X")
    loc = workspace.locate(ws / "onnx")
    assert (loc.kind, loc.export, loc.chip) == ("export", ws / "onnx", ws / "BM1684X")
    loc = workspace.locate(ws / "BM1684X")
    assert loc.kind == "bmodels" and loc.chip == ws / "BM1684X"
    assert loc.export.resolve() == (ws / "onnx").resolve()
    empty = tmp_path / "nothing"
    assert workspace.locate(empty).kind == "workspace"  # a fresh workspace: the default layout


def _run(models: Path, backend: str, out: Path) -> np.ndarray:
    from PIL import Image

    r = invoke(["run", "--models", str(models), "--backend", backend, "--prompt", RUNTIME_PROMPT, "--seed",
                str(RUNTIME_SEED), "--steps", str(RUNTIME_STEPS), "--guidance", str(RUNTIME_GUIDANCE),
                "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    return np.array(Image.open(out).convert("RGB"))


@pytest.mark.parametrize("backend, folder", [("cmodel", "BM1684X"), ("onnx", "onnx")])
def test_run_takes_the_folder_a_command_wrote(backend, folder, compiled_schnell_w4, bmodel_run, onnx_run, tmp_path):
    """`fluxc run --models X` with X the bmodel folder (compile --out) or the export folder
    (export --out): the workspace's image."""
    ws = Path(compiled_schnell_w4)
    want = bmodel_run("cmodel", "W4BF16")["image"] if backend == "cmodel" else onnx_run("schnell")["image"]
    got = _run(ws / folder, backend, tmp_path / "result.png")
    assert want.std() > 1.0
    assert np.array_equal(got, want)


def test_verify_takes_the_bmodel_folder(compiled_schnell_w4, tmp_path):
    """`fluxc verify --models Y` with Y the bmodel folder: the export is the one its record names,
    and the record, structure and memory checks pass (per-piece numerics limited to one piece)."""
    import json

    ws = Path(compiled_schnell_w4)
    report = tmp_path / "report.json"
    r = invoke(["verify", "--models", str(ws / "BM1684X"), "--report", str(report), "--no-e2e", "--pieces", "clip_head"])
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(report.read_text())
    assert Path(rep["info"]["export"]).resolve() == (ws / "onnx").resolve()
    assert rep["checks"] and all(c["ok"] for c in rep["checks"])
