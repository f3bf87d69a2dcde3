"""fluxc tiny: write the built-in tiny random-weight FLUX.1 pipeline (diffusers layout)."""
from __future__ import annotations

from pathlib import Path

import typer


def tiny(
    out: Path = typer.Argument(..., help="Folder to write the pipeline into (must be empty or new, unless --force)."),
    flux_type: str = typer.Option("schnell", "--flux-type", help="schnell or dev (dev adds the guidance embedder)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Weight seed: the same seed gives byte-identical files."),
    dtype: str = typer.Option("float32", "--dtype", help="Saved weight dtype: float32, float16 or bfloat16."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
) -> None:
    """Write a tiny random-weight FLUX.1 pipeline (real architecture, small sizes) that
    diffusers.FluxPipeline.from_pretrained(OUT) loads offline; also OUT/tiny_vae (taef1 layout).

    Example: fluxc tiny models/tiny-schnell --flux-type schnell --seed 0
    """
    from rich.console import Console

    from fluxc.tiny import build_tiny

    console = Console(stderr=True)
    build_tiny(out, flux_type=flux_type, seed=seed, force=force, dtype=dtype,
               progress=lambda msg: console.print(f"[cyan]tiny[/cyan] {msg}", highlight=False))
