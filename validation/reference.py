"""The independent float reference: the original FLUX.1 models as diffusers and transformers
run them, unpatched, loaded from the export's source checkpoint (manifest.json "source").

Nothing here uses the exported ONNX pieces, the export patches or rotary_emb.npy. Each model
runs its own forward; forward hooks on its submodules
- record what each submodule returns (one entry per fluxc piece), and
- optionally replace a submodule's input by the chip's input to the same piece
  ("teacher forcing"), so each piece is judged on exactly the activations it received on
  the chip, while masks, position bias and rotary come from the original code.

Weights: a component whose files fit the memory limit is loaded with from_pretrained; a
bigger one is built on the meta device and each block's tensors are read just before the
block runs and freed right after (fluxc.export.loading.materialize/release), so RAM stays at
about one block whatever the model size.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fluxc.errors import FluxcError
from fluxc.export.checkpoint import construct_model
from fluxc.export.loading import build_on_meta, materialize, release
from fluxc.export.source import WeightStore, read_json
from fluxc.machine import mem_available
from fluxc.specs import piece_name

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")


@dataclass
class SourceCheckpoint:
    folder: Path
    tiny_vae: Path | None


def find_source(man) -> tuple[SourceCheckpoint | None, str]:
    """(checkpoint, description) or (None, why it is not at hand)."""
    src = man.source or {}
    folder = None
    if src.get("kind") == "local" and src.get("path"):
        folder = Path(src["path"])
    elif src.get("kind") == "hub" and src.get("model"):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(src["model"], revision=src.get("revision"), local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: not at hand
            return None, f"{src['model']} is not in the local Hugging Face cache"
    if folder is None:
        return None, "the manifest names no source checkpoint"
    missing = [c for c in COMPONENTS + ("scheduler",) if not (folder / c / "config.json").is_file()
               and not (folder / c / "scheduler_config.json").is_file()]
    if not folder.is_dir() or missing:
        return None, f"source checkpoint {folder} is missing" + (f" ({', '.join(missing)})" if folder.is_dir() else "")
    tiny = None
    if man.dims.tiny_vae:
        t = (src.get("tiny_vae") or {}).get("path")
        if not t or not (Path(t) / "config.json").is_file():
            return None, f"the tiny VAE of the export ({t}) is missing"
        tiny = Path(t)
    return SourceCheckpoint(folder, tiny), str(folder)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def default_load_limit() -> int:
    """Components smaller than this are loaded whole (float32 may double bf16 files)."""
    env = os.environ.get("FLUXC_REFERENCE_LOAD_LIMIT_MB")
    if env:
        return int(float(env) * 2**20)
    return mem_available() // 6


# units (module prefixes) streamed one at a time, per component; the rest stays loaded
def _stream_units(component: str, model) -> list[str]:
    if component == "transformer":
        return ([f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] +
                [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))])
    if component == "text_encoder":
        return [f"encoder.layers.{i}" for i in range(len(model.encoder.layers))]
    if component == "text_encoder_2":
        return [f"encoder.block.{i}" for i in range(len(model.encoder.block))]
    return []


def _submodule(model, dotted: str):
    m = model
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


class ReferenceModels:
    """The original components of one source checkpoint, loaded on first use."""

    def __init__(self, src: SourceCheckpoint, load_limit: int | None = None, say=None):
        self.src = src
        self.limit = default_load_limit() if load_limit is None else load_limit
        self.say = say or (lambda s: None)
        self._models: dict[str, Any] = {}
        self.streamed: list[str] = []

    def folder(self, component: str) -> Path:
        if component == "vae" and self.src.tiny_vae is not None:
            return self.src.tiny_vae
        return self.src.folder / component

    def model(self, component: str):
        if component not in self._models:
            self._models[component] = self._load(component)
        return self._models[component]

    def _load(self, component: str):
        import torch

        folder = self.folder(component)
        tiny = component == "vae" and self.src.tiny_vae is not None
        size = _folder_bytes(folder)
        if component == "vae" or 2 * size <= self.limit:  # the VAE is ~0.3 GB at full size
            model = self._from_pretrained(component, folder, tiny)
        else:
            model = self._streamed(component, folder)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(torch.float32) if component not in self.streamed else model

    def _from_pretrained(self, component: str, folder: Path, tiny: bool):
        if component == "transformer":
            from diffusers import FluxTransformer2DModel as cls
        elif component == "vae":
            from diffusers import AutoencoderKL, AutoencoderTiny

            cls = AutoencoderTiny if tiny else AutoencoderKL
        elif component == "text_encoder":
            from transformers import CLIPTextModel as cls
        else:
            from transformers import T5EncoderModel as cls
        self.say(f"reference: loading {component} from {folder}")
        return cls.from_pretrained(str(folder))

    def _streamed(self, component: str, folder: Path):
        """Meta model; the non-block tensors loaded now, each block's on its own call."""
        self.say(f"reference: streaming {component} from {folder} one block at a time")
        cfg = read_json(folder / "config.json", f"{component} config")
        model = build_on_meta(lambda: construct_model(component, cfg, folder))
        store = WeightStore.open(folder, component)
        units = _stream_units(component, model)
        rest = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters(remove_duplicate=False)
                       if not any(n.startswith(u + ".") for u in units)})
        if rest:
            materialize(model, rest, store, component)
        for u in units:
            mod = _submodule(model, u)
            mod.register_forward_pre_hook(lambda m, a, u=u: materialize(model, [u + "."], store, component) and None)
            mod.register_forward_hook(lambda m, a, o, u=u: release(model, [u + "."]))
        self.streamed.append(component)
        return model


