"""Finding a Python 3.10 to build the toolchain venv with (tpu_mlir needs >=3.10,<3.11)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from fluxc.errors import FluxcError
from fluxc.toolchain.environment import scrubbed_env
from fluxc.toolchain.process import die_with_parent_fn

PYTHON_ENV_VAR = "FLUXC_PYTHON310"

_PROBE = ("import sys, json, venv, ensurepip; "
          "print(json.dumps({'v': list(sys.version_info[:3]), 'exe': sys.executable}))")


def probe_python(path: str) -> tuple[tuple[int, ...] | None, str, str]:
    """(version, real executable, problem) of the interpreter at `path`."""
    env = scrubbed_env()
    try:
        r = subprocess.run([path, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=env,
                           stdin=subprocess.DEVNULL, preexec_fn=die_with_parent_fn())
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, path, f"cannot run ({e.__class__.__name__})"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
        return None, path, f"does not run ({last})"
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, path, "unexpected output"
    return tuple(info["v"]), info["exe"] or path, ""


def find_python310(minor: tuple[int, int] = (3, 10)) -> Path:
    """FLUXC_PYTHON310, else a working `python3.10` on PATH, else ~/.pyenv/versions/3.10*."""
    want = f"{minor[0]}.{minor[1]}"
    explicit = os.environ.get(PYTHON_ENV_VAR)
    if explicit:
        if not Path(explicit).exists():
            raise FluxcError(f"{PYTHON_ENV_VAR}={explicit} does not exist; point it at a Python {want} "
                             f"interpreter (with venv/ensurepip) or unset it")
        v, exe, problem = probe_python(explicit)
        if v is None or tuple(v[:2]) != minor:
            what = problem or f"is Python {'.'.join(map(str, v))}"
            raise FluxcError(f"{PYTHON_ENV_VAR}={explicit} {what}, not a usable Python {want}; "
                             f"point it at a Python {want} interpreter (with venv/ensurepip) or unset it")
        return Path(exe)
    candidates: list[str] = []
    on_path = shutil.which(f"python{want}")
    if on_path:
        candidates.append(on_path)
    pyenv_roots = [Path(os.environ["PYENV_ROOT"])] if os.environ.get("PYENV_ROOT") else []
    pyenv_roots.append(Path.home() / ".pyenv")

    def vkey(p: Path):
        return [int(x) if x.isdigit() else 0 for x in re.split(r"[.\-]", p.parent.parent.name)]

    for root in pyenv_roots:
        found = sorted(root.glob(f"versions/{want}*/bin/python"), key=vkey, reverse=True)
        candidates += [str(p) for p in found]
    for c in candidates:
        v, exe, _ = probe_python(c)
        if v is not None and tuple(v[:2]) == minor:
            return Path(exe)
    raise FluxcError(
        f"no Python {want} found (TPU-MLIR needs >={want},<{minor[0]}.{minor[1] + 1}); install one "
        f"(`pyenv install {want}` or your distribution's python{want} with its venv module) "
        f"or set {PYTHON_ENV_VAR}=/path/to/python{want}")
