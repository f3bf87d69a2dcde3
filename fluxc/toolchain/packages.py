"""Installing an install spec's packages into a fresh toolchain venv, with uv or pip.

uv is preferred (fast reinstalls from its wheel cache); FLUXC_TOOLCHAIN_INSTALLER=pip forces
pip. See install_packages."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Callable

from fluxc.errors import FluxcError, ToolError
from fluxc.toolchain.installed import toolchain_root, venv_python
from fluxc.toolchain.process import die_with_parent_fn, run_logged
from fluxc.toolchain.spec import InstallSpec

INSTALLER_ENV_VAR = "FLUXC_TOOLCHAIN_INSTALLER"  # "uv" (default) or "pip"


def _pip_settings(venv: Path, env: dict) -> dict[str, str]:
    """The user's effective pip configuration (files and PIP_* variables), as `pip config list`
    reports it: {key: value}, environment variables winning over files."""
    r = subprocess.run([str(venv_python(venv)), "-m", "pip", "config", "list"], capture_output=True,
                       text=True, env=env, timeout=120, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent_fn())
    files: dict[str, str] = {}
    from_env: dict[str, str] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^([^.]*)\.([\w-]+)=(['\"])(.*)\3$", line.strip())
        if m:
            (from_env if m.group(1) == ":env:" else files)[m.group(2)] = m.group(4)
    files.update(from_env)
    return files


def _uv_args(settings: dict[str, str]) -> list[str]:
    """pip's index / find-links / constraint settings, as uv options (uv does not read pip.conf)."""
    # pip merges candidates from every index; uv's default stops at the first index with the name
    args = ["--index-strategy", "unsafe-best-match"]
    if settings.get("index-url"):
        args += ["--index-url", settings["index-url"]]
    for url in settings.get("extra-index-url", "").split():
        args += ["--extra-index-url", url]
    for loc in settings.get("find-links", "").split():
        args += ["--find-links", loc]
    for c in settings.get("constraint", "").split():
        args += ["--constraint", c]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args


def install_packages(venv: Path, spec: InstallSpec, log: Path, env: dict,
                      progress: Callable[[str], None]) -> str:
    """Install spec.requirements into the venv; returns "uv" or "pip".

    uv is preferred: it keeps downloaded wheels in its own cache (~/.cache/uv, or UV_CACHE_DIR)
    and hard-links them into the venv, so a reinstall (repair, new spec sharing most wheels)
    takes seconds. pip's own cache does not help on hosts whose package proxy sends no HTTP
    caching headers (this one): pip then downloads the ~3 GB again every time. uv is installed
    into the toolchain venv itself (it is on PyPI), and the user's pip configuration (indexes,
    find-links, constraints, certificate) is handed to it. If uv cannot be installed or fails,
    plain pip (which reads that configuration itself) does the install.
    """
    py = str(venv_python(venv))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    installer = os.environ.get(INSTALLER_ENV_VAR, "uv").strip().lower()
    if installer not in ("uv", "pip"):
        raise FluxcError(f"{INSTALLER_ENV_VAR}={installer!r} is not valid; use uv or pip (or unset it)")
    if installer == "uv":
        try:
            run_logged(pip + ["uv"], toolchain_root(), log, env, 900, "pip install uv", die_with_parent=True)
            settings = _pip_settings(venv, env)
            uv_env = dict(env)
            if settings.get("cert") and "SSL_CERT_FILE" not in uv_env:
                uv_env["SSL_CERT_FILE"] = settings["cert"]
            run_logged([py, "-m", "uv", "pip", "install", "--python", py, *_uv_args(settings),
                         *spec.requirements, *spec.uv_pins],
                        toolchain_root(), log, uv_env, None, "uv pip install", append=True,
                        die_with_parent=True)
            return "uv"
        except ToolError as e:
            progress(f"      uv failed ({e.tool}, exit {e.returncode}; see {log}); installing with pip instead")
            with open(log, "ab") as f:
                f.write(b"\n[fluxc] uv failed; falling back to pip\n")
    run_logged(pip + list(spec.requirements), toolchain_root(), log, env, None, "pip install",
                append=installer == "uv", die_with_parent=True)
    return "pip"
