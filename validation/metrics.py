"""Numerical agreement between two arrays (numpy only), made hard to fool.

`compare(ref, got, inp)` reports cosine AND relative error, and flags outputs that a cosine
alone would let through:
- non-finite values;
- a dead output: all zeros or constant (cosine of two zero tensors is undefined; we fail it);
- a no-op: the output equals the piece's own input while the reference's does not;
- for residual pieces (an output shaped like an input: every block), the same figures on
  the update `out - in`: a block whose weights are scaled or zeroed changes the update a lot
  while the residual stream keeps the plain output cosine near 1.
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


# A no-op: the output is within this relative distance of the input ...
NOOP_REL = 1e-3
# ... while the reference moves its input by at least this much.
NOOP_REF_MOVES = 1e-2


def compare(ref: np.ndarray, got: np.ndarray, inp: np.ndarray | None = None) -> dict:
    """Figures for one output: cosine, rel_err, max_abs_err, and for residual outputs
    (inp of the same shape) delta_cosine / delta_rel_err on out - inp; `flags` lists the
    problems no threshold may forgive (non-finite, dead, no-op)."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64).reshape(ref.shape)
    flags: list[str] = []
    res: dict = {}
    if not np.isfinite(got).all():
        flags.append("non-finite values")
        got = np.nan_to_num(got, nan=0.0, posinf=0.0, neginf=0.0)
    res["cosine"] = cosine(ref, got)
    res["rel_err"] = rel_err(ref, got)
    res["max_abs_err"] = max_abs_err(ref, got)
    if is_constant(got) and not is_constant(ref):
        flags.append("all zeros" if not np.any(got) else "constant output")
    if inp is not None:
        inp = np.asarray(inp, np.float64)
        if inp.shape == ref.shape:
            d_ref, d_got = ref - inp, got - inp
            res["delta_cosine"] = cosine(d_ref, d_got)
            res["delta_rel_err"] = rel_err(d_ref, d_got)
            moved_ref = rel_err(inp, ref)
            moved_got = rel_err(inp, got)
            res["moved"] = moved_got
            if moved_got <= NOOP_REL and moved_ref >= NOOP_REF_MOVES:
                flags.append(f"no-op (output equals its input, moved {moved_got:.1e}; the reference moves "
                             f"{moved_ref:.1e})")
    res["flags"] = flags
    return res


def rounded(res: dict) -> dict:
    """The figures of `compare` with 6 significant digits (for reports)."""
    out = {}
    for k, v in res.items():
        out[k] = float(f"{v:.6g}") if isinstance(v, float) else v
    return out
