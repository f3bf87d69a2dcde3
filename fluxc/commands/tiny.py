"""fluxc tiny: write a random-weight FLUX.1 pipeline (diffusers layout): the built-in tiny
model, or (--preset full) one at the published FLUX.1 sizes."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fluxc.tiny import build_tiny, preset_overrides


def tiny(
    out: Path = typer.Argument(..., help="Folder to write the pipeline into (must be empty or new, unless --force)."),
    flux_type: str = typer.Option("schnell", "--flux-type", help="schnell, dev (adds the guidance embedder) or kontext "
                                  "(dev's transformer, a FluxKontextPipeline model_index.json)."),
    preset: str = typer.Option(
        "tiny", "--preset",
        help="Model sizes: 'tiny' (small, for tests) or 'full' (exactly the published FLUX.1 sizes: 12B "
             "transformer, CLIP-L, T5-XXL encoder, FLUX VAE; bf16, sharded as on the Hub; ~33 GB, written "
             "one tensor at a time). A preset, not a separate command: only the sizes change."),
    sharded: bool = typer.Option(
        False, "--sharded",
        help="Write transformer/ (3 files) and text_encoder_2/ (2 files) as the Hub's sharded safetensors "
             "with *.safetensors.index.json (implied by --preset full)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Weight seed: the same seed gives byte-identical files."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Saved weight dtype: float32, float16 or bfloat16 (default: float32 for tiny, "
                              "bfloat16 for full)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
) -> None:
    """Write a random-weight FLUX.1 pipeline (real architecture) that
    diffusers.FluxPipeline.from_pretrained(OUT) loads offline; also OUT/tiny_vae (taef1 layout).
    The tokenizers are always small offline ones (max length 77 and 512, as in FLUX.1).

    Example: fluxc tiny models/tiny-schnell --flux-type schnell --seed 0

    Example: fluxc tiny /data/FLUX.1-dev --preset full --flux-type dev
    """
    overrides = preset_overrides(preset)
    if dtype is not None:
        overrides["dtype"] = dtype
    console = Console(stderr=True)
    build_tiny(out, flux_type=flux_type, seed=seed, force=force, sharded=sharded or preset == "full",
               progress=lambda msg: console.print(f"[cyan]tiny[/cyan] {msg}", highlight=False), **overrides)
