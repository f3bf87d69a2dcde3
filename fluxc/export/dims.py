"""FluxDims from a checkpoint's configs and the export options (no size is written here)."""
from __future__ import annotations

import re
from typing import Any

from fluxc.errors import FluxcError
from fluxc.specs import FluxDims

# FLUX.1's longest T5 prompt (its pipelines' max_sequence_length limit; dev uses 512, schnell 256).
MAX_T5_LEN = 512


def check_t5_len(t5_len: int) -> None:
    if t5_len < 1 or t5_len > MAX_T5_LEN:
        raise FluxcError(f"--t5-seq-len {t5_len} is outside 1..{MAX_T5_LEN} (FLUX.1's longest T5 prompt is "
                         f"{MAX_T5_LEN} tokens); use 512 for dev or 256 for schnell")


# Largest image side an export accepts (issue 11: FLUX.1 is trained up to 2 megapixels).
MAX_SIDE = 2048


def check_resolution(height: int, width: int, multiple: int = 16) -> None:
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % multiple:
            raise FluxcError(f"--{name} {v} is not a positive multiple of {multiple}; "
                             f"pick e.g. {max(multiple, (v // multiple) * multiple)}")
        if v > MAX_SIDE:
            raise FluxcError(f"--{name} {v} is above {MAX_SIDE}, the largest image side fluxc exports")


def parse_resolution(text: str) -> tuple[int, int]:
    """`--resolution WIDTHxHEIGHT` (width first, as image sizes are usually written: 1344x768 is
    landscape) -> (height, width). One-line FluxcError for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text or "")
    if not m:
        raise FluxcError(f"--resolution {text!r}: give WIDTHxHEIGHT, e.g. 1024x1024 or 1344x768")
    width, height = int(m.group(1)), int(m.group(2))
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % 16:
            raise FluxcError(f"--resolution {text}: {name} {v} is not a positive multiple of 16; "
                             f"pick e.g. {max(16, (v // 16) * 16)}")
        if v > MAX_SIDE:
            raise FluxcError(f"--resolution {text}: {name} {v} is above {MAX_SIDE}, the largest image side "
                             f"fluxc exports")
    return height, width


def size_label(height: int, width: int) -> str:
    """The one way sizes are written to users and folder names: WIDTHxHEIGHT."""
    return f"{width}x{height}"


def vae_scale(vae_cfg: dict[str, Any]) -> int:
    if "decoder_block_out_channels" in vae_cfg:  # AutoencoderTiny
        return int(vae_cfg.get("upsampling_scaling_factor", 2)) ** (len(vae_cfg["decoder_block_out_channels"]) - 1)
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def build_dims(*, flux_type: str, height: int, width: int, t5_len: int,
               transformer: dict[str, Any], clip: dict[str, Any], t5: dict[str, Any],
               vae: dict[str, Any], tiny_vae: dict[str, Any] | None, image_input: bool = False,
               reference_size: tuple[int, int] | None = None) -> FluxDims:
    scale = vae_scale(vae)
    check_resolution(height, width, 2 * scale)
    ref_h = ref_w = 0
    if flux_type == "kontext":  # the reference image's size: default the output size
        ref_h, ref_w = reference_size or (height, width)
        check_resolution(ref_h, ref_w, 2 * scale)
    elif reference_size is not None:
        raise FluxcError("--reference-size is for FLUX.1 Kontext checkpoints; drop it for dev/schnell")
    check_t5_len(t5_len)
    heads, hd = int(transformer.get("num_attention_heads", 24)), int(transformer.get("attention_head_dim", 128))
    in_ch = int(transformer.get("in_channels", 64))
    latent_ch = int(vae.get("latent_channels", 16))
    if tiny_vae is not None:
        tl, ts = int(tiny_vae.get("latent_channels", 4)), vae_scale(tiny_vae)
        if tl != latent_ch or ts != scale:
            raise FluxcError(f"the tiny VAE ({tl} latent channels, x{ts}) does not fit this FLUX VAE "
                             f"({latent_ch} latent channels, x{scale}); use a FLUX tiny VAE such as madebyollin/taef1")
    return FluxDims(
        flux_type=flux_type, height=height, width=width,
        clip_vocab=int(clip["vocab_size"]), clip_dim=int(clip["hidden_size"]),
        clip_layers=int(clip["num_hidden_layers"]), clip_len=int(clip.get("max_position_embeddings", 77)),
        t5_vocab=int(t5["vocab_size"]), t5_dim=int(t5["d_model"]), t5_layers=int(t5["num_layers"]),
        t5_len=int(t5_len),
        inner_dim=heads * hd, head_dim=hd, in_channels=in_ch,
        out_channels=int(transformer.get("out_channels") or in_ch),
        num_double=int(transformer.get("num_layers", 19)), num_single=int(transformer.get("num_single_layers", 38)),
        joint_attention_dim=int(transformer.get("joint_attention_dim", 4096)),
        pooled_projection_dim=int(transformer.get("pooled_projection_dim", 768)),
        guidance_embeds=bool(transformer.get("guidance_embeds", False)),
        latent_channels=latent_ch, vae_scale=scale, tiny_vae=tiny_vae is not None,
        image_input=bool(image_input) or flux_type == "kontext", ref_height=ref_h, ref_width=ref_w,
    )
