"""run_tool: one console script of the TPU-MLIR toolchain, in its environment, with its output
in a log and its whole process tree tied to fluxc's life."""
from __future__ import annotations

from pathlib import Path

from fluxc.errors import FluxcError
from fluxc.toolchain.environment import toolchain_env
from fluxc.toolchain.installed import require_toolchain
from fluxc.toolchain.process import run_logged


def run_tool(tool: str, args: list, cwd: Path, log: Path, env: dict | None = None,
             timeout: float | None = None) -> None:
    """Run a console script of the toolchain venv (model_transform, model_deploy, model_tool,
    model_runner, ...) with an argument list, in `cwd`, output (stdout+stderr) to `log`.
    `env` entries override toolchain_env(). Raises ToolError (tool, command line, log tail)
    on a non-zero exit or timeout. Safe to call from many threads/processes at once as long
    as each call has its own cwd (the tools write side files into it)."""
    venv = require_toolchain()
    exe = venv / "bin" / tool
    if "/" in tool or not exe.exists():
        raise FluxcError(f"unknown TPU-MLIR tool {tool!r}: no {exe}")
    full_env = toolchain_env()
    if env:
        full_env.update({str(k): str(v) for k, v in env.items()})
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    if tool == "model_deploy" and "--mlir" in args:
        # the .mlir names its weight file relative to the working folder
        mlir = Path(str(args[list(args).index("--mlir") + 1]))
        if (cwd / mlir).resolve().parent != cwd.resolve():
            raise FluxcError(f"model_deploy must run in the folder holding the .mlir: got cwd {cwd} "
                             f"and --mlir {mlir}; pass cwd={(cwd / mlir).parent}")
    argv = [str(exe)] + [str(a) for a in args]
    run_logged(argv, cwd, Path(log), full_env, timeout, tool, guarded=True)
