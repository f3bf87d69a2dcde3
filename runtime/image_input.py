"""Images in (issue 19): reading the input image, and img2img's start as diffusers'
FluxImg2ImgPipeline (0.42.1) makes it.

- read: diffusers' `load_image` (EXIF orientation applied, converted to RGB); one-line errors for
  no such file, not an image, an image over MAX_SIDE x MAX_SIDE;
- preprocess: VaeImageProcessor.preprocess with a PIL image: resized to the build's size
  (PIL Lanczos, no aspect kept), /255, then 2x-1 -> [1,3,H,W] float32 in [-1,1];
- img2img: the encoder piece's output, sampled where diffusers samples (AutoencoderKL's latent
  distribution: mean + exp(0.5*clamp(logvar,-30,20)) * randn, the generator's first draw; taef1
  gives its latents as they are, no draw), shifted and scaled ((z - shift) * scale); the timesteps
  trimmed by strength (get_timesteps: t_start = int(steps - min(steps*strength, steps))); the noise
  (the generator's next draw, of the latent shape) mixed in at the first kept sigma
  (FlowMatchEulerDiscreteScheduler.scale_noise: sigma*noise + (1-sigma)*latents), then packed.
- Kontext (FluxKontextPipeline): the reference resized to the build's reference size, encoded,
  its distribution's mode taken (retrieve_latents(sample_mode="argmax"): the mean, no draw; taef1:
  its latents), shifted and scaled, packed; the pipeline appends its tokens after the image's at
  every step (their rotary ids, first axis 1, are in the export's table) and keeps the image part
  of the prediction. The initial noise is FluxPipeline's (the generator's only draw).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError

MAX_SIDE = 4096  # the largest input image side accepted (either side)


def check_strength(strength: float) -> float:
    s = float(strength)
    if not (0.0 < s <= 1.0) or s != s:
        raise FluxcError(f"--strength {strength} is outside (0, 1]; use e.g. 0.6 (1 repaints everything)")
    return s


def read_image(path: Path):
    """The image at `path` as an RGB PIL image, as diffusers' load_image reads it."""
    path = Path(path)
    if not path.is_file():
        raise FluxcError(f"--image {path}: no such file; give the path of a PNG or JPEG image")
    return open_image(path, f"--image {path}")


def open_image(src, what: str):
    """`src` (a path or the bytes of an upload) as an RGB PIL image, as diffusers' load_image
    reads it; `what` names it in the one-line errors (not an image, over MAX_SIDE)."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    try:
        with Image.open(f) as im:  # reads the header only: the size is checked before decoding
            w, h = im.size
            if w > MAX_SIDE or h > MAX_SIDE:
                raise FluxcError(f"{what} is {w}x{h}, over {MAX_SIDE}x{MAX_SIDE}; scale it down first")
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise FluxcError(f"{what} is not an image PIL can read ({type(e).__name__}); "
                         "give a PNG or JPEG file") from None


def preprocess(image, height: int, width: int) -> np.ndarray:
    """VaeImageProcessor.preprocess(image, height, width) for a PIL image -> [1,3,H,W] in [-1,1]."""
    from PIL import Image

    im = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    x = np.array(im).astype(np.float32) / 255.0
    x = x[None].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(2.0 * x - 1.0, dtype=np.float32)


def encoder_vae_config(manifest, tiny_vae: bool) -> dict:
    """The config of the VAE whose encoder the build holds (the export's side file)."""
    import json

    path = manifest.side_file("tiny_vae_config" if tiny_vae else "vae_config")
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise FluxcError(f"{path} is missing or unreadable; re-run fluxc export") from None


def vae_shift_scale(vae_config: dict) -> tuple[float, float]:
    shift = vae_config.get("shift_factor")
    return (float(shift) if shift is not None else 0.0), float(vae_config.get("scaling_factor", 1.0))


def trim_timesteps(steps: int, strength: float) -> int:
    """get_timesteps: the index of the first kept timestep; one-line error when none is left."""
    init = min(steps * strength, steps)
    t_start = int(max(steps - init, 0))
    if steps - t_start < 1:
        raise FluxcError(f"--strength {strength} with --steps {steps} leaves no denoising step; "
                         "raise --strength or --steps")
    return t_start


@dataclass
class Img2ImgStart:
    latents: np.ndarray  # packed [1, N, 4C], noised at the first kept timestep
    begin: int  # index of the first kept timestep in the scheduler's list
    seconds: float = 0.0  # preprocessing and the encoder


def image_latents(encoded: np.ndarray, tiny_vae: bool, vae_config: dict, generator) -> np.ndarray:
    """The encoder piece's output -> diffusers' image_latents ((sample - shift) * scale)."""
    if tiny_vae:  # AutoencoderTiny: retrieve_latents returns .latents, no draw
        z = encoded.astype(np.float32)
    else:
        import torch

        mean, logvar = np.split(encoded.astype(np.float32), 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0)).astype(np.float32)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).numpy()
        z = (mean + std * eps).astype(np.float32)
    shift, scale = vae_shift_scale(vae_config)
    return ((z - np.float32(shift)) * np.float32(scale)).astype(np.float32)


def img2img_start(pipe, image, strength: float, steps: int, seed: int) -> Img2ImgStart:
    """The packed initial latents of img2img and the first kept timestep. `pipe` is a
    runtime.pipeline.FluxPipeline whose scheduler already has its timesteps set."""
    import time

    import torch

    from fluxc.runtime.pipeline import pack_latents

    t0 = time.perf_counter()
    d = pipe.dims
    begin = trim_timesteps(steps, check_strength(strength))
    g = torch.Generator("cpu").manual_seed(int(seed))
    encoded = pipe.encode_image(preprocess(image, d.height, d.width))
    z = image_latents(encoded, d.tiny_vae, encoder_vae_config(pipe.manifest, d.tiny_vae), g)
    noise = torch.randn(z.shape, generator=g, dtype=torch.float32).numpy()
    sigma = np.float32(pipe.scheduler.sigmas[begin])
    lat = (sigma * noise + (np.float32(1.0) - sigma) * z).astype(np.float32)
    return Img2ImgStart(pack_latents(lat), begin, time.perf_counter() - t0)


def kontext_reference(pipe, image) -> tuple[np.ndarray, float]:
    """(the reference image's packed latents [1, R, 4C], seconds) for a FLUX.1 Kontext build."""
    import time

    from fluxc.runtime.pipeline import pack_latents

    if image is None:
        raise FluxcError("this is a FLUX.1 Kontext build: give the image to edit with --image")
    t0 = time.perf_counter()
    d = pipe.dims
    encoded = pipe.encode_image(preprocess(image, d.ref_height, d.ref_width)).astype(np.float32)
    z = encoded if d.tiny_vae else np.split(encoded, 2, axis=1)[0]  # the mode: the mean
    shift, scale = vae_shift_scale(encoder_vae_config(pipe.manifest, d.tiny_vae))
    z = ((z - np.float32(shift)) * np.float32(scale)).astype(np.float32)
    return pack_latents(z), time.perf_counter() - t0
