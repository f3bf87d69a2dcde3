"""The compile step's door to the TPU-MLIR toolchain (fluxc.toolchain), with a counter of
tool runs so a report (and the tests) can tell whether a run did any compiler work."""
from __future__ import annotations

import threading
from pathlib import Path

from fluxc.errors import ToolError
from fluxc.toolchain import require_toolchain, run_tool, toolchain_version


class Tools:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: list[str] = []  # "tool piece" per invocation, in start order

    def run(self, tool: str, args: list[str], cwd: Path, log: Path, what: str = "", label: str = "") -> None:
        """`label`: how the run is listed and named in errors, when not the tool's own name
        (fluxc's scripts run by the toolchain's `python`)."""
        with self._lock:
            self.runs.append(f"{label or tool} {what}".strip())
        Path(cwd).mkdir(parents=True, exist_ok=True)
        try:
            run_tool(tool, [str(a) for a in args], cwd=Path(cwd), log=Path(log))
        except ToolError as e:
            if not what:
                raise
            # name the piece first: "model_transform on piece X failed (exit 1); log: ...; command: ..."
            raise ToolError(f"{label or e.tool} on piece {what}", e.argv, e.log_path, e.tail, e.returncode) from None

    def info(self, bmodel: Path, cwd: Path, log: Path, what: str = "") -> str:
        """`model_tool --info` of a bmodel, as text (also kept in `log`)."""
        self.run("model_tool", ["--info", str(Path(bmodel).resolve())], cwd, log, what)
        return Path(log).read_text(errors="replace")


def require() -> None:
    require_toolchain()


def version() -> str:
    return str(toolchain_version())
