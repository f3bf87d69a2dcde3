"""Adaptive LayerNorm modulation with static slices instead of `chunk`.

diffusers' AdaLayerNormZero / AdaLayerNormZeroSingle / AdaLayerNormContinuous split the
modulation vector with `emb.chunk(n, dim=1)`. Traced by the TorchScript exporter, chunk
becomes Shape -> Gather -> Div -> Slice chains (the split size is computed from the runtime
shape). The patched forward slices at constant offsets (the Linear's out_features / n is a
Python int), so the ONNX graph holds plain Slice ops with constant bounds and no Shape op.
Same math, bit-identical results.
"""
from __future__ import annotations

import types
from typing import Any

from ._base import Patcher, named_instances, qualname


def _parts(emb, n: int, width: int):
    d = width // n
    return [emb[:, i * d:(i + 1) * d] for i in range(n)]


def _fwd_zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _parts(emb, 6, self.linear.out_features)
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _fwd_zero_single(self, x, emb=None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = _parts(emb, 3, self.linear.out_features)
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa


def _fwd_continuous(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = _parts(emb, 2, self.linear.out_features)
    return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


def _problem(mod, n: int, need: tuple[str, ...]) -> str | None:
    missing = [a for a in need if not hasattr(mod, a)]
    if missing:
        return f"module has no {', '.join(missing)}"
    out = getattr(mod.linear, "out_features", None)
    if not isinstance(out, int) or out % n:
        return f"modulation width {out} is not a multiple of {n}"
    return None


def patch_adaln(patcher: Patcher, root: Any) -> int:
    """Swap the forward of every FLUX adaptive-LayerNorm module under root. Returns how many."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

    kinds = [
        (AdaLayerNormZero, _fwd_zero, 6, ("linear", "silu", "norm", "emb")),
        (AdaLayerNormZeroSingle, _fwd_zero_single, 3, ("linear", "silu", "norm")),
        (AdaLayerNormContinuous, _fwd_continuous, 2, ("linear", "silu", "norm")),
    ]
    n = 0
    for cls, fwd, parts, need in kinds:
        for path, mod in named_instances(root, lambda m, c=cls: type(m) is c, patcher.where):
            patcher.check("diffusers", "adaln", f"{qualname(mod)} at '{path}'", _problem(mod, parts, need))
            patcher.set_attr(mod, "forward", types.MethodType(fwd, mod), f"adaln: {path}")
            n += 1
    return n
