"""fluxc tiny (not implemented yet)."""
import typer

from fluxc.errors import FluxcError


def tiny() -> None:
    """Not implemented yet.

    Example: fluxc tiny
    """
    raise FluxcError("fluxc tiny is not implemented yet")
