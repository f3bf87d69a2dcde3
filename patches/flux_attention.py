"""Export-friendly attention processor for diffusers' FluxAttention (double and single stream).

What it computes is FluxAttnProcessor's math; how it is written is chosen for the
TorchScript ONNX exporter and TPU-MLIR:

- q/k/v projections, then RMSNorm with elementary ops (see rmsnorm.py) in [B, S, H, D].
- rotary in real form from the precomputed table [1, S, 1, D/2, 2, 2] (rotary.py), applied
  in [B, S, H, D] as x * C + (x @ P) * S (P: constant pair swap; C, S taken from the table by
  two tiny constant MatMuls, shared by q and k): no stride-2 Slice of q/k, which TPU-MLIR's
  cost model showed to dominate a block (see rotary.apply_rotary_table).
- attention as explicit MatMul + Softmax + MatMul, with the softmax scale 1/sqrt(D) folded
  into the q norm's weight (a constant multiply that constant-folds away: no Mul on the
  [B, H, S, S] scores) and one transpose per operand (q, v [B,S,H,D]->[B,H,S,D];
  k [B,S,H,D]->[B,H,D,S]; the output back to [B,S,H,D]): attention="prescaled", the default.
  attention="fattention" writes the exact chain TPU-MLIR replaces with BM1684X's fused
  attention kernel (FAttention, MatMul2FAttentionPattern in its OptimizeBM1684X.cpp):
  Permute(q), Permute(k) -> MatMul -> Mul by the constant scale AFTER the MatMul -> Softmax
  -> MatMul with Permute(v) -> Permute -> Reshape; the deploy log then says "fattention ...
  success" (BF16/F16, head dim <= 160; scaling q or k before the MatMul, as the default and
  torch's SDPA export do, breaks the match). It is not the default because TPU-MLIR's cost
  model puts the fused kernel behind the unfused graph on a full-width single block at 4608
  tokens: BF16 131.5 vs 128.4 ms, W4BF16 124.3 vs 120.2 ms (benchmarks/block_breakdown.py,
  BENCHMARKS.md): the kernel's own compute (25 M cycles) exceeds the two layer-grouped
  MatMuls plus Softmax it replaces. attention="sdpa" goes through
  F.scaled_dot_product_attention (same estimate as the default). The alternatives are kept
  for graph comparisons; all three equal diffusers' attention (tests/test_patches.py).
- double stream: the text/image split of the attention output is a Slice on the sequence
  axis before the two output projections, like diffusers.

The processor also accepts diffusers' (cos, sin) tuple as image_rotary_emb, so a patched
FluxTransformer2DModel still runs its own forward (used by the tests).
"""
from __future__ import annotations

from typing import Any

from ._base import Patcher, named_instances, qualname
from .rmsnorm import rms_norm
from .rotary import apply_rotary_table, apply_rotary_table_slices, rotary_cos_sin


def _norm_weight_eps(norm, x):
    import torch

    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return getattr(norm, "weight", None), eps


def _normed(norm, x, scale: float | None = None):
    w, eps = _norm_weight_eps(norm, x)
    if scale is not None:
        w = scale if w is None else w * scale
    return rms_norm(x, w, eps)


def _rotate(x, rot, cos_sin=None, rotary: str = "matmul"):
    if rot is None:
        return x
    if isinstance(rot, (tuple, list)):  # diffusers (cos, sin), [S, D] each
        from diffusers.models.embeddings import apply_rotary_emb

        return apply_rotary_emb(x, tuple(rot), sequence_dim=1)
    if rotary == "slices":
        return apply_rotary_table_slices(x, rot)
    return apply_rotary_table(x, rot, cos_sin)


def attention_bshd(q, k, v, scale: float = 1.0):
    """q, k, v [B, S, H, D] -> [B, S, H*D]: softmax(q k^T * scale) v. With scale != 1 the scale
    is a Mul after the first MatMul (the chain of TPU-MLIR's FAttention); scale 1 (the scale
    already in q) writes no Mul."""
    import torch

    qh = q.permute(0, 2, 1, 3)  # [B, H, S, D]
    kt = k.permute(0, 2, 3, 1)  # [B, H, D, S]
    vh = v.permute(0, 2, 1, 3)  # [B, H, S, D]
    s = torch.matmul(qh, kt)
    if scale != 1.0:
        s = s * scale
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vh).permute(0, 2, 1, 3)  # [B, S, H, D]
    return o.reshape(o.shape[0], o.shape[1], o.shape[2] * o.shape[3])


