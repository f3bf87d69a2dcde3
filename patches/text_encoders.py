"""Text encoders with their masks/biases baked in as constants.

T5 (encoder, FLUX's text_encoder_2): every layer adds the same relative position bias
computed by block 0's relative_attention_bias for the fixed sequence length, plus the
attention mask; FluxPipeline calls the encoder without a mask, so the mask is all zeros.
`t5_position_bias` returns bias + zero mask, [1, heads, S, S], and `T5BlockExport` runs one
T5 block taking only hidden_states. T5 attention has no 1/sqrt(d) scaling.

CLIP (text_encoder): causal self-attention; `clip_causal_mask` is the additive mask
[1, 1, L, L] (0 on and below the diagonal, -10000 above: exp(-10000) is exactly 0 in fp32
and, unlike finfo(float32).min, -10000 is representable in F16, which the CLIP pieces are
compiled in). `CLIPLayerExport` runs one CLIPEncoderLayer with that constant.
"""
from __future__ import annotations

from typing import Any

import torch

from ._base import Patcher, qualname

CLIP_MASK_VALUE = -10000.0


def t5_position_bias(block0_attention, seq_len: int):
    """[1, H, S, S] float32: block 0's relative position bias for S tokens + the zero mask."""
    import torch

    with torch.no_grad():
        bias = block0_attention.compute_bias(seq_len, seq_len, device=torch.device("cpu"))
    return bias.float() + torch.zeros((1, 1, seq_len, seq_len))


def clip_causal_mask(seq_len: int):
    import torch

    return torch.triu(torch.full((seq_len, seq_len), CLIP_MASK_VALUE), diagonal=1)[None, None]


def _check(patcher: Patcher, patch: str, mod: Any, path: str, need: list[str]) -> None:
    missing = [n for n in need if _get(mod, n) is None]
    patcher.check("transformers", patch, f"{qualname(mod)} at '{path}'",
                  f"module has no {', '.join(missing)}" if missing else None)


def _get(mod, dotted: str):
    for part in dotted.split("."):
        try:
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        except (AttributeError, IndexError, TypeError):
            return None
    return mod


def _rms_t5(norm, x):
    from .rmsnorm import rms_norm

    return rms_norm(x, norm.weight, norm.variance_epsilon)


class T5BlockExport(torch.nn.Module):
    """One T5 encoder block; hidden_states -> hidden_states, bias+mask constant inside."""

    def __init__(self, block, position_bias, patcher: Patcher | None = None, path: str = "block"):
        super().__init__()
        p = patcher or Patcher()
        _check(p, "t5_block", block, path,
               ["layer.0.layer_norm", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k",
                "layer.0.SelfAttention.v", "layer.0.SelfAttention.o", "layer.0.SelfAttention.n_heads",
                "layer.0.SelfAttention.key_value_proj_dim", "layer.1.layer_norm", "layer.1.DenseReluDense"])
        if getattr(block, "is_decoder", False):
            p.check("transformers", "t5_block", f"{qualname(block)} at '{path}'", "decoder blocks are not supported")
        self.block = block
        self.register_buffer("position_bias", position_bias.detach().clone().float(), persistent=False)

    def forward(self, hidden_states):
        sa = self.block.layer[0].SelfAttention
        H, Dk = sa.n_heads, sa.key_value_proj_dim
        x = hidden_states
        h = _rms_t5(self.block.layer[0].layer_norm, x)
        B, S = h.shape[0], h.shape[1]
        q = sa.q(h).reshape(B, S, H, Dk).permute(0, 2, 1, 3)
        kt = sa.k(h).reshape(B, S, H, Dk).permute(0, 2, 3, 1)
        v = sa.v(h).reshape(B, S, H, Dk).permute(0, 2, 1, 3)
        p = torch.softmax(torch.matmul(q, kt) + self.position_bias, dim=-1)
        o = torch.matmul(p, v).permute(0, 2, 1, 3).reshape(B, S, H * Dk)
        x = x + sa.o(o)
        ff = self.block.layer[-1]
        return x + ff.DenseReluDense(_rms_t5(ff.layer_norm, x))

class CLIPLayerExport(torch.nn.Module):
    """One CLIPEncoderLayer; hidden_states -> hidden_states, causal mask constant inside."""

    def __init__(self, layer, seq_len: int, patcher: Patcher | None = None, path: str = "layer"):
        super().__init__()
        _check(patcher or Patcher(), "clip_layer", layer, path,
               ["layer_norm1", "layer_norm2", "mlp", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.out_proj", "self_attn.num_heads", "self_attn.head_dim",
                "self_attn.scale"])
        self.layer = layer
        self.register_buffer("causal_mask", clip_causal_mask(seq_len), persistent=False)

    def forward(self, hidden_states):
        a = self.layer.self_attn
        H, Dh = a.num_heads, a.head_dim
        x = hidden_states
        h = self.layer.layer_norm1(x)
        B, S = h.shape[0], h.shape[1]
        q = (a.q_proj(h) * a.scale).reshape(B, S, H, Dh).permute(0, 2, 1, 3)
        kt = a.k_proj(h).reshape(B, S, H, Dh).permute(0, 2, 3, 1)
        v = a.v_proj(h).reshape(B, S, H, Dh).permute(0, 2, 1, 3)
        p = torch.softmax(torch.matmul(q, kt) + self.causal_mask, dim=-1)
        o = torch.matmul(p, v).permute(0, 2, 1, 3).reshape(B, S, H * Dh)
        x = x + a.out_proj(o)
        return x + self.layer.mlp(self.layer.layer_norm2(x))



def t5_block_export(block, position_bias, patcher: Patcher | None = None, path: str = "block"):
    """nn.Module running T5 `block` with the baked bias; checks the transformers version."""
    return T5BlockExport(block, position_bias, patcher, path)


def clip_layer_export(layer, seq_len: int, patcher: Patcher | None = None, path: str = "layer"):
    """nn.Module running CLIPEncoderLayer `layer` with the baked causal mask."""
    return CLIPLayerExport(layer, seq_len, patcher, path)
