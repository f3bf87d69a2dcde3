"""Numerical agreement between two arrays (numpy only), made hard to fool; the plain figures
(cosine, relative error, max abs error, PSNR) are fluxc/metrics.py's.

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

from fluxc.metrics import cosine, is_constant, max_abs_err, rel_err


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
