"""Per-piece torch wrappers: the nn.Module that gets exported to `<piece>.onnx`.

Contract with the export driver (fluxc/export/*):

    comp_name = spec.component               # "text_encoder" | "text_encoder_2" | "transformer" | "vae"
    prefixes  = spec.parts                   # state-dict prefixes (module naming) the piece needs
    # build the component on the meta device, materialise only tensors whose module key starts
    # with one of `prefixes` (checkpoint keys -> module keys: module_key(comp_name, key)), then
    mod = build_piece_module(spec, dims, component)
    args = tuple(torch.from_numpy(a) for a in spec.sample_inputs().values())
    outs = mod(*args)                         # tuple, outputs in spec order
    torch.onnx.export(mod, args, f, input_names=[t.name for t in spec.inputs],
                      output_names=[t.name for t in spec.outputs], opset_version=17, dynamo=False)
    mod.fluxc_patcher.restore()               # optional: undo the in-memory patches

`component` is the root module of the piece's family: CLIPTextModel (transformers 5.x layout:
embeddings / encoder.layers / final_layer_norm), T5EncoderModel, FluxTransformer2DModel,
AutoencoderKL or AutoencoderTiny. The wrapper holds references to the component's own
submodules (no copy), except the single block's proj_out which is split into two weights.
Export patches (fluxc.patches) are applied to those submodules when the wrapper is built;
the Patcher is kept as `mod.fluxc_patcher`.

Per piece kind (fluxc.specs.KINDS; names/order from fluxc.specs.piece_specs; the wrapper of each
kind is WRAPPERS[kind] below):
- clip_head: embeddings(input_ids)  (token + position embedding; float32 ids cast to int32)
- clip_block_i: one CLIPEncoderLayer with the causal mask baked in
- clip_tail: final_layer_norm, then the row at the eos position: transformers 5.x
  CLIPTextModel uses argmax(input_ids) when config.eos_token_id == 2 (the legacy FLUX/openai
  config) and else the first position where input_ids == eos_token_id. Batch 1.
- t5_head: shared embedding; t5_block_i: one T5 block with block 0's relative bias + zero
  mask baked in; t5_tail: final_layer_norm (T5 RMSNorm).
- {type}_head: x_embedder, time_text_embed(timestep, [guidance], pooled) with timestep and
  guidance ALREADY x1000, context_embedder.
- {type}_trans_block_i: FluxTransformerBlock with the export attention processor.
- {type}_single_trans_block_i: FluxSingleTransformerBlock math written on the concatenated
  [text; image] sequence (no split/re-concat); proj_out(cat[attn, mlp]) is computed as
  attn @ Wa^T + mlp @ Wm^T + b so the [S, 5D] concatenation never exists (TPU-MLIR estimate
  for a full-width block at 1280 tokens, BF16: 34.45 ms split vs 42.50 ms concat;
  `python benchmarks/graph_forms.py`).
- {type}_tail: norm_out(hidden, temb) then proj_out.
- vae_decoder / tiny_vae_decoder: image = decoder(latents / scaling_factor + shift_factor)
  with the VAE's own config values, as FluxPipeline does before vae.decode (for
  AutoencoderTiny the pipeline does the same with the tiny VAE's config).
- vae_encoder: moments = quant_conv(encoder(image)) (quant_conv when the VAE has one; FLUX's has
  none), what AutoencoderKL.encode makes its DiagonalGaussianDistribution of (mean, logvar);
  tiny_vae_encoder: latents = AutoencoderTiny's encoder(image) (it maps [-1,1] to [0,1] itself).
  AutoencoderKL's Downsample2D gets the "downsample" export patch (static-shape zero padding).
  Image in [-1, 1], as diffusers' VaeImageProcessor gives it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluxc.errors import FluxcError
from fluxc.patches import Patcher, clip_layer_export, t5_block_export, t5_position_bias
from fluxc.specs import KINDS, FluxDims, PieceSpec

# Checkpoint key prefixes that the module layout drops (transformers 5.x CLIPTextModel has no
# `text_model.` level; FLUX's text_encoder/model.safetensors still uses it).
CHECKPOINT_PREFIX_DROP = {"text_encoder": ("text_model.",)}


def module_key(component: str, checkpoint_key: str) -> str:
    """Map a checkpoint tensor name to the module's state-dict name."""
    for p in CHECKPOINT_PREFIX_DROP.get(component, ()):
        if checkpoint_key.startswith(p):
            return checkpoint_key[len(p):]
    return checkpoint_key


def needs_tensor(spec: PieceSpec, checkpoint_key: str) -> bool:
    """Whether the checkpoint tensor is needed by this piece."""
    k = module_key(spec.component, checkpoint_key)
    return any(k.startswith(p) for p in spec.parts)


