"""fluxc verify: structure, memory, per-piece numerics and end-to-end check of compiled bmodels."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def verify(
    models: Optional[Path] = typer.Option(None, "--models", help="Workspace folder (default: FLUXC_MODELS or ./models)."),
    export: Optional[Path] = typer.Option(None, "--export", help="Export folder (default: MODELS/onnx)."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report (default: MODELS/BM1684X/verify_report.json)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="BF16 or W4BF16 transformer (default: what is compiled)."),
    flux_type: Optional[str] = typer.Option(None, "--flux-type", help="dev or schnell (checked against the export)."),
    memory_budget_mb: float = typer.Option(None, "--memory-budget-mb",
                                           help="Device memory per chip, MB (default 12335: BM1684X SoC NPU+VPU+VPP)."),
    steps: int = typer.Option(2, "--steps", help="Denoising steps of the end-to-end comparison."),
    seed: int = typer.Option(0, "--seed", help="Seed of the end-to-end comparison."),
    no_e2e: bool = typer.Option(False, "--no-e2e", help="Skip the end-to-end comparison."),
    pieces: Optional[str] = typer.Option(None, "--pieces", help="Run the per-piece numerics only for pieces matching this glob (e.g. 'clip_*')."),
) -> None:
    """Check compiled bmodels against the export on the chip simulator; exit 1 on any failure.

    Example: fluxc verify --models models --quantize W4BF16 --report verify.json
    """
    from rich.console import Console
    from rich.table import Table

    from fluxc import workspace
    from fluxc.fsutil import write_json_atomic
    from fluxc.validation.verify import DEFAULT_BUDGET_MB, verify_workspace

    import sys

    con = Console() if sys.stdout.isatty() else Console(width=150)
    m = workspace.models_dir(models)
    budget = DEFAULT_BUDGET_MB if memory_budget_mb is None else memory_budget_mb
    rep = verify_workspace(m, export, quantize, flux_type, budget, e2e=not no_e2e, steps=steps, seed=seed, pieces=pieces,
                           say=lambda s: con.print(f"[dim]{s}[/dim]"))
    table = Table(title=f"fluxc verify: {rep.info['flux_type']} {rep.info['quantize']} ({m})")
    for col in ("check", "item", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in rep.checks:
        table.add_row(c.section, c.name, "[green]ok[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
    con.print(table)
    out = Path(report) if report else workspace.chip_dir(m) / "verify_report.json"
    write_json_atomic(out, rep.to_dict())
    con.print(f"report: {out}")
    if rep.failures:
        con.print(f"[red]{len(rep.failures)} check(s) failed:[/red] " +
                  ", ".join(f"{c.name}" for c in rep.failures))
        raise typer.Exit(1)
    con.print(f"[green]all {len(rep.checks)} checks passed[/green]")
