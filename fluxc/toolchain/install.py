"""install(): make a complete toolchain venv for an install spec, or repair one, and read the
versions installed in it.

The completion marker is written LAST, so an interrupted install is detected (no marker) and
repaired by the next one; concurrent installs serialise on a lock file next to the venv."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from fluxc import versions as versions_script
from fluxc.errors import FluxcError
from fluxc.fsutil import write_json_atomic
from fluxc.toolchain.environment import build_env, scrubbed_env
from fluxc.toolchain.installed import (MARKER_FORMAT, MARKER_NAME, read_marker, require_toolchain, site_packages,
                                       toolchain_dir, toolchain_root, venv_python)
from fluxc.toolchain.packages import install_packages
from fluxc.toolchain.process import LOG_TAIL_LINES, die_with_parent_fn, run_logged
from fluxc.toolchain.python310 import find_python310
from fluxc.toolchain.spec import DEFAULT_SPEC, InstallSpec
from fluxc.versions import format_versions


@contextmanager
def _install_lock(spec: InstallSpec, progress: Callable[[str], None]) -> Iterator[None]:
    root = toolchain_root()
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f"{spec.folder_name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another fluxc toolchain install to finish (lock {lock_path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock (also released if the process dies)


def _venv_run(venv: Path, args: list[str], timeout: float = 600) -> str:
    """stdout of the venv's python run with `args`; FluxcError (with the output's tail) if it fails."""
    env = scrubbed_env()
    r = subprocess.run([str(venv_python(venv)), *args], capture_output=True, text=True,
                       env=env, timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent_fn())
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
        raise FluxcError(f"toolchain check failed in {venv} (exit {r.returncode}); "
                         f"run `fluxc toolchain install` again\n{tail}")
    return r.stdout


def _installed_versions(venv: Path, spec: InstallSpec) -> dict[str, str]:
    # fluxc/versions.py run by path; -I: its folder (fluxc/) is not put on sys.path
    script = str(Path(versions_script.__file__).resolve())
    out = _venv_run(venv, ["-I", script, *spec.report])
    return json.loads(out.strip().splitlines()[-1])


def installed_versions(spec: InstallSpec = DEFAULT_SPEC) -> dict[str, str]:
    """Versions of python and the spec's packages, read from the installed venv."""
    return _installed_versions(require_toolchain(spec), spec)


def install(progress: Callable[[str], None] = print, spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """Make sure a complete toolchain venv for `spec` exists; return its folder.

    A no-op (seconds) when the marker says it is complete. A folder without a valid marker is
    never trusted: it is wiped and rebuilt. The marker is written last, so an interrupted
    install is detected and repaired by the next one. Concurrent installs serialise on a lock.
    """
    venv = toolchain_dir(spec)
    if read_marker(spec) is not None:
        progress(f"toolchain already installed at {venv}")
        return venv
    with _install_lock(spec, progress):
        if read_marker(spec) is not None:  # another process finished it while we waited
            progress(f"toolchain already installed at {venv}")
            return venv
        t0 = time.monotonic()
        py = find_python310(spec.python_minor)
        progress(f"[1/5] Python {spec.python_minor[0]}.{spec.python_minor[1]}: {py}")
        if venv.exists() or venv.is_symlink():
            progress(f"[2/5] removing incomplete toolchain folder {venv} (no valid completion marker)")
            if venv.is_symlink() or venv.is_file():
                venv.unlink()
            else:
                shutil.rmtree(venv)
        else:
            progress(f"[2/5] creating venv {venv}")
        log = toolchain_root() / f"{spec.folder_name}.install.log"
        venv_log = toolchain_root() / f"{spec.folder_name}.venv.log"
        env = scrubbed_env()
        # The venv cannot be built elsewhere and renamed (venvs hold absolute paths); the
        # marker written last is what makes it trusted.
        run_logged([str(py), "-m", "venv", str(venv)], toolchain_root(), venv_log, env, 600, "python -m venv",
                   die_with_parent=True)
        progress(f"[3/5] installing {' '.join(spec.requirements)} (log: {log}; minutes on a cold cache)")
        how = install_packages(venv, spec, log, env, progress)
        progress("[4/5] checking the installed toolchain")
        _venv_run(venv, ["-c", "import " + ", ".join(spec.imports)])
        if spec.tpu_mlir:
            _check_launch(venv, spec)
        versions = _installed_versions(venv, spec)
        marker = {
            "format": MARKER_FORMAT,
            "spec_hash": spec.hash,
            "spec": spec.to_dict(),
            "versions": versions,
            "base_python": str(py),
            "installer": how,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "install_seconds": round(time.monotonic() - t0, 1),
        }
        write_json_atomic(venv / MARKER_NAME, marker)
        progress(f"[5/5] toolchain ready at {venv} ({format_versions(versions)}; installed with {how}) "
                 f"in {marker['install_seconds']:.0f} s")
        return venv


def _check_launch(venv: Path, spec: InstallSpec) -> None:
    """A compiled tool of tpu_mlir starts with the environment run_tool uses (this is what the
    glibc clash breaks: without the fix tpuc-opt dies with a segfault here)."""
    root = site_packages(venv, spec) / "tpu_mlir"
    r = subprocess.run([str(root / "bin" / "tpuc-opt"), "--version"], capture_output=True, text=True,
                       env=build_env(venv, spec), timeout=120, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent_fn())
    if r.returncode != 0:
        raise FluxcError(f"tpu_mlir's tpuc-opt does not start in {venv} (exit {r.returncode}; "
                         f"glibc clash?); not marking it complete: {(r.stderr or r.stdout).strip()[-300:]}")
