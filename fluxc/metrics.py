"""Figures of agreement between two arrays (numpy only): cosine, relative error, max abs
error, PSNR. Their one home: the tests' ONNX-vs-torch check (tests/parity.py), the
compiler's own figures (fluxc/compile/parse.py) and verification (fluxc.validation.metrics
builds its hard-to-fool `compare` on them) all use these.
"""
from __future__ import annotations

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays; 0.0 when either is all zeros (a dead
    tensor never counts as agreement), 1.0 only for two identical all-zero tensors."""
    a, b = _f64(a), _f64(b)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if (na == 0.0 and nb == 0.0 and a.size == b.size) else 0.0
    return float(np.dot(a, b) / (na * nb))


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (inf when ref is all zeros and got is not)."""
    r, g = _f64(ref), _f64(got)
    nr = float(np.linalg.norm(r))
    d = float(np.linalg.norm(g - r))
    if nr == 0.0:
        return 0.0 if d == 0.0 else float("inf")
    return d / nr


def max_abs_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf when identical)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def is_constant(x: np.ndarray, rel: float = 1e-6) -> bool:
    """All values equal (up to rel * their magnitude): zeros, or a constant fill."""
    x = _f64(x)
    if x.size < 2:
        return False
    spread = float(np.max(x) - np.min(x))
    return spread <= rel * max(1e-30, float(np.max(np.abs(x))))
