"""fluxc verify (not implemented yet)."""
import typer

from fluxc.errors import FluxcError


def verify() -> None:
    """Not implemented yet.

    Example: fluxc verify
    """
    raise FluxcError("fluxc verify is not implemented yet")