# --------------------------------------------------------------------------- wrappers
class _Piece(nn.Module):
    fluxc_patcher: Patcher


class ClipHead(_Piece):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids):
        return self.embeddings(input_ids=input_ids.to(torch.int32))  # ids come in as float32


class ClipTail(_Piece):
    def __init__(self, final_layer_norm: nn.Module, eos_token_id: int | None):
        super().__init__()
        self.final_layer_norm = final_layer_norm
        self.eos_token_id = eos_token_id

    def forward(self, hidden_states, input_ids):
        h = self.final_layer_norm(hidden_states)
        ids = input_ids.to(torch.int32)
        if self.eos_token_id == 2:
            idx = ids.argmax(dim=-1)
        else:
            idx = (ids == self.eos_token_id).to(torch.int32).argmax(dim=-1)
        # batch 1: the row at idx[0]
        return h.index_select(1, idx).reshape(h.shape[0], h.shape[2])


class T5Head(_Piece):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids.to(torch.int32))  # ids come in as float32


class Single(_Piece):
    """A module returning one tensor, used for t5_tail (final RMSNorm)."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self.mod = mod

    def forward(self, x):
        return self.mod(x)


class TransformerHeadDev(_Piece):
    def __init__(self, tr: nn.Module):
        super().__init__()
        self.x_embedder, self.time_text_embed, self.context_embedder = tr.x_embedder, tr.time_text_embed, tr.context_embedder

    def forward(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states):
        temb = self.time_text_embed(timestep, guidance, pooled_projections)
        return temb, self.context_embedder(encoder_hidden_states), self.x_embedder(hidden_states)


class TransformerHeadSchnell(_Piece):
    def __init__(self, tr: nn.Module):
        super().__init__()
        self.x_embedder, self.time_text_embed, self.context_embedder = tr.x_embedder, tr.time_text_embed, tr.context_embedder

    def forward(self, hidden_states, timestep, pooled_projections, encoder_hidden_states):
        temb = self.time_text_embed(timestep, pooled_projections)
        return temb, self.context_embedder(encoder_hidden_states), self.x_embedder(hidden_states)


class DoubleBlock(_Piece):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        enc, hid = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                              temb=temb, image_rotary_emb=rotary_emb)
        return enc, hid


class SingleBlock(_Piece):
    """FluxSingleTransformerBlock on the concatenated [text; image] sequence."""

    def __init__(self, block: nn.Module, split_proj_out: bool = True):
        super().__init__()
        self.norm, self.proj_mlp, self.act_mlp, self.attn = block.norm, block.proj_mlp, block.act_mlp, block.attn
        self.split = split_proj_out
        # The checkpoint's own proj_out (no copies): with split_proj_out its two column blocks
        # are sliced in the graph, so every initializer of the piece is a checkpoint tensor
        # (the export references weights in place; TPU-MLIR folds the constant slices).
        self.proj_out = block.proj_out

    def forward(self, hidden_states, temb, rotary_emb):
        x, gate = self.norm(hidden_states, emb=temb)
        mlp = self.act_mlp(self.proj_mlp(x))
        attn = self.attn(hidden_states=x, image_rotary_emb=rotary_emb)
        if self.split:
            w, d = self.proj_out.weight, attn.shape[-1]
            out = F.linear(attn, w[:, :d], self.proj_out.bias) + F.linear(mlp, w[:, d:])
        else:
            out = self.proj_out(torch.cat([attn, mlp], dim=2))
        return hidden_states + gate.unsqueeze(1) * out


class TransformerTail(_Piece):
    def __init__(self, tr: nn.Module):
        super().__init__()
        self.norm_out, self.proj_out = tr.norm_out, tr.proj_out

    def forward(self, hidden_states, temb):
        return self.proj_out(self.norm_out(hidden_states, temb))


class VaeDecoder(_Piece):
    """latents (packed-space, as the transformer sees them) -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift = float(shift) if shift is not None else 0.0
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder

    def forward(self, latents):
        z = latents / self.scaling + self.shift
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VaeEncoder(_Piece):
    """image in [-1, 1] -> the encoder's output as diffusers' `vae.encode` reads it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)

    def forward(self, image):
        h = self.encoder(image)
        return self.quant_conv(h) if self.quant_conv is not None else h


# --------------------------------------------------------------------------- factory
def _sub(component: Any, dotted: str, spec: PieceSpec):
    mod = component
    for part in dotted.split("."):
        try:
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        except (AttributeError, IndexError, TypeError):
            raise FluxcError(f"piece {spec.name}: {type(component).__name__} has no '{dotted}'; "
                             f"pass the {spec.component} component (diffusers/transformers layout)") from None
    return mod


def build_piece_module(spec: PieceSpec, dims: FluxDims, component: Any, *,
                       patcher: Patcher | None = None, split_proj_out: bool = True) -> nn.Module:
    """The eval-mode nn.Module for `spec`: forward(*inputs in spec order) -> tuple of outputs
    in spec order (a 1-tuple for single-output pieces; see module docstring)."""
    p = patcher or Patcher()
    try:
        mod = _build(spec, dims, component, p, split_proj_out)
    except BaseException:
        if patcher is None:
            p.restore()  # leave the component as it was
        raise
    mod.eval()
    object.__setattr__(mod, "fluxc_patcher", p)
    return mod


# --------------------------------------------------------------------------- one wrapper per kind
def _clip_head(spec, dims, c, p, split):
    return ClipHead(_sub(c, "embeddings", spec))


def _clip_block(spec, dims, c, p, split):
    i = spec.index
    return _Tuple(clip_layer_export(_sub(c, f"encoder.layers.{i}", spec), dims.clip_len, p, f"encoder.layers.{i}"))


def _clip_tail(spec, dims, c, p, split):
    return ClipTail(_sub(c, "final_layer_norm", spec), getattr(c.config, "eos_token_id", 2))


def _t5_head(spec, dims, c, p, split):
    embed = getattr(c, "shared", None)
    return T5Head(embed if embed is not None else _sub(c, "encoder.embed_tokens", spec))


def _t5_block(spec, dims, c, p, split):
    i, blocks = spec.index, _sub(c, "encoder.block", spec)
    bias = t5_position_bias(_sub(c, "encoder.block.0.layer.0.SelfAttention", spec), dims.t5_len)
    mod = _Tuple(t5_block_export(blocks[i], bias, p, f"encoder.block.{i}"))
    p.apply(blocks[i], ("rmsnorm",), f"encoder.block.{i}")
    return mod


def _t5_tail(spec, dims, c, p, split):
    norm = _sub(c, "encoder.final_layer_norm", spec)
    p.apply(norm, ("rmsnorm",), "encoder.final_layer_norm")
    return Single(norm)


def _transformer_head(spec, dims, c, p, split):
    return (TransformerHeadDev if dims.guidance_embeds else TransformerHeadSchnell)(c)


def _double_block(spec, dims, c, p, split):
    block = _sub(c, f"transformer_blocks.{spec.index}", spec)
    p.apply(block, None, f"transformer_blocks.{spec.index}")
    return DoubleBlock(block)


def _single_block(spec, dims, c, p, split):
    block = _sub(c, f"single_transformer_blocks.{spec.index}", spec)
    p.apply(block, None, f"single_transformer_blocks.{spec.index}")
    return SingleBlock(block, split_proj_out=split)


def _transformer_tail(spec, dims, c, p, split):
    p.apply(c.norm_out, ("adaln",), "norm_out")
    return TransformerTail(c)


def _vae(spec, dims, c, p, split):
    return VaeDecoder(c)


def _vae_encoder(spec, dims, c, p, split):
    if spec.kind == "vae_encoder":  # AutoencoderKL: Downsample2D pads (taef1 has none)
        p.apply(c.encoder, ("downsample",), "encoder")
    return VaeEncoder(c)


# kind (fluxc.specs.KINDS) -> wrapper builder(spec, dims, component, patcher, split_proj_out)
WRAPPERS = {"clip_head": _clip_head, "clip_block": _clip_block, "clip_tail": _clip_tail, "t5_head": _t5_head,
            "t5_block": _t5_block, "t5_tail": _t5_tail, "transformer_head": _transformer_head,
            "double_block": _double_block, "single_block": _single_block, "transformer_tail": _transformer_tail,
            "vae": _vae, "tiny_vae": _vae, "vae_encoder": _vae_encoder, "tiny_vae_encoder": _vae_encoder}
assert set(WRAPPERS) == set(KINDS), "every kind of fluxc.specs.KINDS needs a wrapper"


def _build(spec: PieceSpec, dims: FluxDims, component: Any, p: Patcher, split_proj_out: bool) -> nn.Module:
    mod = WRAPPERS[spec.kind](spec, dims, component, p, split_proj_out)
    if len(spec.outputs) == 1 and not isinstance(mod, _Tuple):
        mod = _Tuple(mod)
    return mod


class _Tuple(_Piece):
    """Wraps a single-output module so forward always returns a tuple."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self.mod = mod

    def forward(self, *args):
        return (self.mod(*args),)


def build_all_pieces(specs: list[PieceSpec], dims: FluxDims, components: dict[str, Any],
                     patcher: Patcher | None = None) -> dict[str, nn.Module]:
    """Wrappers for every spec whose component is in `components` (by subfolder name).
    Convenience for tests and small models that are fully materialised."""
    p = patcher or Patcher()
    return {s.name: build_piece_module(s, dims, components[s.component], patcher=p)
            for s in specs if s.component in components}
