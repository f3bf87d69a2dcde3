"""ONNX Runtime vs torch, piece by piece: the tests' numerical check of every exported piece.

`run_onnx(path, spec, inputs)` runs one exported piece; `compare_piece` feeds the same
`PieceSpec.sample_inputs` to the torch module and to ONNX Runtime and reports, per output,
the cosine similarity and the max abs error (fluxc/metrics.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxc.metrics import cosine, max_abs_err
from fluxc.specs import PieceSpec


@dataclass
class OutputParity:
    piece: str
    output: str
    cosine: float
    max_abs_err: float
    ref_max_abs: float

    def __str__(self) -> str:
        return (f"{self.piece}.{self.output}: cos {self.cosine:.8f}, max abs err {self.max_abs_err:.3g} "
                f"(ref max {self.ref_max_abs:.3g})")


def ort_session(path: Path):
    import onnxruntime as ort  # deferred: heavy, and only a parity check needs it

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session, spec: PieceSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs in spec order; inputs by name (extra names are ignored)."""
    sess = ort_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    feed = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.dtype) for t in spec.inputs}
    return sess.run([t.name for t in spec.outputs], feed)


def run_torch(module, spec: PieceSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch  # deferred: heavy, and only a parity check needs it

    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(inputs[t.name], dtype=t.dtype)) for t in spec.inputs])
    if not isinstance(out, (tuple, list)):
        out = (out,)
    return [o.detach().float().numpy() for o in out]


def compare_outputs(piece: str, spec: PieceSpec, ref: list[np.ndarray], got: list[np.ndarray]) -> list[OutputParity]:
    res = []
    for t, r, g in zip(spec.outputs, ref, got):
        if tuple(r.shape) != tuple(t.shape) or tuple(g.shape) != tuple(t.shape):
            raise AssertionError(f"{piece}.{t.name}: shapes torch {r.shape}, onnx {g.shape}, spec {t.shape}")
        res.append(OutputParity(piece, t.name, cosine(r, g), max_abs_err(r, g), float(np.max(np.abs(r)))))
    return res


def compare_piece(module, spec: PieceSpec, onnx_path: Path, seed: int = 0) -> list[OutputParity]:
    inputs = spec.sample_inputs(seed)
    return compare_outputs(spec.name, spec, run_torch(module, spec, inputs), run_onnx(onnx_path, spec, inputs))
