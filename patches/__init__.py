"""fluxc.patches: in-memory, reversible, version-aware export-friendly swaps.

Nothing here edits installed files. A `Patcher` records every attribute it sets on a module
instance and restores it on `restore()` / leaving the `with` block:

    from fluxc.patches import Patcher
    with Patcher() as p:
        p.apply(transformer)            # all patches; or p.apply(m, ("rmsnorm",))
        ...torch.onnx.export(...)
    # transformer is exactly as before

Patches (ALL_PATCHES, by name):
- "rmsnorm": torch.nn.RMSNorm / diffusers RMSNorm / transformers T5LayerNorm forward ->
  x * rsqrt(mean(x^2) + eps) * w (TorchScript export has no aten::rms_norm).
- "flux_attention": FluxAttention.processor -> FluxAttnExportProcessor (elementary RMSNorm,
  real rotary from the [1,S,1,D/2,2,2] table, explicit MatMul+Softmax attention with the scale
  in the q norm; attention="fattention" writes the chain TPU-MLIR fuses into FAttention).
- "adaln": AdaLayerNormZero / AdaLayerNormZeroSingle / AdaLayerNormContinuous split their
  modulation with constant Slices instead of chunk (no Shape/Gather chains in the graph).
- "downsample": diffusers Downsample2D (the VAE encoder) pads by Concat with zeros instead of a
  Pad whose pads are computed (static shapes without constant folding).
Helpers that build new modules instead of swapping attributes:
- rotary_table(...) / rotary_table_from_ids(...) / apply_rotary_table(x, table)
- t5_position_bias(block0_attn, S) + t5_block_export(block, bias): one T5 block, constants baked
- clip_causal_mask(L) + clip_layer_export(layer, L): one CLIP layer, causal mask baked

Measurement: `python benchmarks/graph_forms.py` compiles one full-width block in each
graph form with TPU-MLIR and prints the compiler's on-chip estimate (the numbers quoted in
flux_attention.py / rotary.py / fluxc/export/pieces.py).

Versions: written for diffusers 0.42.x and transformers 5.x (WRITTEN_FOR). Another version
is accepted when the module structure matches (warning), else FluxcError names the module;
Patcher(strict=True) refuses any other version.
"""
from __future__ import annotations

from ._base import WRITTEN_FOR, Patcher, installed_version
from .adaln import patch_adaln
from .downsample import patch_downsample
from .flux_attention import FluxAttnExportProcessor, attention_bshd, patch_flux_attention
from .rmsnorm import patch_rmsnorm, rms_norm
from .rotary import apply_rotary_table, apply_rotary_table_slices, flux_ids, rotary_cos_sin, rotary_table, rotary_table_from_ids
from .text_encoders import (
    CLIP_MASK_VALUE,
    CLIPLayerExport,
    T5BlockExport,
    clip_causal_mask,
    clip_layer_export,
    t5_block_export,
    t5_position_bias,
)

ALL_PATCHES = {
    "rmsnorm": patch_rmsnorm,
    "flux_attention": patch_flux_attention,
    "adaln": patch_adaln,
    "downsample": patch_downsample,
}

__all__ = [
    "ALL_PATCHES", "WRITTEN_FOR", "Patcher", "installed_version", "patch_adaln", "patch_downsample",
    "FluxAttnExportProcessor", "attention_bshd", "patch_flux_attention",
    "patch_rmsnorm", "rms_norm",
    "apply_rotary_table", "apply_rotary_table_slices", "rotary_cos_sin", "flux_ids", "rotary_table", "rotary_table_from_ids",
    "CLIP_MASK_VALUE", "CLIPLayerExport", "T5BlockExport", "clip_causal_mask", "clip_layer_export",
    "t5_block_export", "t5_position_bias",
]
