"""The built-in tiny FLUX.1 model: random weights, real architecture, diffusers layout.

``build_tiny(out, flux_type)`` writes a folder that ``diffusers.FluxPipeline.from_pretrained``
loads offline: model_index.json, transformer/ (FluxTransformer2DModel), text_encoder/
(CLIPTextModel), text_encoder_2/ (T5EncoderModel), tokenizer/ (CLIP BPE), tokenizer_2/ (T5
sentencepiece), vae/ (AutoencoderKL), scheduler/ (FlowMatchEulerDiscreteScheduler), plus
tiny_vae/ (AutoencoderTiny with taef1's block structure) and fluxc_tiny.json (how it was made).

Weights are written tensor by tensor straight into safetensors files: each model is built on
torch's "meta" device (names and shapes only, no memory), and every tensor is drawn from its
own generator seeded by (seed, component, tensor name). So:
- the same seed gives byte-identical files;
- dev and schnell built with the same seed share identical text encoders and VAEs;
- a big checkpoint (benchmark overrides, the "full" preset) never needs more than one tensor
  in memory.

Presets: "tiny" (the default; small sizes the tests rely on) and "full" (exactly the published
FLUX.1-dev/-schnell sizes: a 12B transformer, CLIP-L, T5-XXL encoder, the FLUX VAE, bf16,
sharded like the Hub repos). The tokenizers are always the tiny offline ones (their ids fit
any larger vocabulary); their model_max_length is 77 (CLIP) and 512 (T5) as in FLUX.1.

Sharded layout (``sharded=True``, implied by the full preset): transformer/ as
diffusion_pytorch_model-0000K-of-00003.safetensors and text_encoder_2/ as
model-0000K-of-00002.safetensors, each with its *.safetensors.index.json, the file names of
the Hub's FLUX.1 repos. The tensors are the same as unsharded with the same seed.

Initialisation is our own (not the libraries' defaults, which zero some output and AdaLN
layers): every weight is random with a fan-in scaled std, so each piece's output depends on
its input and activations stay O(1) through the blocks.
"""
from __future__ import annotations

import copy
import hashlib
import json
import operator
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from fluxc.errors import FluxcError
from fluxc.tokenizers_offline import write_tokenizers

FLUX_TYPES = ("schnell", "dev", "kontext")  # kontext: dev's transformer, FluxKontextPipeline's index
DTYPES = ("float32", "float16", "bfloat16")
COMPONENT_KEYS = ("transformer", "clip", "t5", "vae", "tiny_vae")
MARKER = "fluxc_tiny.json"

# Default sizes. Other parts of fluxc (and their tests) rely on these exact values.
TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 3,
    "num_single_layers": 3,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 128,
    "pooled_projection_dim": 128,
    "axes_dims_rope": [16, 24, 24],
}
CLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 128,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
T5_DEFAULTS: dict[str, Any] = {
    "d_model": 128,
    "d_kv": 64,
    "num_heads": 2,
    "d_ff": 256,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
}
VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# taef1: AutoencoderTiny with 16 latent channels and TAESD's block layout; channels reduced.
TINY_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [32, 32, 32, 32],
    "decoder_block_out_channels": [32, 32, 32, 32],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 16,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}
PRESETS = ("tiny", "full")
# The published FLUX.1-dev/-schnell sizes: transformer/config.json, text_encoder/config.json
# (openai/clip-vit-large-patch14's text model), text_encoder_2/config.json
# (google/t5-v1_1-xxl's encoder), vae/config.json. guidance_embeds follows the flux type.
FULL_PRESET: dict[str, Any] = {
    "dtype": "bfloat16",
    "transformer": {
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "axes_dims_rope": [16, 56, 56],
    },
    "clip": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        # the legacy openai ids: eos_token_id 2 makes CLIP pool at argmax(input_ids), which
        # lands on the tokenizer's end-of-text (its highest id), as in FLUX.1
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "t5": {
        "vocab_size": 32128,
        "d_model": 4096,
        "num_heads": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_decoder_layers": 24,  # the rest as T5_DEFAULTS (gated-gelu, 32/128 buckets, eps 1e-6)
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
    },
    # madebyollin/taef1's channel widths (not part of the Hub's FLUX.1 repos; fluxc's extra)
    "tiny_vae": {
        "encoder_block_out_channels": [64, 64, 64, 64],
        "decoder_block_out_channels": [64, 64, 64, 64],
    },
}
# Shard counts of the Hub's FLUX.1 repos (folder -> number of safetensors files).
HUB_SHARDS = {"transformer": 3, "text_encoder_2": 2}


