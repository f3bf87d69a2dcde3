"""The FLUX.1 pipeline in numpy over any engine set (onnx, cmodel, sail).

tokenize -> CLIP pieces (pooled) and T5 pieces -> per step: head -> double blocks ->
concat [text, image] -> single blocks -> image part -> tail -> Euler step -> unpack ->
VAE decoder (un-scaling baked in) -> image in [-1, 1] -> uint8.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fluxc.errors import FluxcError
from fluxc.fsutil import atomic_path
from fluxc.runtime.prompt_tokens import PromptTokenizer
from fluxc.runtime.sail_flux import output_name
from fluxc.runtime.scheduler import FlowMatchEulerScheduler
from fluxc.specs import DEFAULT_STEPS

DEFAULT_PROMPT = "A cat holding a sign that says hello world"


def pack_latents(latents: np.ndarray) -> np.ndarray:
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))


def unpack_latents(latents: np.ndarray, lat_h: int, lat_w: int) -> np.ndarray:
    b, n, c4 = latents.shape
    x = latents.reshape(b, lat_h // 2, lat_w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(b, c4 // 4, lat_h, lat_w))


def initial_latents(dims, seed: int) -> tuple[np.ndarray, str]:
    """Packed initial noise [1, N, 4C]. Drawn exactly like diffusers' FluxPipeline (a seeded
    CPU torch generator) when torch is importable; otherwise numpy's RNG (not comparable)."""
    c, h, w = dims.latent_channels, dims.latent_h, dims.latent_w
    # FluxPipeline: height = 2 * (H // (vae_scale * 2)), i.e. the latent size rounded to even
    h, w = 2 * (dims.height // (dims.vae_scale * 2)), 2 * (dims.width // (dims.vae_scale * 2))
    shape = (1, c, h, w)
    try:
        import torch
    except ImportError:
        rng = np.random.default_rng(seed)
        return pack_latents(rng.standard_normal(shape).astype(np.float32)), (
            "numpy RNG (torch not installed): latents are not comparable with diffusers' for this seed")
    g = torch.Generator("cpu").manual_seed(int(seed))
    x = torch.randn(shape, generator=g, device="cpu", dtype=torch.float32).numpy()
    return pack_latents(x), "torch CPU generator (as diffusers' FluxPipeline)"


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[1,3,H,W] in [-1,1] -> HxWx3 uint8, as diffusers' image processor does."""
    x = np.clip(image[0].astype(np.float32) / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    return (x * 255).round().astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """The PNG file of an HxWx3 uint8 image: `fluxc run --out` and `fluxc serve` write these bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: np.ndarray, path: Path) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png_bytes(img))


@dataclass
class Result:
    image: np.ndarray  # HxWx3 uint8
    image_float: np.ndarray  # [1,3,H,W] decoder output
    latents: np.ndarray  # final packed latents [1,N,64]
    timesteps: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class FluxPipeline:
    def __init__(self, models, manifest):
        self.m = models
        self.manifest = manifest
        self.dims = d = manifest.dims
        self.specs = {s.name: s for s in manifest.specs}
        self.clip_tok = PromptTokenizer(manifest.tokenizer_dir, d.clip_len, "CLIP")
        self.t5_tok = PromptTokenizer(manifest.tokenizer_2_dir, d.t5_len, "T5")
        # an adopted sophon-demo download (runtime/reference_layout.py) carries its scheduler
        # config and rotary table in memory; an export has them as files
        cfg = getattr(manifest, "scheduler_config", None)
        self.scheduler = (FlowMatchEulerScheduler(cfg) if isinstance(cfg, dict)
                          else FlowMatchEulerScheduler.from_file(manifest.scheduler_config_path))
        rp = manifest.rotary_path
        rotary = getattr(manifest, "rotary", None)
        if rotary is None and not Path(rp).is_file():
            raise FluxcError(f"rotary table {rp} is missing; re-run fluxc export")
        self.rotary = (rotary if rotary is not None else np.load(rp)).astype(np.float32)
        if tuple(self.rotary.shape) != tuple(d.rotary_shape):
            raise FluxcError(f"{rp} has shape {self.rotary.shape}, expected {d.rotary_shape}; re-run fluxc export")
        # the pieces of each kind in pipeline order (fluxc.specs.KINDS): names are never formatted here
        self.kinds: dict[str, list[str]] = {}
        for s in manifest.specs:
            self.kinds.setdefault(s.kind, []).append(s.name)
        self.vae_name = self.one("tiny_vae" if d.tiny_vae else "vae")
        # A device-resident runtime (runtime/sail_flux.py) runs the pieces itself; the
        # pipeline then only hands it token ids, latents and scalars.
        self.resident = getattr(models, "device_resident", None)

    def one(self, kind: str) -> str:
        """The name of the one piece of that kind."""
        (name,) = self.kinds[kind]
        return name

    # One piece: outputs in the spec's order, by name (or the name plus the suffix TPU-MLIR
    # may add, e.g. noise_pred_Add_f32); never by position.
    def run(self, piece: str, **inputs: np.ndarray) -> list[np.ndarray]:
        spec = self.specs[piece]
        feed = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.dtype) for t in spec.inputs}
        out = self.m.process(spec.net_name, feed)
        wanted = [t.name for t in spec.outputs]
        named = {}
        for k, v in out.items():
            w = output_name(k, wanted)
            if w is not None:
                named.setdefault(w, v)
        res = []
        for t in spec.outputs:
            if t.name not in named:
                raise FluxcError(f"net {spec.net_name} gave no output {t.name!r} (it gave {', '.join(out)}); "
                                 "rebuild it with fluxc compile")
            res.append(named[t.name])
        return [np.asarray(r, dtype=np.float32).reshape(t.shape) for r, t in zip(res, spec.outputs)]

    def encode_prompt(self, prompt: str, prompt_2: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        ids = self.clip_tok(prompt)
        if self.resident is not None:  # pooled and T5 states stay on the chips
            self.resident.encode(ids, self.t5_tok(prompt_2 if prompt_2 else prompt))
            return None, None
        (h,) = self.run(self.one("clip_head"), input_ids=ids)
        for name in self.kinds.get("clip_block", []):
            (h,) = self.run(name, hidden_states=h)
        (pooled,) = self.run(self.one("clip_tail"), hidden_states=h, input_ids=ids)
        ids2 = self.t5_tok(prompt_2 if prompt_2 else prompt)
        (t,) = self.run(self.one("t5_head"), input_ids=ids2)
        for name in self.kinds.get("t5_block", []):
            (t,) = self.run(name, hidden_states=t)
        (t5,) = self.run(self.one("t5_tail"), hidden_states=t)
        return pooled, t5

    def transformer(self, latents, t: float, guidance: float | None, pooled, t5) -> np.ndarray:
        d = self.dims
        if self.resident is not None:
            return self.resident.transformer(latents, t, guidance, self.rotary)
        head = dict(hidden_states=latents, timestep=np.array([t], np.float32),
                    pooled_projections=pooled, encoder_hidden_states=t5)
        if d.guidance_embeds:
            head["guidance"] = np.array([guidance * 1000.0], np.float32)
        temb, enc, hid = self.run(self.one("transformer_head"), **head)
        for name in self.kinds.get("double_block", []):
            enc, hid = self.run(name, hidden_states=hid, encoder_hidden_states=enc, temb=temb, rotary_emb=self.rotary)
        x = np.concatenate([enc, hid], axis=1)
        for name in self.kinds.get("single_block", []):
            (x,) = self.run(name, hidden_states=x, temb=temb, rotary_emb=self.rotary)
        (noise,) = self.run(self.one("transformer_tail"), hidden_states=x[:, d.t5_len:], temb=temb)
        return noise

    def decode(self, latents: np.ndarray) -> np.ndarray:
        lat = unpack_latents(latents, self.dims.latent_h, self.dims.latent_w)
        if self.resident is not None:
            return self.resident.decode(lat)
        (img,) = self.run(self.vae_name, latents=lat)
        return img

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """[1,3,H,W] in [-1,1] -> the VAE encoder piece's output (runtime/image_input.py)."""
        kind = next((k for k in ("vae_encoder", "tiny_vae_encoder") if k in self.kinds), None)
        if kind is None:
            raise FluxcError("this build has no VAE encoder; re-export with `fluxc export --image-input` "
                             "and compile again to run with --image")
        if self.resident is not None:
            return self.resident.encode_image(image)
        (out,) = self.run(self.one(kind), image=image)
        return out

    def __call__(self, prompt: str = DEFAULT_PROMPT, prompt_2: str | None = None, steps: int | None = None,
                 guidance: float = 3.5, seed: int = 0, latents: np.ndarray | None = None,
                 on_step: Callable[[int, int], None] | None = None, image=None, strength: float = 0.6) -> Result:
        d = self.dims
        if steps is None:
            steps = DEFAULT_STEPS[d.flux_type]
        notes = []
        timings = {}
        t0 = time.perf_counter()
        pooled, t5 = self.encode_prompt(prompt, prompt_2)
        timings["text_encoders_s"] = time.perf_counter() - t0
        begin = 0  # the first timestep run (img2img trims the list by strength)
        ref = None  # FLUX.1 Kontext: the reference image's packed latents, after the image's tokens
        if d.kontext:  # as diffusers' FluxKontextPipeline (runtime/image_input.py)
            from fluxc.runtime.image_input import kontext_reference

            ref, timings["image_encode_s"] = kontext_reference(self, image)
            image = None
        if image is not None:  # img2img, as diffusers' FluxImg2ImgPipeline (runtime/image_input.py)
            from fluxc.runtime.image_input import img2img_start

            self.scheduler.set_timesteps(steps, d.image_tokens)
            start = img2img_start(self, image, strength, steps, seed)
            latents, begin = start.latents, start.begin
            timings["image_encode_s"] = start.seconds
        elif latents is None:
            latents, how = initial_latents(d, seed)
            if how.startswith("numpy"):
                notes.append(how)
                warnings.warn(how)
        self.scheduler.set_timesteps(steps, latents.shape[1])
        ts = [float(x) for x in self.scheduler.timesteps[begin:]]
        t1 = time.perf_counter()
        step_s = []
        for i, t in enumerate(self.scheduler.timesteps):
            if i < begin:
                continue
            ts0 = time.perf_counter()
            hidden = latents if ref is None else np.concatenate([latents, ref], axis=1)
            noise = self.transformer(hidden, float(t), guidance, pooled, t5)[:, :latents.shape[1]]
            latents = self.scheduler.step(noise, i, latents)
            step_s.append(time.perf_counter() - ts0)
            if on_step:
                on_step(i + 1 - begin, steps - begin)
        timings["denoise_s"] = time.perf_counter() - t1
        timings["step_s"] = step_s
        t2 = time.perf_counter()
        img = self.decode(latents)
        timings["vae_s"] = time.perf_counter() - t2
        timings["generate_s"] = time.perf_counter() - t0
        return Result(to_uint8(img), img, latents, ts, timings, notes)
