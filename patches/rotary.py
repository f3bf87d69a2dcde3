"""FLUX rotary embedding as a real-valued table, and how blocks apply it.

Table layout (the sophon-demo / BFL layout): float32 [1, S, 1, head_dim/2, 2, 2], S = text
tokens + image tokens (text first), and for every position s and frequency pair p the 2x2
rotation [[cos a, -sin a], [sin a, cos a]] with a = pos_axis(s) * freq(p). Applied to a
query/key x [B, S, H, head_dim] seen as pairs (x0, x1) = (x[2p], x[2p+1]):
    out[2p]   = cos a * x0 - sin a * x1
    out[2p+1] = sin a * x0 + cos a * x1
which is exactly diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) fed by
FluxPosEmbed (get_1d_rotary_pos_embed with repeat_interleave_real=True): adjacent pairs.

Positions follow FluxPipeline: txt_ids are zeros (t5_len, 3); img_ids are (0, row, col) on
the (H/16) x (W/16) grid of packed latent tokens (row-major). Angles are computed in float64
then cast, like FluxPosEmbed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


def flux_ids(t5_len: int, grid_h: int, grid_w: int) -> np.ndarray:
    """[t5_len + grid_h*grid_w, 3] position ids, text first (FluxPipeline's txt_ids, img_ids)."""
    txt = np.zeros((t5_len, 3), dtype=np.float64)
    img = np.zeros((grid_h, grid_w, 3), dtype=np.float64)
    img[..., 1] = np.arange(grid_h)[:, None]
    img[..., 2] = np.arange(grid_w)[None, :]
    return np.concatenate([txt, img.reshape(-1, 3)], axis=0)


def rotary_table_from_ids(ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0) -> np.ndarray:
    """Table [1, S, 1, sum(axes_dims)/2, 2, 2] float32 for position ids [S, n_axes]."""
    ids = np.asarray(ids, dtype=np.float32).astype(np.float64)  # FluxPosEmbed: ids.float()
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"ids must be [S, {len(axes_dims)}], got {ids.shape}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"rotary axis dims must be even, got {tuple(axes_dims)}")
        freqs = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles.append(np.outer(ids[:, axis], freqs))
    a = np.concatenate(angles, axis=1)  # [S, hd/2]
    cos, sin = np.cos(a), np.sin(a)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [S, hd/2, 2, 2]
    return rot[None, :, None].astype(np.float32)


def rotary_table(dims_or_t5_len, height: int | None = None, width: int | None = None, *,
                 axes_dims: Sequence[int], theta: float = 10000.0, vae_scale: int = 8) -> np.ndarray:
    """Rotary table for one export.

    rotary_table(dims, axes_dims=(16, 56, 56))       # dims: fluxc.specs.FluxDims
    rotary_table(512, 1024, 1024, axes_dims=...)      # t5 length, image height, width
    Returns float32 [1, t5_len + (H/16)*(W/16), 1, sum(axes_dims)/2, 2, 2].
    """
    if height is None:
        d = dims_or_t5_len
        t5_len, grid_h, grid_w = d.t5_len, d.latent_h // 2, d.latent_w // 2
        if sum(axes_dims) != d.head_dim:
            raise ValueError(f"axes_dims {tuple(axes_dims)} must sum to head_dim {d.head_dim}")
        if getattr(d, "ref_tokens", 0):  # FLUX.1 Kontext: the reference image's ids follow the image's
            ids = flux_ids(t5_len, grid_h, grid_w)
            ref = flux_ids(0, d.ref_height // d.vae_scale // 2, d.ref_width // d.vae_scale // 2)
            ref[:, 0] = 1  # FluxKontextPipeline: "the first dimension set to 1 instead of 0"
            return rotary_table_from_ids(np.concatenate([ids, ref], axis=0), axes_dims, theta)
    else:
        t5_len = int(dims_or_t5_len)
        grid_h, grid_w = height // (vae_scale * 2), width // (vae_scale * 2)
    return rotary_table_from_ids(flux_ids(t5_len, grid_h, grid_w), axes_dims, theta)


@functools.lru_cache(maxsize=8)
def _rotary_constants_np(d: int):
    p = np.arange(d // 2)
    P = np.zeros((d, d), np.float32)
    P[2 * p + 1, 2 * p] = 1
    P[2 * p, 2 * p + 1] = 1
    MC = np.zeros((2 * d, d), np.float32)
    MS = np.zeros((2 * d, d), np.float32)
    MC[4 * p, 2 * p] = 1  # [0, 0] = cos
    MC[4 * p + 3, 2 * p + 1] = 1  # [1, 1] = cos
    MS[4 * p + 1, 2 * p] = 1  # [0, 1] = -sin
    MS[4 * p + 2, 2 * p + 1] = 1  # [1, 0] = sin
    return P, MC, MS


def _rotary_constants(d: int, dtype, device):
    """Constant 0/1 matrices: P swaps the members of each pair (x @ P)[2p] = x[2p+1],
    (x @ P)[2p+1] = x[2p]; MC / MS pick from a flattened table row (per pair [c, -s, s, c])
    the diagonal C = [c, c] and the off-diagonal S = [-s, s], interleaved like x.
    Built in numpy so the exporter records them as plain constants."""
    import torch

    return tuple(torch.from_numpy(m).to(dtype=dtype, device=device) for m in _rotary_constants_np(d))


def rotary_cos_sin(table, d: int):
    """Table [1, S, 1, d/2, 2, 2] -> (C, S) [1, S, 1, d], both interleaved like x, computed
    with two small constant MatMuls (no strided slicing)."""
    P, MC, MS = _rotary_constants(d, table.dtype, table.device)
    flat = table.reshape(table.shape[0], table.shape[1], table.shape[2], 2 * d)
    return flat @ MC, flat @ MS


def apply_rotary_table(x, table, cos_sin=None):
    """x [B, S, H, D] (any H), table [1, S, 1, D/2, 2, 2] -> rotated x [B, S, H, D].

    out = x * C + (x @ P) * S, with C = [cos, cos], S = [-sin, sin] per pair (from the table)
    and P the constant pair-swap matrix. Written so that no op slices the last axis with
    stride 2: with the direct form T[..., 0] * x[..., 0] + T[..., 1] * x[..., 1] (see
    apply_rotary_table_slices) TPU-MLIR spends ~77 M GDMA cycles on the four strided Slices
    of q/k and estimates a full-width single block at 115.4 ms (BM1684X BF16, 1280 tokens);
    in this form the estimate is 34.4 ms (double block: 123.2 -> 42.2 ms;
    `python benchmarks/graph_forms.py [--block double]`). The extra
    [D, D] MatMuls are ~0.7% of the block's FLOPs.
    Pass cos_sin=rotary_cos_sin(table, D) to share it between q and k."""
    d = x.shape[-1]
    c, s = cos_sin if cos_sin is not None else rotary_cos_sin(table, d)
    P, _, _ = _rotary_constants(d, x.dtype, x.device)
    return x * c + (x @ P) * s


def apply_rotary_table_slices(x, table):
    """The direct form (sophon-demo style), kept for comparison: x as pairs
    [B, S, H, D/2, 1, 2], out = T[..., 0:1] * x[..., 0:1] + T[..., 1:2] * x[..., 1:2]."""
    shape = x.shape
    xp = x.reshape(shape[0], shape[1], shape[2], shape[3] // 2, 1, 2)
    out = table[..., 0:1] * xp[..., 0:1] + table[..., 1:2] * xp[..., 1:2]  # [B, S, H, D/2, 2, 1]
    return out.reshape(shape)