# ---------------------------------------------------------------------------------------------
# Hooks: record outputs, replace inputs


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


@contextmanager
def taps(model, record: dict[str, Callable], feed: dict[str, Callable] | None = None):
    """record: submodule name -> fn(output) -> dict of arrays (stored in `out[name]`);
    feed: submodule name -> fn(args, kwargs) -> (args, kwargs) replacing its inputs."""
    out: dict[str, dict[str, np.ndarray]] = {}
    handles = []
    for name, fn in (feed or {}).items():
        handles.append(_submodule(model, name).register_forward_pre_hook(
            lambda m, a, k, fn=fn: fn(a, k), with_kwargs=True))
    for name, fn in record.items():
        handles.append(_submodule(model, name).register_forward_hook(
            lambda m, a, o, name=name, fn=fn: out.__setitem__(name, fn(o)) and None))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _replace_first(value):
    """Feed: replace the hidden_states argument (positional or keyword)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(value, np.float32))

    def fn(args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs, hidden_states=t)
        else:
            args = (t,) + tuple(args[1:])
        return args, kwargs

    return fn


def _replace_kwargs(**values):
    import torch

    ts = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in values.items()}

    def fn(args, kwargs):
        return args, dict(kwargs, **ts)

    return fn


def _replace_args(*values):
    import torch

    ts = tuple(torch.from_numpy(np.ascontiguousarray(v, np.float32)) for v in values)

    def fn(args, kwargs):
        return ts + tuple(args[len(ts):]), kwargs

    return fn


# ---------------------------------------------------------------------------------------------
# Per piece, on the original models. `chip` (optional) maps piece name -> the inputs that piece
# got on the chip; given, each piece's submodule is fed those inputs (teacher forcing).


class Reference:
    def __init__(self, models: ReferenceModels, dims):
        self.models = models
        self.d = dims
        self.p = dims.flux_type

    # -- text encoders
    def _text_encoder(self, component: str, ids: np.ndarray, chip: dict | None, kinds: tuple[str, str, str],
                      head: str, blocks: str, tail: str):
        """One text encoder run on `ids` with its head and blocks tapped (with `chip`: each block's
        and the final norm's input replaced by the chip's). ({piece: outputs}, the model's result)."""
        import torch

        hk, bk, tk = kinds
        m = self.models.model(component)
        n = len(m.get_submodule(blocks))
        rec = {f"{blocks}.{i}": (lambda o: {"hidden_states_out": _np(_first(o))}) for i in range(n)}
        rec[head] = lambda o: {"hidden_states": _np(o)}
        feed = {}
        if chip:
            feed = {f"{blocks}.{i}": _replace_first(chip[piece_name(bk, index=i)]["hidden_states"]) for i in range(n)}
            feed[tail] = _replace_first(chip[piece_name(tk)]["hidden_states"])
        with taps(m, rec, feed) as out, torch.no_grad():
            res = m(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=False)
        got = {piece_name(hk): out[head]}
        got.update({piece_name(bk, index=i): out[f"{blocks}.{i}"] for i in range(n)})
        return got, res

    def clip(self, ids: np.ndarray, chip: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
        got, res = self._text_encoder("text_encoder", ids, chip, ("clip_head", "clip_block", "clip_tail"),
                                      "embeddings", "encoder.layers", "final_layer_norm")
        got[piece_name("clip_tail")] = {"pooled": _np(res.pooler_output)}
        return got

    def t5(self, ids: np.ndarray, chip: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
        got, res = self._text_encoder("text_encoder_2", ids, chip, ("t5_head", "t5_block", "t5_tail"),
                                      "encoder.embed_tokens", "encoder.block", "encoder.final_layer_norm")
        got[piece_name("t5_tail")] = {"encoder_hidden_states": _np(res[0])}
        return got

    # -- transformer: one denoising call
    def image_ids(self):
        import torch
        from diffusers import FluxPipeline

        d = self.d
        h, w = d.latent_h, d.latent_w
        return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)

    def transformer(self, latents, t_chip: float, guidance_scale: float | None, pooled, t5,
                    chip: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
        """latents [1,N,64]; t_chip: the timestep as the chip head gets it (0..1000); the
        original model gets t/1000 and the plain guidance scale and scales them itself."""
        import torch

        m = self.models.model("transformer")
        p, S = self.p, self.d.t5_len
        nd, ns = len(m.transformer_blocks), len(m.single_transformer_blocks)
        rec: dict[str, Callable] = {
            "time_text_embed": lambda o: {"temb": _np(o)},
            "context_embedder": lambda o: {"encoder_hidden_states_out": _np(o)},
            "x_embedder": lambda o: {"hidden_states_out": _np(o)},
            "proj_out": lambda o: {"noise_pred": _np(o)},
        }
        for i in range(nd):
            rec[f"transformer_blocks.{i}"] = lambda o: {"encoder_hidden_states_out": _np(o[0]),
                                                       "hidden_states_out": _np(o[1])}
        for i in range(ns):
            rec[f"single_transformer_blocks.{i}"] = lambda o: {
                "hidden_states_out": np.concatenate([_np(o[0]), _np(o[1])], axis=1)}
        feed = {}
        if chip:
            for i in range(nd):
                c = chip[piece_name("double_block", p, i)]
                feed[f"transformer_blocks.{i}"] = _replace_kwargs(
                    hidden_states=c["hidden_states"], encoder_hidden_states=c["encoder_hidden_states"], temb=c["temb"])
            for i in range(ns):
                c = chip[piece_name("single_block", p, i)]
                x = c["hidden_states"]
                feed[f"single_transformer_blocks.{i}"] = _replace_kwargs(
                    hidden_states=x[:, S:], encoder_hidden_states=x[:, :S], temb=c["temb"])
            c = chip[piece_name("transformer_tail", p)]
            feed["norm_out"] = _replace_args(c["hidden_states"], c["temb"])
        kw = {}
        if m.config.guidance_embeds:
            kw["guidance"] = torch.tensor([float(guidance_scale)], dtype=torch.float32)
        with taps(m, rec, feed) as out, torch.no_grad():
            m(hidden_states=torch.from_numpy(np.ascontiguousarray(latents, np.float32)),
              encoder_hidden_states=torch.from_numpy(np.ascontiguousarray(t5, np.float32)),
              pooled_projections=torch.from_numpy(np.ascontiguousarray(pooled, np.float32)),
              timestep=torch.tensor([t_chip / 1000.0], dtype=torch.float32),
              txt_ids=torch.zeros(S, 3), img_ids=self.image_ids(), return_dict=False, **kw)
        got = {piece_name("transformer_head", p): {**out["time_text_embed"], **out["context_embedder"], **out["x_embedder"]},
               piece_name("transformer_tail", p): out["proj_out"]}
        got.update({piece_name("double_block", p, i): out[f"transformer_blocks.{i}"] for i in range(nd)})
        got.update({piece_name("single_block", p, i): out[f"single_transformer_blocks.{i}"] for i in range(ns)})
        return got

    # -- VAE
    def vae(self, latents_unpacked: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Packed-space latents [1,16,h,w] -> image as FluxPipeline decodes them."""
        import torch

        v = self.models.model("vae")
        z = torch.from_numpy(np.ascontiguousarray(latents_unpacked, np.float32))
        cfg = v.config
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with torch.no_grad():
            img = v.decode(z, return_dict=False)[0]
        name = piece_name("tiny_vae" if self.d.tiny_vae else "vae")
        return {name: {"image": _np(img)}}

    def vae_encoder(self, image: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """image [1,3,H,W] in [-1,1] -> what diffusers' `vae.encode` gives: AutoencoderKL's latent
        distribution's parameters (the moments: mean, logvar), AutoencoderTiny's latents."""
        import torch

        v = self.models.model("vae")
        with torch.no_grad():
            enc = v.encode(torch.from_numpy(np.ascontiguousarray(image, np.float32)))
        if self.d.tiny_vae:
            return {piece_name("tiny_vae_encoder"): {"latents": _np(enc.latents)}}
        return {piece_name("vae_encoder"): {"moments": _np(enc.latent_dist.parameters)}}

    # -- rotary table and scheduler
    def rotary(self) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' FluxPosEmbed at the export's resolution: (cos, sin) [S+N, head_dim]."""
        import torch

        m = self.models.model("transformer")
        ids = torch.cat([torch.zeros(self.d.t5_len, 3), self.image_ids()], dim=0)
        with torch.no_grad():
            cos, sin = m.pos_embed(ids)
        return _np(cos), _np(sin)


def rotary_from_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [S, head_dim] of a [1,S,1,hd/2,2,2] table in diffusers' interleaved layout
    (each angle repeated for the pair), read from entries [0,0] (cos) and [1,0] (sin)."""
    t = np.asarray(table, np.float64)[0, :, 0]
    return np.repeat(t[:, :, 0, 0], 2, axis=1), np.repeat(t[:, :, 1, 0], 2, axis=1)


def diffusers_schedule(scheduler_config: dict, steps: int, image_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) as diffusers' FluxPipeline computes them with its own scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    s = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    c = s.config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    ts, _ = retrieve_timesteps(s, steps, "cpu", sigmas=sigmas, mu=mu)
    return _np(ts), _np(s.sigmas)


def diffusers_generate(models: ReferenceModels, dims, prompt: str, steps: int, guidance: float, seed: int):
    """diffusers' FluxPipeline on the reference components: (packed latents, uint8 image)."""
    import torch
    from diffusers import FluxPipeline

    src = models.src
    comps = {c: models.model(c) for c in COMPONENTS}
    pipe = FluxPipeline.from_pretrained(str(src.folder), local_files_only=True, **comps)
    pipe.set_progress_bar_config(disable=True)
    common = dict(height=dims.height, width=dims.width, num_inference_steps=steps, guidance_scale=guidance,
                  max_sequence_length=dims.t5_len)
    with torch.no_grad():
        lat = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **common).images
        h, w = dims.height, dims.width
        z = pipe._unpack_latents(lat, h, w, pipe.vae_scale_factor)
        v = pipe.vae
        z = z / v.config.scaling_factor + (getattr(v.config, "shift_factor", None) or 0.0)
        img = v.decode(z, return_dict=False)[0]
        img = pipe.image_processor.postprocess(img, output_type="np")[0]
    return _np(lat), (img * 255).round().astype(np.uint8)


def diffusers_img2img(models: ReferenceModels, dims, image, strength: float, prompt: str, steps: int,
                      guidance: float, seed: int):
    """diffusers' FluxImg2ImgPipeline on the reference components (PIL `image`, resized by its
    own image processor to the build's size): (packed latents, uint8 image)."""
    import torch
    from diffusers import FluxImg2ImgPipeline

    comps = {c: models.model(c) for c in COMPONENTS}
    pipe = FluxImg2ImgPipeline.from_pretrained(str(models.src.folder), local_files_only=True, **comps)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=image, strength=strength, height=dims.height, width=dims.width, num_inference_steps=steps,
              guidance_scale=guidance, max_sequence_length=dims.t5_len)
    with torch.no_grad():
        lat = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kw).images
        z = pipe._unpack_latents(lat, dims.height, dims.width, pipe.vae_scale_factor)
        v = pipe.vae
        z = z / v.config.scaling_factor + (getattr(v.config, "shift_factor", None) or 0.0)
        img = v.decode(z, return_dict=False)[0]
        img = pipe.image_processor.postprocess(img, output_type="np")[0]
    return _np(lat), (img * 255).round().astype(np.uint8)


def check_available() -> str | None:
    """None if diffusers and transformers import, else why not."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


__all__ = ["SourceCheckpoint", "find_source", "ReferenceModels", "Reference", "rotary_from_table",
           "diffusers_schedule", "diffusers_generate", "diffusers_img2img", "FluxcError"]
