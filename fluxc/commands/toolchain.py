"""fluxc toolchain install | status: the isolated TPU-MLIR toolchain (a private Python 3.10 venv)."""
from __future__ import annotations

import time

import typer

from fluxc.errors import FluxcError
from fluxc.toolchain import toolchain_version
from fluxc.toolchain.install import install as install_toolchain
from fluxc.toolchain.install import installed_versions
from fluxc.toolchain.installed import state, toolchain_dir
from fluxc.toolchain.smoke import smoke_check
from fluxc.versions import format_versions

app = typer.Typer(
    help="The isolated TPU-MLIR toolchain (Python 3.10 venv with tpu_mlir, outside the repo).\n\n"
    "Example: fluxc toolchain install && fluxc toolchain status",
    no_args_is_help=True,
)


def _say(msg: str) -> None:
    typer.echo(msg, err=False)


@app.command()
def install() -> None:
    """Create (or repair) the TPU-MLIR toolchain venv; a no-op when it is already complete.

    Python 3.10 is taken from FLUXC_PYTHON310, else `python3.10` on PATH, else
    ~/.pyenv/versions/3.10*. The venv lives under FLUXC_CACHE (default ~/.cache/fluxc)/toolchain.

    Example: fluxc toolchain install
    """
    install_toolchain(progress=_say)


@app.command()
def status(
    smoke: bool = typer.Option(True, "--smoke/--no-smoke",
                               help="Compile and simulate a one-operator model to prove the toolchain works."),
) -> None:
    """Show where the toolchain is and its versions, then prove it works (non-zero exit if not).

    The smoke check compiles a one-operator ONNX model (MatMul) with model_transform and
    model_deploy (BF16, bm1684x, self-checked on the simulator), runs the bmodel on the chip
    simulator with model_runner and compares the result with numpy.

    Example: fluxc toolchain status
    """
    where = toolchain_dir()
    st = state()
    if st == "missing":
        raise FluxcError(f"TPU-MLIR toolchain is not installed at {where}; run `fluxc toolchain install`")
    if st == "incomplete":
        raise FluxcError(f"TPU-MLIR toolchain at {where} is incomplete (no valid completion marker: an "
                         "interrupted or different install); run `fluxc toolchain install` to repair it")
    versions = installed_versions()
    _say(f"toolchain: {where}")
    _say("versions: " + format_versions(versions))
    _say(f"compiler id: {toolchain_version()}")
    if not smoke:
        return
    t0 = time.monotonic()
    r = smoke_check(progress=_say)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items())
    _say(f"smoke check OK: simulator vs numpy max abs error {r['max_abs_err']:.3g} "
         f"(|ref| max {r['max_abs_ref']:.3g}), cosine {r['cosine']:.6f}; "
         f"{time.monotonic() - t0:.1f} s ({secs})")
