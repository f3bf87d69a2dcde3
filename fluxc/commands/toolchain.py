"""fluxc toolchain (placeholder)."""
import typer

app = typer.Typer(help="The isolated TPU-MLIR toolchain.", no_args_is_help=True)


@app.command()
def status() -> None:
    """Example: fluxc toolchain status"""
    raise SystemExit(1)
