"""The `fluxc` command line. Each command lives in fluxc/commands/<name>.py; this file only
assembles them and turns FluxcError (and a full disk, OSError ENOSPC, wherever it happens)
into a one-line message and a non-zero exit."""
from __future__ import annotations

import sys

import typer

from fluxc.commands import compile as compile_cmd
from fluxc.commands import export as export_cmd
from fluxc.commands import run as run_cmd
from fluxc.commands import serve as serve_cmd
from fluxc.commands import tiny as tiny_cmd
from fluxc.commands import toolchain as toolchain_cmd
from fluxc.commands import verify as verify_cmd
from fluxc.errors import FluxcError

app = typer.Typer(
    name="fluxc",
    help="FLUX.1 (dev/schnell) from Hugging Face weights to checked BM1684X bmodels.\n\n"
    "Example: fluxc export && fluxc compile --quantize W4BF16 --flux-type schnell && fluxc verify && fluxc run",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    app.command("export")(export_cmd.export)
    app.command("compile")(compile_cmd.compile)
    app.command("verify")(verify_cmd.verify)
    app.command("run")(run_cmd.run)
    app.command("serve")(serve_cmd.serve)
    app.command("tiny")(tiny_cmd.tiny)
    app.add_typer(toolchain_cmd.app, name="toolchain")


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        try:
            app(args=argv, standalone_mode=True)
        except OSError as e:
            from fluxc.diskfull import from_oserror, is_disk_full

            if not is_disk_full(e):
                raise
            args = sys.argv[1:] if argv is None else argv
            raise from_oserror(e, next((a for a in args if not a.startswith("-")), None)) from None
    except FluxcError as e:
        msg = str(e)
        first, _, rest = msg.partition("\n")
        typer.secho(f"error: {first}", fg=typer.colors.RED, err=True)
        if rest:
            typer.echo(rest, err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
