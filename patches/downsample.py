"""The VAE encoder's downsampling pad with static shapes (issue 19).

diffusers' Downsample2D (AutoencoderKL's encoder, padding 0) pads its input by one row and one
column of zeros on the bottom/right with `F.pad(x, (0, 1, 0, 1))`. The TorchScript exporter
writes the pads of that ONNX Pad as a computation (Shape, Sub, Cast ... of the input's rank),
which constant folding would remove; fluxc exports with constant folding off (initializers stay
the checkpoint's tensors), so ONNX shape inference cannot tell the Pad's output shape and every
shape after it is unknown. The patched forward appends the zero column and row by Concat with a
constant-bound Slice of the input times zero: the same values, static shapes all the way.
"""
from __future__ import annotations

import types
from typing import Any

import torch

from ._base import Patcher, named_instances, qualname


def _pad_br(x):
    """x padded with one zero column on the right and one zero row at the bottom."""
    x = torch.cat([x, x[:, :, :, :1] * 0], dim=3)
    return torch.cat([x, x[:, :, :1, :] * 0], dim=2)


def _fwd(self, hidden_states, *args, **kwargs):
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv and self.padding == 0:
        hidden_states = _pad_br(hidden_states)
    return self.conv(hidden_states)


def _problem(mod) -> str | None:
    missing = [a for a in ("norm", "use_conv", "padding", "conv") if not hasattr(mod, a)]
    return f"module has no {', '.join(missing)}" if missing else None


def patch_downsample(patcher: Patcher, root: Any) -> int:
    """Swap the forward of every diffusers Downsample2D under root. Returns how many."""
    from diffusers.models.downsampling import Downsample2D

    n = 0
    for path, mod in named_instances(root, lambda m: type(m) is Downsample2D, patcher.where):
        patcher.check("diffusers", "downsample", f"{qualname(mod)} at '{path}'", _problem(mod))
        patcher.set_attr(mod, "forward", types.MethodType(_fwd, mod), f"downsample: {path}")
        n += 1
    return n