def preset_overrides(preset: str) -> dict[str, Any]:
    """The build_tiny overrides of a named preset ("tiny": none)."""
    if preset not in PRESETS:
        raise FluxcError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)} (e.g. --preset full)")
    return copy.deepcopy(FULL_PRESET) if preset == "full" else {}


# The real FLUX.1 scheduler_config.json values (everything else: diffusers defaults).
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "schnell": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "dev": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}
SCHEDULER_CONFIGS["kontext"] = dict(SCHEDULER_CONFIGS["dev"])  # FLUX.1-Kontext-dev ships dev's

Progress = Callable[[str], None]
BIG_FILE_BYTES = 200_000_000  # report progress inside weight files larger than this


# ------------------------------------------------------------------------------ configs
def resolve_configs(flux_type: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge defaults and overrides into the five model configs (vocab sizes filled later).
    Keeps the cross-model sizes consistent: transformer.joint_attention_dim == t5.d_model and
    transformer.pooled_projection_dim == clip.hidden_size (one side given -> the other follows)."""
    if flux_type not in FLUX_TYPES:
        raise FluxcError(f"unknown flux type {flux_type!r}: use one of {', '.join(FLUX_TYPES)} (e.g. --flux-type schnell)")
    overrides = dict(overrides or {})
    dtype = overrides.pop("dtype", "float32")
    if str(dtype).replace("torch.", "") not in DTYPES:
        raise FluxcError(f"unsupported dtype {dtype!r} for tiny weights: use one of {', '.join(DTYPES)}")
    dtype = str(dtype).replace("torch.", "")
    unknown = set(overrides) - set(COMPONENT_KEYS)
    if unknown:
        raise FluxcError(f"unknown tiny-model override(s) {sorted(unknown)}: use {', '.join(COMPONENT_KEYS)} or dtype")
    for k, v in overrides.items():
        if not isinstance(v, dict):
            raise FluxcError(f"override {k} must be a dict of config values, got {type(v).__name__}")

    tr = {**TRANSFORMER_DEFAULTS, "guidance_embeds": flux_type in ("dev", "kontext"), **overrides.get("transformer", {})}
    clip = {**CLIP_DEFAULTS, **overrides.get("clip", {})}
    t5 = {**T5_DEFAULTS, **overrides.get("t5", {})}
    vae = {**VAE_DEFAULTS, **overrides.get("vae", {})}
    tvae = {**TINY_VAE_DEFAULTS, **overrides.get("tiny_vae", {})}
    o_tr, o_clip, o_t5 = overrides.get("transformer", {}), overrides.get("clip", {}), overrides.get("t5", {})

    def tie(a: dict, ak: str, a_given: bool, b: dict, bk: str, b_given: bool, what: str) -> None:
        if a[ak] == b[bk]:
            return
        if a_given and b_given:
            raise FluxcError(f"inconsistent tiny-model overrides: {what} ({a[ak]} vs {b[bk]}); give equal values")
        if a_given:
            b[bk] = a[ak]
        else:
            a[ak] = b[bk]

    tie(tr, "joint_attention_dim", "joint_attention_dim" in o_tr, t5, "d_model", "d_model" in o_t5,
        "transformer.joint_attention_dim must equal t5.d_model")
    tie(tr, "pooled_projection_dim", "pooled_projection_dim" in o_tr, clip, "hidden_size", "hidden_size" in o_clip,
        "transformer.pooled_projection_dim must equal clip.hidden_size")
    if "projection_dim" not in o_clip:
        clip["projection_dim"] = clip["hidden_size"]
    hd = int(tr["attention_head_dim"])
    if "axes_dims_rope" not in o_tr and sum(tr["axes_dims_rope"]) != hd:
        if hd < 32 or (hd - 16) % 4:
            raise FluxcError(f"attention_head_dim {hd} needs an explicit axes_dims_rope override summing to it")
        tr["axes_dims_rope"] = [16, (hd - 16) // 2, (hd - 16) // 2]  # 128 -> (16, 56, 56) as in FLUX.1
    tr["axes_dims_rope"] = [int(x) for x in tr["axes_dims_rope"]]
    if sum(tr["axes_dims_rope"]) != hd or any(x % 2 for x in tr["axes_dims_rope"]):
        raise FluxcError(f"axes_dims_rope {tr['axes_dims_rope']} must be even numbers summing to attention_head_dim {hd}")
    if vae["latent_channels"] != 16 or tvae["latent_channels"] != 16:
        raise FluxcError("FLUX latents have 16 channels: do not override vae/tiny_vae latent_channels")
    if tr["in_channels"] != 4 * vae["latent_channels"]:
        raise FluxcError("transformer in_channels must be 64 (16 latent channels packed 2x2)")
    return {"transformer": tr, "clip": clip, "t5": t5, "vae": vae, "tiny_vae": tvae, "dtype": dtype,
            "scheduler": dict(SCHEDULER_CONFIGS[flux_type])}


# ------------------------------------------------------------------------------ weights
def _tensor_seed(seed: int, component: str, name: str) -> int:
    h = hashlib.sha256(f"fluxc-tiny/{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ADALN = re.compile(r"(^|\.)(norm1|norm1_context|norm|norm_out)\.linear\.weight$")


def _init_rule(component: str, module_name: str, module, pname: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) for one tensor. Weight matrices get a fan-in scaled std; norms get
    weights near 1; biases a small spread. Nothing is left at zero."""
    import torch.nn as nn

    cls = type(module).__name__
    full = f"{module_name}.{pname}" if module_name else pname
    if pname == "bias":
        if component == "tiny_vae" and tuple(shape) == (3,) and module_name.startswith("decoder."):
            # TAESD's decoder outputs images in [0, 1] (diffusers maps them to [-1, 1]):
            # centre the random output there instead of at the black edge.
            return 0.5, 0.02
        return 0.0, 0.02
    if "Norm" in cls:  # LayerNorm, GroupNorm, RMSNorm, T5LayerNorm
        return 1.0, 0.1
    if isinstance(module, nn.Embedding):
        if "relative_attention_bias" in module_name:
            return 0.0, 0.5
        if "position" in module_name:
            return 0.0, 0.5
        return 0.0, 1.0
    if isinstance(module, (nn.Linear, nn.Conv2d)) and len(shape) >= 2:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= int(d)
        gain = 1.0
        if component == "tiny_vae":
            # TAESD has no norms: ReLU convs inside a block get He gain, the block's last
            # conv (added to the skip path) gain 1, so the scale stays O(1) over 20 blocks.
            if module_name.endswith((".conv.0", ".conv.2")):
                gain = 2.0**0.5
        if component == "t5" and module_name.endswith("SelfAttention.q"):
            gain = float(module.key_value_proj_dim if hasattr(module, "key_value_proj_dim") else 64) ** -0.5
        if component == "transformer" and _ADALN.search(full):
            gain = 0.5  # AdaLN shift/scale/gate: keep modulation moderate through the blocks
        return 0.0, gain / fan_in**0.5
    return 0.0, 0.02


class _SafetensorsWriter:
    """Stream tensors into one .safetensors file; the header (names, shapes, offsets) is
    known up front, then each tensor is generated, written and dropped."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str):
        self.path, self.entries, self.dtype = Path(path), entries, dtype
        itemsize = 4 if dtype == "float32" else 2
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in entries:
            n = itemsize
            for d in shape:
                n *= int(d)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self.header = raw
        self.total = off

    def write(self, make: Callable[[str, tuple[int, ...]], Any], tick: Callable[[int, int], None] | None = None,
              done: int = 0, total: int | None = None) -> int:
        """Write the file; `tick(bytes done, total)` after each tensor (`done`/`total` let
        several files share one count)."""
        import torch

        tdtype = getattr(torch, self.dtype)
        total = self.total if total is None else total
        with open(self.path, "wb") as f:
            f.write(len(self.header).to_bytes(8, "little"))
            f.write(self.header)
            for name, shape in self.entries:
                t = make(name, shape)
                t = t.to(tdtype).contiguous()
                f.write(memoryview(t.view(torch.uint8).numpy()))
                done += t.numel() * t.element_size()
                del t
                if tick is not None:
                    tick(done, total)
        return 8 + len(self.header) + self.total

    def sizes(self) -> dict[str, int]:
        itemsize = 4 if self.dtype == "float32" else 2
        out = {}
        for name, shape in self.entries:
            n = itemsize
            for d in shape:
                n *= int(d)
            out[name] = n
        return out


def _split_entries(entries: list[tuple[str, tuple[int, ...]]], nbytes: dict[str, int], shards: int) -> list[list]:
    """Cut the (sorted) tensor list into `shards` consecutive groups of about equal bytes."""
    if shards > len(entries):
        raise FluxcError(f"cannot split {len(entries)} tensors into {shards} shards")
    total = sum(nbytes.values())
    groups: list[list] = [[] for _ in range(shards)]
    start = 0
    for i, (name, shape) in enumerate(entries):
        k = min(shards - 1, start * shards // max(total, 1))
        k = max(k, min(shards - 1, shards - (len(entries) - i)))  # leave no later shard empty
        groups[k].append((name, shape))
        start += nbytes[name]
    for k in range(shards):  # an early shard left empty by a huge tensor: borrow the next one's first
        if not groups[k]:
            for j in range(k + 1, shards):
                if len(groups[j]) > 1:
                    groups[k].append(groups[j].pop(0))
                    break
    if any(not g for g in groups):
        raise FluxcError(f"cannot split {len(entries)} tensors into {shards} non-empty shards")
    return groups


def _write_weights(model, folder: Path, filename: str, component: str, seed: int, dtype: str,
                   progress: Progress | None = None, shards: int = 1) -> int:
    """Generate every state_dict tensor of a meta-device `model` into folder/filename, or, with
    shards > 1, into STEM-0000K-of-0000N.safetensors files plus STEM.safetensors.index.json
    (the layout save_pretrained writes for big models)."""
    import torch

    params: dict[str, tuple[str, Any, str]] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # a tied parameter under a second name
                continue
            seen.add(id(p))
            params[f"{mname}.{pname}" if mname else pname] = (mname, mod, pname)
    sd = model.state_dict(keep_vars=True)
    # tied duplicates (T5's encoder.embed_tokens -> shared): same tensor object, same values
    source_of: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for k, v in sd.items():
        if k in params:
            by_id.setdefault(id(v), k)
    for k, v in sd.items():
        src = k if k in params else by_id.get(id(v))
        if src is None:
            raise RuntimeError(f"{component}: state_dict entry {k} is not a parameter; cannot initialise it")
        source_of[k] = src

    def make(name: str, shape: tuple[int, ...]):
        src = source_of[name]
        mname, mod, pname = params[src]
        mean, std = _init_rule(component, mname, mod, pname, shape)
        g = torch.Generator().manual_seed(_tensor_seed(seed, component, src))
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if component == "tiny_vae" and pname == "weight" and len(shape) == 4 and shape[1] > 3 and shape[1] != 16:
            # Convs fed by ReLU outputs (all >= 0): zero-mean filters, or every layer adds
            # a per-channel offset and the decoded image drifts into saturation.
            t -= t.mean(dim=(1, 2, 3), keepdim=True)
        return t.mul_(std).add_(mean)

    # Like save_pretrained: a tied duplicate (T5's encoder.embed_tokens) is not stored; the
    # loader ties it back to its source.
    entries = [(k, tuple(sd[k].shape)) for k in sorted(sd) if source_of[k] == k]
    whole = _SafetensorsWriter(folder / filename, entries, dtype)
    total = whole.total
    tick = None
    if progress is not None and total > BIG_FILE_BYTES:
        last = [0]
        t0 = time.time()

        def tick(done: int, total: int) -> None:
            step = done * 20 // total
            if step > last[0]:
                last[0] = step
                progress(f"  {component}: {done / 1e9:.2f} / {total / 1e9:.2f} GB ({time.time() - t0:.0f} s)")

    if shards <= 1:
        return whole.write(make, tick)
    stem = filename[: -len(".safetensors")]
    groups = _split_entries(entries, whole.sizes(), shards)
    weight_map: dict[str, str] = {}
    done = written = 0
    for i, group in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{shards:05d}.safetensors"
        w = _SafetensorsWriter(folder / name, group, dtype)
        written += w.write(make, tick, done, total)
        done += w.total
        weight_map.update({k: name for k, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{filename}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written


# ------------------------------------------------------------------------------ components
def _meta(build: Callable[[], Any]):
    import torch

    with torch.device("meta"):
        return build()


def _write_diffusers_model(cls, config: dict, folder: Path, component: str, seed: int, dtype: str,
                           progress: Progress | None = None, shards: int = 1) -> int:
    folder.mkdir(parents=True)
    model = _meta(lambda: cls(**config))
    model.save_config(str(folder))
    return _write_weights(model, folder, "diffusion_pytorch_model.safetensors", component, seed, dtype, progress, shards)


def _write_transformers_model(model_cls, config, folder: Path, component: str, seed: int, dtype: str,
                              progress: Progress | None = None, shards: int = 1) -> int:
    folder.mkdir(parents=True)
    model = _meta(lambda: model_cls(config))
    config.architectures = [model_cls.__name__]
    config.dtype = dtype
    config.save_pretrained(str(folder))
    return _write_weights(model, folder, "model.safetensors", component, seed, dtype, progress, shards)


def _write_model_index(out: Path, flux_type: str = "schnell") -> None:
    import diffusers

    index = {
        "_class_name": "FluxKontextPipeline" if flux_type == "kontext" else "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _vocab(cfg: dict, tokenizer_vocab: int, what: str) -> tuple[int, dict]:
    """(vocab size, other config values): the configured vocab_size if given (the full
    preset's published one), else the tokenizer's; it must hold every tokenizer id."""
    rest = dict(cfg)
    vocab = int(rest.pop("vocab_size", tokenizer_vocab))
    if vocab < tokenizer_vocab:
        raise FluxcError(f"{what} vocab_size {vocab} is smaller than the tokenizer's {tokenizer_vocab} ids; "
                         f"give at least {tokenizer_vocab}")
    return vocab, rest


def _build_into(tmp: Path, flux_type: str, seed: int, cfg: dict, progress: Progress,
                sharded: bool = False) -> dict[str, int]:
    import transformers
    from diffusers import AutoencoderKL, AutoencoderTiny, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    dtype = cfg["dtype"]
    sizes: dict[str, int] = {}
    tmp.mkdir(parents=True)

    progress("tokenizers: CLIP byte-level BPE + T5 sentencepiece (trained on the built-in corpus)")
    clip_vocab, t5_vocab = write_tokenizers(tmp / "tokenizer", tmp / "tokenizer_2", tmp / ".work")
    shutil.rmtree(tmp / ".work", ignore_errors=True)

    progress("scheduler: FlowMatchEulerDiscreteScheduler")
    FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]).save_pretrained(str(tmp / "scheduler"))

    shards = HUB_SHARDS if sharded else {}
    clip_model_vocab, clip_rest = _vocab(cfg["clip"], clip_vocab, "clip")
    progress(f"text_encoder: CLIPTextModel (vocab {clip_model_vocab}, tokenizer {clip_vocab})")
    clip_rest.setdefault("bos_token_id", clip_vocab - 2)  # <|startoftext|>
    clip_rest.setdefault("eos_token_id", clip_vocab - 1)  # <|endoftext|>: the highest id, pooled at argmax(ids)
    clip_rest.setdefault("pad_token_id", clip_vocab - 1)
    clip_cfg = CLIPTextConfig(vocab_size=clip_model_vocab, **clip_rest)
    sizes["text_encoder"] = _write_transformers_model(CLIPTextModel, clip_cfg, tmp / "text_encoder", "clip", seed, dtype, progress)

    t5_model_vocab, t5_rest = _vocab(cfg["t5"], t5_vocab, "t5")
    progress(f"text_encoder_2: T5EncoderModel (vocab {t5_model_vocab}, tokenizer {t5_vocab})")
    t5_cfg = T5Config(vocab_size=t5_model_vocab, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      is_encoder_decoder=True, **t5_rest)
    sizes["text_encoder_2"] = _write_transformers_model(T5EncoderModel, t5_cfg, tmp / "text_encoder_2", "t5", seed, dtype,
                                                        progress, shards.get("text_encoder_2", 1))

    progress("vae: AutoencoderKL")
    sizes["vae"] = _write_diffusers_model(AutoencoderKL, cfg["vae"], tmp / "vae", "vae", seed, dtype, progress)

    progress("tiny_vae: AutoencoderTiny (taef1 layout)")
    sizes["tiny_vae"] = _write_diffusers_model(AutoencoderTiny, cfg["tiny_vae"], tmp / "tiny_vae", "tiny_vae", seed, dtype, progress)

    progress(f"transformer: FluxTransformer2DModel ({flux_type})")
    sizes["transformer"] = _write_diffusers_model(FluxTransformer2DModel, cfg["transformer"], tmp / "transformer", "transformer",
                                                  seed, dtype, progress, shards.get("transformer", 1))

    _write_model_index(tmp, flux_type)
    marker = {
        "format": 1,
        "flux_type": flux_type,
        "seed": seed,
        "dtype": dtype,
        "sharded": bool(sharded),
        "configs": {k: cfg[k] for k in ("transformer", "clip", "t5", "vae", "tiny_vae", "scheduler")},
        "vocab": {"clip": clip_vocab, "t5": t5_vocab},
        "versions": {"transformers": transformers.__version__, "diffusers": __import__("diffusers").__version__},
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return sizes


def _clean_stale_tmp(out: Path) -> None:
    """Remove temp folders of killed earlier runs (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def build_tiny(
    out: Path,
    flux_type: str = "schnell",
    seed: int = 0,
    force: bool = False,
    *,
    progress: Progress | None = None,
    sharded: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random-weight FLUX.1 pipeline (diffusers layout) into `out` and return it.

    overrides: transformer={...}, clip={...}, t5={...}, vae={...}, tiny_vae={...} config
    values, and dtype ("float32" default, "float16", "bfloat16") for the saved weights;
    ``**preset_overrides("full")`` gives the published sizes. sharded: write transformer/ and
    text_encoder_2/ as the Hub's sharded files (HUB_SHARDS) with their index.json.
    Refuses a non-empty `out` unless force. Builds in a temp sibling folder and renames it
    into place at the end.
    """
    out = Path(out)
    cfg = resolve_configs(flux_type, copy.deepcopy(overrides))
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise FluxcError(f"seed must be a non-negative integer, got {seed!r}") from None
    if seed < 0:
        raise FluxcError(f"seed must be a non-negative integer, got {seed!r}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise FluxcError(f"{out} already exists and is not empty: choose another folder or pass --force to replace it")
    say: Progress = progress or (lambda _m: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.time()
    try:
        _build_into(tmp, flux_type, seed, cfg, say, sharded)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done in {time.time() - t0:.1f} s: {out} ({folder_size(out) / 1e6:.1f} MB)")
    return out


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def is_tiny_model(path: Path) -> bool:
    """True if `path` is a complete folder written by build_tiny."""
    return (Path(path) / MARKER).is_file() and (Path(path) / "model_index.json").is_file()
