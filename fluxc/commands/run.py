"""fluxc run (not implemented yet)."""
import typer

from fluxc.errors import FluxcError


def run() -> None:
    """Not implemented yet.

    Example: fluxc run
    """
    raise FluxcError("fluxc run is not implemented yet")
