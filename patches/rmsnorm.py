"""RMSNorm written with elementary ops: x * rsqrt(mean(x*x) + eps) * w.

The TorchScript ONNX exporter (opset 17) has no symbolic for aten::rms_norm, which
torch.nn.RMSNorm lowers to; FLUX's FluxAttention uses it for norm_q/norm_k/norm_added_q/
norm_added_k. diffusers' own RMSNorm and transformers' T5LayerNorm already compute with
elementary ops in float32, but cast around the computation; the patched forward drops the
casts (identical in fp32) so every RMSNorm in an exported graph has the same 6-op shape:
Mul, ReduceMean, Add, Sqrt, Reciprocal, Mul(, Mul weight).
"""
from __future__ import annotations

import types
from typing import Any

from ._base import Patcher, named_instances, qualname


def rms_norm(x, weight, eps: float):
    """x * rsqrt(mean(x^2, -1) + eps) (* weight). Export-friendly, same math as nn.RMSNorm."""
    import torch

    y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def _torch_eps(mod, x) -> float:
    import torch

    return mod.eps if mod.eps is not None else torch.finfo(x.dtype).eps


def _fwd_torch(self, x):
    return rms_norm(x, self.weight, _torch_eps(self, x))


def _fwd_diffusers(self, x):
    y = rms_norm(x, self.weight, self.eps)
    if getattr(self, "bias", None) is not None:
        y = y + self.bias
    return y


def _fwd_t5(self, x):
    return rms_norm(x, self.weight, self.variance_epsilon)


def _kinds():
    """(package, class, forward, structure-check) for each RMSNorm flavour we know."""
    import torch

    kinds = [("diffusers", torch.nn.RMSNorm, _fwd_torch,
              lambda m: None if len(m.normalized_shape) == 1 else "normalizes over more than the last dim")]
    try:
        from diffusers.models.normalization import RMSNorm as DRMSNorm

        kinds.append(("diffusers", DRMSNorm, _fwd_diffusers,
                      lambda m: None if hasattr(m, "eps") and hasattr(m, "weight") else "no eps/weight attribute"))
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        kinds.append(("transformers", T5LayerNorm, _fwd_t5,
                      lambda m: None if hasattr(m, "variance_epsilon") and hasattr(m, "weight")
                      else "no variance_epsilon/weight attribute"))
    except ImportError:  # pragma: no cover
        pass
    return kinds


def patch_rmsnorm(patcher: Patcher, root: Any) -> int:
    """Swap the forward of every RMSNorm-like submodule of root. Returns how many.

    torch.nn.RMSNorm inside diffusers models is checked against the diffusers version
    (FLUX's attention is what creates it)."""
    n = 0
    for package, cls, fwd, check in _kinds():
        for path, mod in named_instances(root, lambda m, c=cls: type(m) is c, patcher.where):
            patcher.check(package, "rmsnorm", f"{qualname(mod)} at '{path}'", check(mod))
            patcher.set_attr(mod, "forward", types.MethodType(fwd, mod), f"rmsnorm: {path}")
            n += 1
    return n
