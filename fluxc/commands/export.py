"""fluxc export: FLUX.1 weights (local diffusers folder or Hub id) -> ONNX pieces + manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export(
    model: Optional[str] = typer.Argument(
        None, help="Local diffusers FLUX.1 folder or Hub id (default: black-forest-labs/FLUX.1-<type>)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Export folder (default: <models>/onnx)"),
    models: Optional[Path] = typer.Option(None, "--models", help="Workspace folder (default: $FLUXC_MODELS or ./models)"),
    flux_type: Optional[str] = typer.Option(
        None, "--flux-type", help="dev or schnell (default: from transformer/config.json, or schnell for the Hub default)"),
    height: int = typer.Option(1024, "--height", help="Image height (multiple of 16)"),
    width: int = typer.Option(1024, "--width", help="Image width (multiple of 16)"),
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
) -> None:
    """Export FLUX.1 to one ONNX file per piece (block by block, low memory), plus tokenizers,
    rotary table, configs and manifest.json. Re-running with the same inputs rewrites nothing.

    Example: fluxc export ./FLUX.1-schnell --height 512 --width 512 --tiny-vae madebyollin/taef1

    Example with LoRAs: fluxc export ./FLUX.1-dev --lora style.safetensors:0.8 --lora detail.safetensors
    """
    from fluxc.export.driver import ExportOptions, run_export
    from fluxc.export.lora import parse_lora_arg

    loras = [parse_lora_arg(x) for x in lora or []]  # a bad scale fails before any weight is read

    res = run_export(ExportOptions(model=model, out=out, models=models, flux_type=flux_type, height=height,
                                   width=width, t5_len=t5_seq_len, tiny_vae=tiny_vae, force=force, probe=probe,
                                   loras=loras))
    probes = f", {res.probes} probe piece(s) in probe/" if res.probes else ""
    typer.echo(f"exported {len(res.exported)} piece(s) ({len(res.traced)} traced, the others rebound), "
               f"reused {len(res.reused)} unchanged{probes}, "
               f"in {res.seconds:.1f} s -> {res.export_dir}")
