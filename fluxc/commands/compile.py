"""fluxc compile (not implemented yet)."""
import typer

from fluxc.errors import FluxcError


def compile() -> None:
    """Not implemented yet.

    Example: fluxc compile
    """
    raise FluxcError("fluxc compile is not implemented yet")
