"""One declarative spec per exported piece.

Every shape in fluxc is written here, once. Export builds the pieces from these specs and
records them in manifest.json; compile, verify and run read them back from the manifest
(``PieceSpec.from_dict``), so nothing downstream repeats a shape.

Piece names, input order and output order follow the sophon-demo runtime contract
(see README, "How it works").
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fluxc.errors import FluxcError

FLUX_TYPES = ("dev", "schnell", "kontext")
# Denoising steps when none are asked for: what each model card recommends.
DEFAULT_STEPS = {"dev": 28, "schnell": 4, "kontext": 28}

# Which quantisation group a piece belongs to; recipes map groups to TPU-MLIR options.
GROUPS = (
    "clip",
    "t5_head",
    "t5_block",
    "t5_tail",
    "transformer_head",
    "transformer_block",
    "transformer_tail",
    "vae",
    "vae_encoder",
)

@dataclass(frozen=True)
class Kind:
    """What every piece of one kind shares: the one place a piece's kind is described.

    Nothing in fluxc parses a piece's name: a spec carries its kind, and everything else
    (its combined bmodel, its quantisation group, where its weights are, its name) is read
    from this table. The torch wrapper of each kind is chosen by kind in fluxc/export/pieces.py.
    """

    name: str
    family: str  # which combined bmodel the piece ends up in (one of FAMILIES)
    group: str  # quantisation group; recipes map groups to TPU-MLIR options (one of GROUPS)
    component: str  # diffusers pipeline subfolder holding its weights
    parts: tuple[str, ...]  # state-dict prefixes (module naming) of its tensors; "{i}": block index
    name_format: str  # piece name: "{t}" the flux type, "{i}" the block index
    label: str  # short name in summaries ("double 0..12")
    repeated: bool = False  # one piece per block index


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("clip_head", "clip", "clip", "text_encoder", ("embeddings.",), "clip_head", "clip head"),
    Kind("clip_block", "clip", "clip", "text_encoder", ("encoder.layers.{i}.",), "clip_block_{i}", "clip", True),
    Kind("clip_tail", "clip", "clip", "text_encoder", ("final_layer_norm.",), "clip_tail", "clip tail"),
    # T5EncoderModel ties encoder.embed_tokens to shared; checkpoints hold either
    Kind("t5_head", "t5", "t5_head", "text_encoder_2", ("shared.", "encoder.embed_tokens."), "t5_head", "t5 head"),
    Kind("t5_block", "t5", "t5_block", "text_encoder_2",
         ("encoder.block.{i}.", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."), "t5_block_{i}",
         "t5", True),
    Kind("t5_tail", "t5", "t5_tail", "text_encoder_2", ("encoder.final_layer_norm.",), "t5_tail", "t5 tail"),
    Kind("transformer_head", "transformer", "transformer_head", "transformer",
         ("x_embedder.", "time_text_embed.", "context_embedder."), "{t}_head", "head"),
    Kind("double_block", "transformer", "transformer_block", "transformer", ("transformer_blocks.{i}.",),
         "{t}_trans_block_{i}", "double", True),
    Kind("single_block", "transformer", "transformer_block", "transformer", ("single_transformer_blocks.{i}.",),
         "{t}_single_trans_block_{i}", "single", True),
    Kind("transformer_tail", "transformer", "transformer_tail", "transformer", ("norm_out.", "proj_out."),
         "{t}_tail", "tail"),
    Kind("vae", "vae", "vae", "vae", ("decoder.", "post_quant_conv."), "vae_decoder", "vae"),
    Kind("tiny_vae", "vae", "vae", "tiny_vae", ("decoder.", "post_quant_conv."), "tiny_vae_decoder", "tiny vae"),
    # image input (issue 19): the encoder, exported with --image-input (always for Kontext)
    Kind("vae_encoder", "vae_encoder", "vae_encoder", "vae", ("encoder.", "quant_conv."), "vae_encoder",
         "vae encoder"),
    Kind("tiny_vae_encoder", "vae_encoder", "vae_encoder", "tiny_vae", ("encoder.",), "tiny_vae_encoder",
         "tiny vae encoder"),
)}

# Which combined bmodel ("family") a piece ends up in, and the quantisation groups, in order.
FAMILIES = tuple(dict.fromkeys(k.family for k in KINDS.values()))
GROUPS = tuple(dict.fromkeys(k.group for k in KINDS.values()))


# Families whose nets share one name whichever VAE the build holds.
NET_NAMES = {"vae": "vae_decoder", "vae_encoder": "vae_encoder"}


def piece_name(kind: str, flux_type: str | None = None, index: int | None = None) -> str:
    """The name of the piece of that kind (and block index): the ONNX file stem and the net name."""
    return KINDS[kind].name_format.format(t=flux_type, i=index)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, "float32" for every piece input (token ids included)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])


@dataclass(frozen=True)
class PieceSpec:
    name: str  # also the ONNX file stem and the net name in the bmodel
    kind: str  # one of KINDS
    index: int | None  # block index within its kind, None for head/tail/vae
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Upper bound (exclusive) for int inputs, by input name (token ids).
    int_high: dict[str, int] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return KINDS[self.kind].family

    @property
    def group(self) -> str:
        return KINDS[self.kind].group

    @property
    def component(self) -> str:
        """Diffusers pipeline subfolder holding the piece's weights."""
        return KINDS[self.kind].component

    @property
    def parts(self) -> tuple[str, ...]:
        """State-dict prefixes (module naming) whose tensors the piece needs."""
        return tuple(p.format(i=self.index) for p in KINDS[self.kind].parts)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def net_name(self) -> str:
        """Net name inside the bmodel. The sophon-demo runtime opens `vae_decoder` in both
        VAE files; its own compile script named the tiny one `tiny_vae_decoder`, which that
        runtime cannot open. We name both nets `vae_decoder` (and both encoders `vae_encoder`)."""
        return NET_NAMES.get(self.family, self.name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PieceSpec":
        if d.get("kind") not in KINDS:
            from fluxc.errors import FluxcError

            raise FluxcError(f"piece {d.get('name')!r} has no known kind (written by an older fluxc); "
                             "re-run fluxc export")
        return cls(
            name=d["name"],
            kind=d["kind"],
            index=d.get("index"),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            int_high={k: int(v) for k, v in d.get("int_high", {}).items()},
        )

    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs in the piece's own input order (for parity checks and
        the compiler's --test_input). Floats ~ N(0,1); token ids uniform in range;
        timesteps/guidance in the range the runtime feeds (0..1000)."""
        rng = np.random.default_rng([seed, _stable_hash(self.name)])
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            if t.dtype.startswith("int") or t.name in self.int_high:  # token ids, whatever their dtype
                high = self.int_high.get(t.name, 100)
                out[t.name] = rng.integers(0, high, size=t.shape).astype(t.dtype)
            elif t.name in ("timestep", "guidance"):
                out[t.name] = rng.uniform(1.0, 1000.0, size=t.shape).astype(t.dtype)
            elif t.name == "rotary_emb":
                # A real rotary table is made of cos/sin pairs: keep samples in [-1, 1].
                out[t.name] = rng.uniform(-1.0, 1.0, size=t.shape).astype(t.dtype)
            else:
                out[t.name] = rng.standard_normal(size=t.shape).astype(t.dtype)
        return out


def _stable_hash(s: str) -> int:
    return zlib.crc32(s.encode())


@dataclass(frozen=True)
class FluxDims:
    """Everything shape-related about one export, read from the model configs and options."""

    flux_type: str
    height: int
    width: int
    # CLIP
    clip_vocab: int
    clip_dim: int
    clip_layers: int
    clip_len: int
    # T5
    t5_vocab: int
    t5_dim: int
    t5_layers: int
    t5_len: int
    # transformer
    inner_dim: int
    head_dim: int
    in_channels: int
    out_channels: int
    num_double: int
    num_single: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    # VAE
    latent_channels: int
    vae_scale: int  # spatial factor, 8 for FLUX
    tiny_vae: bool
    # image input (issue 19): the VAE encoder is a piece of the export (--image-input)
    image_input: bool = False
    # FLUX.1 Kontext (issue 19): the reference image's size (its tokens follow the image's in
    # the transformer pieces); 0 for dev/schnell
    ref_height: int = 0
    ref_width: int = 0

    def __post_init__(self) -> None:
        if self.flux_type not in FLUX_TYPES:
            raise ValueError(f"unknown flux type {self.flux_type!r}; use one of {FLUX_TYPES}")

    def check_asked(self, flux_type: str | None, tiny_vae: bool | None, where: str) -> None:
        """One-line errors when --flux-type / --tiny-vae/--full-vae ask for another model than
        the one `where` holds (compile, verify and run all check this way)."""
        if flux_type is not None and flux_type != self.flux_type:
            raise FluxcError(f"--flux-type {flux_type} does not match {where}: it is FLUX.1-{self.flux_type}, "
                             f"not {flux_type}; use --flux-type {self.flux_type} or export the {flux_type} model")
        if tiny_vae is not None and tiny_vae != self.tiny_vae:
            have, flag = ("the tiny VAE (taef1)", "--tiny-vae") if self.tiny_vae else ("the full VAE", "--full-vae")
            raise FluxcError(f"{where} holds {have}; use {flag} or re-export")

    @property
    def latent_h(self) -> int:
        return self.height // self.vae_scale

    @property
    def latent_w(self) -> int:
        return self.width // self.vae_scale

    @property
    def image_tokens(self) -> int:
        # latents are packed 2x2 into tokens
        return (self.latent_h // 2) * (self.latent_w // 2)

    @property
    def kontext(self) -> bool:
        return self.flux_type == "kontext"

    @property
    def ref_tokens(self) -> int:
        """Kontext: the reference image's tokens (packed 2x2 like the image's); 0 otherwise."""
        if not self.kontext:
            return 0
        return (self.ref_height // self.vae_scale // 2) * (self.ref_width // self.vae_scale // 2)

    @property
    def hidden_tokens(self) -> int:
        """Image tokens as the transformer pieces see them: the image's, then (Kontext) the reference's."""
        return self.image_tokens + self.ref_tokens

    @property
    def joint_tokens(self) -> int:
        return self.t5_len + self.hidden_tokens

    @property
    def rotary_shape(self) -> tuple[int, ...]:
        return (1, self.joint_tokens, 1, self.head_dim // 2, 2, 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FluxDims":
        return cls(**d)


def _f(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, tuple(shape), "float32")


# Token ids go in as float32, as sophon-demo's runtime feeds them (`ids.astype(np.float32)`) and
# its bmodels take them; the pieces cast them to integers before the lookups. Exact for every id
# of both vocabularies (benchmarks/token_id_dtype.py; docs/DESIGN.md "Token ids").
TOKEN_ID_DTYPE = "float32"


def _i(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, tuple(shape), TOKEN_ID_DTYPE)


def piece_specs(d: FluxDims) -> list[PieceSpec]:
    """All pieces of one export, in pipeline order."""
    specs: list[PieceSpec] = []
    C, L = d.clip_dim, d.clip_len
    ids_c = _i("input_ids", 1, L)
    specs.append(PieceSpec(piece_name("clip_head"), "clip_head", None, (ids_c,), (_f("hidden_states", 1, L, C),),
                           {"input_ids": d.clip_vocab}))
    for i in range(d.clip_layers):
        specs.append(PieceSpec(piece_name("clip_block", index=i), "clip_block", i,
                               (_f("hidden_states", 1, L, C),), (_f("hidden_states_out", 1, L, C),)))
    specs.append(PieceSpec(piece_name("clip_tail"), "clip_tail", None, (_f("hidden_states", 1, L, C), ids_c),
                           (_f("pooled", 1, C),), {"input_ids": d.clip_vocab}))

    T, S = d.t5_dim, d.t5_len
    specs.append(PieceSpec(piece_name("t5_head"), "t5_head", None, (_i("input_ids", 1, S),),
                           (_f("hidden_states", 1, S, T),), {"input_ids": d.t5_vocab}))
    for i in range(d.t5_layers):
        specs.append(PieceSpec(piece_name("t5_block", index=i), "t5_block", i,
                               (_f("hidden_states", 1, S, T),), (_f("hidden_states_out", 1, S, T),)))
    specs.append(PieceSpec(piece_name("t5_tail"), "t5_tail", None, (_f("hidden_states", 1, S, T),),
                           (_f("encoder_hidden_states", 1, S, T),)))

    t, D, N = d.flux_type, d.inner_dim, d.hidden_tokens
    head_in = [_f("hidden_states", 1, N, d.in_channels), _f("timestep", 1)]
    if d.guidance_embeds:
        head_in.append(_f("guidance", 1))
    head_in += [_f("pooled_projections", 1, d.pooled_projection_dim),
                _f("encoder_hidden_states", 1, S, d.joint_attention_dim)]
    specs.append(PieceSpec(piece_name("transformer_head", t), "transformer_head", None, tuple(head_in),
                           (_f("temb", 1, D), _f("encoder_hidden_states_out", 1, S, D),
                            _f("hidden_states_out", 1, N, D))))
    rot = TensorSpec("rotary_emb", d.rotary_shape, "float32")
    for i in range(d.num_double):
        specs.append(PieceSpec(
            piece_name("double_block", t, i), "double_block", i,
            (_f("hidden_states", 1, N, D), _f("encoder_hidden_states", 1, S, D), _f("temb", 1, D), rot),
            (_f("encoder_hidden_states_out", 1, S, D), _f("hidden_states_out", 1, N, D))))
    J = d.joint_tokens
    for i in range(d.num_single):
        specs.append(PieceSpec(
            piece_name("single_block", t, i), "single_block", i,
            (_f("hidden_states", 1, J, D), _f("temb", 1, D), rot), (_f("hidden_states_out", 1, J, D),)))
    specs.append(PieceSpec(piece_name("transformer_tail", t), "transformer_tail", None,
                           (_f("hidden_states", 1, N, D), _f("temb", 1, D)),
                           (_f("noise_pred", 1, N, d.out_channels),)))

    vae = "tiny_vae" if d.tiny_vae else "vae"
    specs.append(PieceSpec(piece_name(vae), vae, None,
                           (_f("latents", 1, d.latent_channels, d.latent_h, d.latent_w),),
                           (_f("image", 1, 3, d.height, d.width),)))
    if d.image_input or d.kontext:  # last, so that the text-to-image pieces keep their order and specs
        specs.append(encoder_spec(d))
    return specs


def encoder_spec(d: FluxDims) -> PieceSpec:
    """The VAE encoder: image[1,3,H,W] in [-1,1] (as diffusers' image processor gives it) ->
    AutoencoderKL: moments[1,2C,H/8,W/8] (mean then logvar, what diffusers' latent distribution
    is made of; the sampling, shift and scale happen in the runtime, where diffusers does them);
    AutoencoderTiny: latents[1,C,H/8,W/8] (taef1's encoder output, used as it is)."""
    H, W = (d.ref_height, d.ref_width) if d.kontext else (d.height, d.width)  # Kontext: the reference
    C, h, w = d.latent_channels, H // d.vae_scale, W // d.vae_scale
    kind = "tiny_vae_encoder" if d.tiny_vae else "vae_encoder"
    out = _f("latents", 1, C, h, w) if d.tiny_vae else _f("moments", 1, 2 * C, h, w)
    return PieceSpec(piece_name(kind), kind, None, (_f("image", 1, 3, H, W),), (out,))


def specs_by_name(specs: list[PieceSpec]) -> dict[str, PieceSpec]:
    return {s.name: s for s in specs}
