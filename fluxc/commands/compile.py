"""fluxc compile: ONNX pieces -> checked, combined BM1684X bmodels."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from fluxc import workspace
from fluxc.compile.pipeline import CompileOptions, run_compile
from fluxc.errors import FluxcError
from fluxc.specs import FLUX_TYPES

BUILD_DIR_ENV = "FLUXC_BUILD_DIR"


def compile(
    export_dir: Optional[Path] = typer.Argument(None, help="Export folder, or a workspace holding one in onnx/ "
                                                "(default: <models>/onnx)."),
    quantize: str = typer.Option(..., "--quantize", "-q", help="Transformer blocks: BF16 or W4BF16."),
    flux_type: Optional[str] = typer.Option(None, "--flux-type", help="dev, schnell or kontext (default: the export's; "
                                            "an export of the other type is an error)."),
    tiny_vae: Optional[bool] = typer.Option(None, "--tiny-vae/--full-vae",
                                            help="Expect the tiny VAE (taef1) / the full VAE (default: the export's)."),
    chip: str = typer.Option("bm1684x", "--chip", help="Target chip: bm1684x or bm1688 (fluxc/compile/chips.py); "
                             "outputs go to <models>/<CHIP>/, the recipe is recipes/<chip>.yaml."),
    devices: int = typer.Option(3, "--num-devices", help="BF16: split the transformer over N chips (1..8); "
                                "`fluxc run --devices` then names the chip ids."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Pieces compiled at once "
                                       "(default: min(cores, free memory / per-piece need))."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe YAML (default: recipes/bm1684x.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <models>/BM1684X)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the chip-simulator similarity check."),
    estimate_only: bool = typer.Option(False, "--estimate-only", help="Compile every piece for its device memory "
                                       "and estimated time, keep no bmodel and combine nothing (to plan a build "
                                       "that does not fit this disk); writes estimate_report.json."),
    models: Optional[Path] = typer.Option(None, "--models", help="Workspace folder (default: $FLUXC_MODELS or ./models)."),
    build_dir: Optional[Path] = typer.Option(None, "--build-dir", help=f"Compile cache (default: ${BUILD_DIR_ENV}, "
                                             "else the export's workspace: <workspace>/build for an export in "
                                             "<workspace>/onnx, $FLUXC_CACHE/build for one elsewhere)."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Compile the pieces as tasks on the Ray cluster at "
                                          "ADDRESS (host:port of `ray start --head`, or auto); the export and the "
                                          "build cache must be on a path every node mounts. Needs "
                                          "pip install \"fluxc[cluster]\"."),
) -> None:
    """Compile an export's ONNX pieces to BM1684X bmodels with TPU-MLIR: each piece is
    quantised per the recipe, checked on the chip simulator against its float reference,
    cached by content, then combined into the sophon-demo file layout. Writes
    compile_report.json (similarity, estimated on-chip time, memory per piece).

    Example: fluxc compile --quantize W4BF16 --flux-type schnell

    Example (BF16 over three chips): fluxc compile --quantize BF16 --flux-type dev --num-devices 3

    Example for the BM1688 (models/BM1688/): fluxc compile --quantize W4BF16 --chip bm1688

    Example on a Ray cluster (workspace on a shared path): fluxc compile --quantize W4BF16 --cluster auto
    """
    if flux_type is not None and flux_type not in FLUX_TYPES:
        raise FluxcError(f"unknown flux type {flux_type!r}; use --flux-type {', '.join(FLUX_TYPES)}")
    if cluster is not None:
        from fluxc.cluster.connect import require_ray

        require_ray()  # the one-line install hint before any work
        if jobs is not None:
            raise FluxcError("--jobs and --cluster do not go together: on a cluster, Ray runs as many pieces as "
                             "the nodes' CPUs and memory hold")
    ws = workspace.models_dir(models)
    exp = workspace.locate(export_dir).export if export_dir else workspace.export_dir(ws)
    bdir = build_dir or (Path(os.environ[BUILD_DIR_ENV]) if os.environ.get(BUILD_DIR_ENV)
                         else workspace.default_build_dir(exp))
    opts = CompileOptions(
        export_dir=exp,
        out_dir=out or workspace.chip_dir(ws, chip),
        build_dir=bdir,
        quantize=quantize, flux_type=flux_type, tiny_vae=tiny_vae, chip=chip, devices=devices,
        jobs=jobs, recipe=recipe, check=not no_check, estimate_only=estimate_only, cluster=cluster,
    )
    run_compile(opts)
