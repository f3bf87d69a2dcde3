"""The one exception type fluxc shows to users as a one-line error."""


class FluxcError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""

    exit_code = 2


class ToolError(FluxcError):
    """A TPU-MLIR tool failed. Carries the tool, its command line and the tail of its log."""

    def __init__(self, tool: str, argv: list[str], log_path, tail: str, returncode: int):
        self.tool, self.argv, self.log_path, self.tail, self.returncode = tool, argv, log_path, tail, returncode
        super().__init__(
            f"{tool} failed (exit {returncode}); log: {log_path}; command: {' '.join(map(str, argv))}\n"
            f"--- last lines of the log ---\n{tail}"
        )
