"""fluxc export (not implemented yet)."""
import typer

from fluxc.errors import FluxcError


def export() -> None:
    """Not implemented yet.

    Example: fluxc export
    """
    raise FluxcError("fluxc export is not implemented yet")