def attention_sdpa_bshd(q, k, v, scale: float = 1.0):
    """Same contract as attention_bshd, via F.scaled_dot_product_attention."""
    import torch.nn.functional as F

    o = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3),
                                       scale=scale).permute(0, 2, 1, 3)
    return o.reshape(o.shape[0], o.shape[1], o.shape[2] * o.shape[3])


ATTENTION_FORMS = ("prescaled", "fattention", "sdpa")


class FluxAttnExportProcessor:
    """Drop-in processor for FluxAttention (set by patch_flux_attention).

    attention="prescaled" (default, see module docstring), "fattention" or "sdpa";
    rotary="matmul" (default, see rotary.apply_rotary_table) or "slices" (the direct form).
    The alternatives are kept for graph comparisons."""

    def __init__(self, attention: str = "prescaled", rotary: str = "matmul"):
        if attention not in ATTENTION_FORMS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_FORMS)}, got {attention!r}")
        if rotary not in ("matmul", "slices"):
            raise ValueError(f"rotary must be 'matmul' or 'slices', got {rotary!r}")
        self.attention, self.rotary = attention, rotary

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **_: Any):
        if attention_mask is not None:
            raise ValueError("FluxAttnExportProcessor does not take an attention mask (FLUX uses none)")
        H, D = attn.heads, attn.head_dim
        # "prescaled": the softmax scale in the q norm's weight; otherwise applied to the scores
        scale = D ** -0.5 if self.attention == "prescaled" else None

        def heads(lin, x):
            y = lin(x)
            return y.reshape(y.shape[0], y.shape[1], H, D)

        q = _normed(attn.norm_q, heads(attn.to_q, hidden_states), scale)
        k = _normed(attn.norm_k, heads(attn.to_k, hidden_states))
        v = heads(attn.to_v, hidden_states)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            import torch

            eq = _normed(attn.norm_added_q, heads(attn.add_q_proj, encoder_hidden_states), scale)
            ek = _normed(attn.norm_added_k, heads(attn.add_k_proj, encoder_hidden_states))
            ev = heads(attn.add_v_proj, encoder_hidden_states)
            q = torch.cat([eq, q], dim=1)
            k = torch.cat([ek, k], dim=1)
            v = torch.cat([ev, v], dim=1)
        cs = None
        if image_rotary_emb is not None and not isinstance(image_rotary_emb, (tuple, list)) and self.rotary == "matmul":
            cs = rotary_cos_sin(image_rotary_emb, D)  # shared by q and k
        q = _rotate(q, image_rotary_emb, cs, self.rotary)
        k = _rotate(k, image_rotary_emb, cs, self.rotary)
        after = 1.0 if scale is not None else D ** -0.5
        out = (attention_sdpa_bshd if self.attention == "sdpa" else attention_bshd)(q, k, v, after)
        if encoder_hidden_states is not None:
            t = encoder_hidden_states.shape[1]
            enc, img = out[:, :t], out[:, t:]
            img = attn.to_out[1](attn.to_out[0](img))
            enc = attn.to_add_out(enc)
            return img, enc
        return out


def _structure_problem(attn) -> str | None:
    need = ["heads", "head_dim", "to_q", "to_k", "to_v", "norm_q", "norm_k", "processor"]
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        need += ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", "to_add_out"]
    missing = [n for n in need if not hasattr(attn, n)]
    if missing:
        return f"module has no {', '.join(missing)}"
    if getattr(attn, "fused_projections", False):
        return "fused q/k/v projections are not supported (call unfuse_qkv_projections first)"
    import torch

    if isinstance(attn.processor, torch.nn.Module):
        return f"processor {type(attn.processor).__name__} carries weights (IP-adapter?); not supported"
    return None


def patch_flux_attention(patcher: Patcher, root: Any) -> int:
    """Set FluxAttnExportProcessor on every FluxAttention under root. Returns how many."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    n = 0
    for path, attn in named_instances(root, lambda m: isinstance(m, FluxAttention), patcher.where):
        patcher.check("diffusers", "flux_attention", f"{qualname(attn)} at '{path}'", _structure_problem(attn))
        patcher.set_attr(attn, "processor", FluxAttnExportProcessor(), f"flux_attention: {path}")
        n += 1
    return n
