"""fluxc export: FLUX.1 weights (local diffusers folder or Hub id) -> ONNX pieces + manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fluxc.errors import FluxcError
from fluxc.export.dims import parse_resolution
from fluxc.export.driver import ExportOptions, run_export
from fluxc.export.lora import parse_lora_arg


def export(
    model: Optional[str] = typer.Argument(
        None, help="Local diffusers FLUX.1 folder or Hub id (default: black-forest-labs/FLUX.1-<type>)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Export folder (default: <models>/onnx)"),
    models: Optional[Path] = typer.Option(None, "--models", help="Workspace folder (default: $FLUXC_MODELS or ./models)"),
    flux_type: Optional[str] = typer.Option(
        None, "--flux-type", help="dev, schnell or kontext (default: from model_index.json / transformer/config.json, or schnell for the Hub default)"),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (multiple of 16, at most 2048; default 1024)"),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (multiple of 16, at most 2048; default 1024)"),
    resolution: Optional[list[str]] = typer.Option(
        None, "--resolution", help="WIDTHxHEIGHT (e.g. 1344x768: landscape), repeatable: one build holding several "
        "image sizes; the size-dependent pieces (transformer, VAE decoder, rotary table) are exported per size, the "
        "text encoders once; the first is the default of `fluxc run`. Not with --height/--width"),
    t5_seq_len: int = typer.Option(512, "--t5-seq-len", help="T5 prompt length in tokens"),
    tiny_vae: Optional[str] = typer.Option(
        None, "--tiny-vae", help="Export an AutoencoderTiny decoder (taef1) from this folder or Hub id instead of the VAE"),
    force: bool = typer.Option(False, "--force", help="Re-export every piece; replace another model's export"),
    probe: Optional[bool] = typer.Option(
        None, "--probe/--no-probe", help="Also export one piece of each full-width kind at 128x128 / T5 32 with the "
        "same weights, which `fluxc compile` checks on the chip simulator in place of the full-size pieces "
        "(default: on above 512x512)"),
    lora: Optional[list[str]] = typer.Option(
        None, "--lora", help="FILE[:SCALE] LoRA (.safetensors; diffusers, kohya or ComfyUI keys) fused into the "
                             "weights at SCALE (default 1); repeat to stack LoRAs"),
    reference_size: Optional[str] = typer.Option(
        None, "--reference-size", help="FLUX.1 Kontext: WIDTHxHEIGHT of the reference image (default: the output "
        "size); the transformer pieces take image + reference + text tokens"),
    image_input: bool = typer.Option(
        False, "--image-input", help="Also export the VAE encoder (the tiny VAE's with --tiny-vae), so that the build "
        "takes an input image: `fluxc run --image in.png --strength 0.6` (img2img)"),
) -> None:
    """Export FLUX.1 to one ONNX file per piece (block by block, low memory), plus tokenizers,
    rotary table, configs and manifest.json. Re-running with the same inputs rewrites nothing.

    Example: fluxc export ./FLUX.1-schnell --height 512 --width 512 --tiny-vae madebyollin/taef1

    Example with LoRAs: fluxc export ./FLUX.1-dev --lora style.safetensors:0.8 --lora detail.safetensors

    Example with two sizes: fluxc export ./FLUX.1-schnell --resolution 1024x1024 --resolution 1344x768

    Example for img2img: fluxc export ./FLUX.1-dev --height 512 --width 512 --image-input

    Example for FLUX.1 Kontext: fluxc export ./FLUX.1-Kontext-dev --height 512 --width 512 --reference-size 512x512
    """
    loras = [parse_lora_arg(x) for x in lora or []]  # a bad scale fails before any weight is read
    sizes = None
    if resolution:
        if height is not None or width is not None:
            raise FluxcError("give the image sizes either as --resolution WIDTHxHEIGHT (repeatable) or as "
                             "--height/--width, not both")
        sizes = []
        for r in resolution:
            hw = parse_resolution(r)
            if hw not in sizes:
                sizes.append(hw)
        height, width = sizes[0]

    res = run_export(ExportOptions(model=model, out=out, models=models, flux_type=flux_type,
                                   height=height or 1024, width=width or 1024, resolutions=sizes, t5_len=t5_seq_len, tiny_vae=tiny_vae, force=force, probe=probe,
                                   loras=loras, image_input=image_input,
                                   reference_size=_reference_size(reference_size)))
    probes = f", {res.probes} probe piece(s) in probe/" if res.probes else ""
    if res.sizes and len(res.sizes) > 1:
        probes += f"; sizes (width x height) {', '.join(res.sizes)}"
    typer.echo(f"exported {len(res.exported)} piece(s) ({len(res.traced)} traced, the others rebound), "
               f"reused {len(res.reused)} unchanged{probes}, "
               f"in {res.seconds:.1f} s -> {res.export_dir}")


def _reference_size(text: str | None) -> tuple[int, int] | None:
    """--reference-size WIDTHxHEIGHT -> (height, width); errors name this flag."""
    if not text:
        return None
    try:
        return parse_resolution(text)
    except FluxcError as e:
        raise FluxcError(str(e).replace("--resolution", "--reference-size", 1)) from None
