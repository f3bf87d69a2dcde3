"""fluxc verify: the build record, structure, memory, and every piece and the whole pipeline on
the chip simulator against the original model (diffusers/transformers on the source checkpoint)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fluxc import workspace
from fluxc.errors import FluxcError
from fluxc.fsutil import write_json_atomic
from fluxc.validation.verify import DEFAULT_BUDGET_MB, verify_workspace


def verify(
    models: Optional[Path] = typer.Option(None, "--models", help="Workspace or bmodel folder (fluxc compile --out) (default: FLUXC_MODELS or ./models)."),
    export: Optional[Path] = typer.Option(None, "--export", help="Export folder (default: MODELS/onnx)."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report (default: MODELS/BM1684X/verify_report.json)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Expect this transformer quantisation (default: what the build record says)."),
    flux_type: Optional[str] = typer.Option(None, "--flux-type", help="dev, schnell or kontext (checked against the export)."),
    memory_budget_mb: float = typer.Option(None, "--memory-budget-mb",
                                           help="Device memory per chip, MB (default 12335: BM1684X SoC NPU+VPU+VPP)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps of the end-to-end comparison (default: the flux type's full count, 4 schnell / 28 dev)."),
    guidance: float = typer.Option(3.5, "--guidance", help="Guidance scale (dev)."),
    reference: str = typer.Option("auto", "--reference", help="auto: the source checkpoint when at hand, else the ONNX pieces; onnx: the ONNX pieces."),
    seed: int = typer.Option(0, "--seed", help="Seed of the end-to-end comparison."),
    no_e2e: bool = typer.Option(False, "--no-e2e", help="Skip the end-to-end comparison."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Run the per-piece simulator checks as tasks on the "
                                          "Ray cluster at ADDRESS (host:port of `ray start --head`, or auto); the "
                                          "workspace must be on a path every node mounts. Needs "
                                          "pip install \"fluxc[cluster]\"."),
    full_size_checks: bool = typer.Option(False, "--full-size-checks", help="With --cluster: check every piece of a "
                                          "full-size build on the simulator (one task each), not only the probes "
                                          "compile checked."),
    pieces: Optional[str] = typer.Option(None, "--pieces", help="Report per-piece numerics only for pieces matching this glob (e.g. 'clip_*'); every piece still runs in the chain."),
) -> None:
    """Check compiled bmodels on the chip simulator against the original model; exit 1 on any failure.

    Example: fluxc verify --models models --steps 2 --report verify.json

    Example on a Ray cluster (full size, every piece): fluxc verify --cluster auto --full-size-checks --no-e2e
    """
    con = Console() if sys.stdout.isatty() else Console(width=150)
    m = workspace.models_dir(models)
    budget = DEFAULT_BUDGET_MB if memory_budget_mb is None else memory_budget_mb
    if reference not in ("auto", "onnx"):
        raise FluxcError(f"--reference {reference!r}: use auto or onnx")
    if steps is not None and steps < 1:
        raise FluxcError("--steps must be at least 1")

    if cluster is not None:
        from fluxc.cluster.connect import require_ray

        require_ray()  # the one-line install hint before any work
    t0 = time.perf_counter()

    def say(text: str) -> None:  # progress, one line per step and per piece, with the elapsed time
        con.print(f"[{time.perf_counter() - t0:6.1f} s] {text}", style="dim", highlight=False, markup=False)

    rep = verify_workspace(m, export, quantize, flux_type, budget, e2e=not no_e2e, steps=steps, seed=seed, pieces=pieces,
                           guidance=guidance, reference=reference, say=say, cluster=cluster,
                           full_size_checks=full_size_checks)
    sizes = rep.info.get("build_sizes") or []
    table = Table(title=f"fluxc verify: {rep.info['flux_type']} {rep.info['quantize']} ({m})"
                  + (f"; sizes {', '.join(sizes)}: a size-dependent check is named 'item @WxH'" if len(sizes) > 1 else ""))
    for col in ("check", "item", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in rep.checks:
        table.add_row(c.section, c.label, "[green]ok[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
    con.print(table)
    out = Path(report) if report else workspace.locate(m).chip / "verify_report.json"
    write_json_atomic(out, rep.to_dict())
    ref = rep.info.get("reference", {})
    if ref.get("kind") == "onnx":
        con.print(f"[yellow]note: checked against the exported ONNX only ({ref.get('why')}); the original "
                  "model was not at hand[/yellow]")
    con.print(f"report: {out}")
    if rep.failures:
        con.print(f"[red]{len(rep.failures)} check(s) failed:[/red] " +
                  ", ".join(c.label for c in rep.failures))
        raise typer.Exit(1)
    con.print(f"[green]all {len(rep.checks)} checks passed[/green]")
