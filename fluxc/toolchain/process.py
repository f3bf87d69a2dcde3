"""Child processes of fluxc: a command run with its output in a log file (and the log's tail
for errors), through the tool launcher so the tool's whole process tree dies with fluxc, and
killing a process tree on timeout or interruption."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import psutil

from fluxc.diskfull import LOW_FREE_BYTES, disk_full_error, free_bytes
from fluxc.errors import ToolError

LOG_TAIL_LINES = 40


def log_tail(log: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        data = log.read_bytes()[-200_000:]
    except OSError:
        return "(no log)"
    lines = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        # progress bars rewrite a line with \r: keep what was shown last
        line = line.rstrip("\r").rsplit("\r", 1)[-1]
        lines.append(line)
    return "\n".join(lines[-n:])


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a child and everything it started (tpu_mlir's entry points re-launch python, which
    launches tpuc-opt, ...)."""
    victims = []
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - already gone: the child alone
        pass
    for p in [proc, *victims]:
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def die_with_parent_fn() -> Callable[[], None] | None:
    """A preexec_fn for install-time children: SIGKILL when the fluxc process dies (Linux), so
    a killed install never leaves pip/uv writing into a folder a later install wipes and
    rebuilds. Not used by run_tool: preexec_fn is unsafe in multi-threaded callers, and
    PDEATHSIG reaches only the direct child; run_tool goes through fluxc/tool_launcher.py,
    which kills the tool's whole process group when fluxc dies."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


LAUNCHER = Path(__file__).parent.parent / "tool_launcher.py"
# Variables that must not reach fluxc's own interpreter when it runs the launcher (they are
# meant for the toolchain's python; the launcher hands the tool its full env itself).
_LAUNCHER_SCRUB = ("LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def _spawn_guarded(argv: list[str], cwd: Path, env: dict, stdout) -> tuple[subprocess.Popen, int]:
    """Start `argv` through fluxc/tool_launcher.py; returns (launcher process, write end of its
    pipe). The tool dies with its whole process group when that write end closes: when fluxc
    exits for any reason (kill -9 included) or closes it on purpose."""
    r, w = os.pipe()  # both ends close-on-exec: no other child of this process inherits them
    try:
        launcher_env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_SCRUB}
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER), str(r)], cwd=str(cwd),
                                env=launcher_env, stdout=stdout, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, pass_fds=(r,))
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    try:
        os.write(w, (json.dumps({"argv": argv, "env": env}) + "\n").encode())
    except OSError:  # the launcher already died: its exit code tells
        pass
    return proc, w


def run_logged(argv: list[str], cwd: Path, log: Path, env: dict, timeout: float | None, tool: str,
                append: bool = False, die_with_parent: bool = False, guarded: bool = False) -> None:
    """Run argv with its output in `log`. guarded: through the tool launcher, so the tool and
    all its descendants die with this process (run_tool); die_with_parent: PDEATHSIG for a
    direct child (install-time, single-threaded callers)."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as f:
        f.write(f"$ cd {cwd} && {subprocess.list2cmdline(argv)}\n".encode())
        f.flush()
        w = None
        if guarded:
            proc, w = _spawn_guarded(argv, cwd, env, f)
        else:
            proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    preexec_fn=die_with_parent_fn() if die_with_parent else None)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if w is not None:
                os.close(w)  # the launcher kills the tool's process group
                w = None
            kill_tree(proc)
            f.write(f"\n[fluxc] killed after the {timeout:g} s timeout\n".encode())
            f.flush()
            raise ToolError(tool, argv, log, log_tail(log) + f"\n(timed out after {timeout:g} s)", -1) from None
        except BaseException:
            if w is not None:
                os.close(w)
                w = None
            kill_tree(proc)
            raise
        finally:
            if w is not None:
                os.close(w)
    if rc != 0:
        _raise_if_disk_full(tool, cwd, log)
        raise ToolError(tool, argv, log, log_tail(log), rc)


_DISK_FULL_MARKERS = ("No space left on device", "[Errno 28]", "ENOSPC")


def _raise_if_disk_full(tool: str, cwd: Path, log: Path) -> None:
    """A tool that failed because its disk filled up gets the disk-full error, not a log tail."""
    free = free_bytes(cwd)
    if any(m in log_tail(log, 200) for m in _DISK_FULL_MARKERS) or (free is not None and free < LOW_FREE_BYTES):
        raise disk_full_error(f"the {tool} output in {cwd}", cwd, option="--build-dir")
