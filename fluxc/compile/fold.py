"""model_transform without its whole-graph simplification: the piece's ONNX is simplified first
by fold_script.py (run in the toolchain's Python: TPU-MLIR's own constant-folding rule, applied
node by node, and onnx-simplifier's passes with the weights held out), then model_transform
reads the result with `--do_onnx_sim ""` (its simplification off; onnx_opt and the conversion
unchanged).

Why: model_transform's simplification runs the whole piece in ONNX Runtime on deep copies of
the model. For a full-size double block that peaked at 17.6 GB (benchmarks/results/full_size.json
before this change), above what a 16 GB machine has. The folded graph is the same: the same top
MLIR, byte for byte, and the same weight tensors (tests/test_fold.py; benchmarks/transform_memory.py
at full size), and
equal outputs in ONNX Runtime (checked here whenever the compile checks, against the exported
piece).

A graph the script cannot fold (an op ONNX Runtime cannot run alone is left in place; a file it
cannot read at all), or whose folded form fails that check, is not an error of its own: the piece
is transformed from its exported ONNX with model_transform's own simplification, as before, and
`fold.json` in its build folder says why (the compile prints it). model_transform then reports
what is wrong with a broken file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fluxc.compile.tools import Tools
from fluxc.errors import FluxcError

SCRIPT = Path(__file__).with_name("fold_script.py")
FOLDED = "folded.onnx"
LABEL = "fold"  # how the script's run is listed (compile_report.json tool_commands) and named in errors


def folded_path(work: Path) -> Path:
    return work / FOLDED


def fold(onnx: Path, work: Path, tools: Tools, log: Path, what: str) -> tuple[Path, dict]:
    """Write work/folded.onnx (+ .data) from the piece's ONNX; returns its path and the script's
    figures (folded node count, largest value held, bytes written)."""
    dst = folded_path(work)
    for stale in (dst, dst.with_name(dst.name + ".data")):
        stale.unlink(missing_ok=True)
    tools.run("python", [str(SCRIPT), str(onnx), str(dst)], work, log, what, label=LABEL)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("{")]
    if not dst.is_file() or not lines:
        raise FluxcError(f"{what}: folding the ONNX for model_transform wrote no {dst.name}; see {log}")
    return dst, json.loads(lines[-1])


def remove(work: Path) -> None:
    """The folded copy is only model_transform's input: drop it (the weights' bytes) afterwards."""
    dst = folded_path(work)
    for p in (dst, dst.with_name(dst.name + ".data")):
        p.unlink(missing_ok=True)


def check(original: Path, folded: Path, samples: dict, what: str) -> float:
    """The folded graph computes what the exported piece computes (ONNX Runtime, same inputs):
    returns the largest |difference| relative to the outputs' scale; raises above 1e-5."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    want = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"]).run(None, samples)
    got = ort.InferenceSession(str(folded), opts, providers=["CPUExecutionProvider"]).run(None, samples)
    worst = 0.0
    for w, g in zip(want, got):
        w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
        if w.shape != g.shape:
            raise FluxcError(f"{what}: the folded graph's output has shape {g.shape}, the piece's {w.shape}")
        scale = max(float(np.abs(w).max()), 1e-30)
        worst = max(worst, float(np.abs(w - g).max()) / scale)
    if not worst <= 1e-5:
        raise FluxcError(f"{what}: the folded graph differs from the exported piece (max relative difference "
                         f"{worst:.3g}); please report it with the piece's ONNX file")
    return worst
