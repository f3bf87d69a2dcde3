"""Where a toolchain venv lives, and whether it can be trusted.

A venv folder is trusted only when its completion marker exists and names the same install
spec hash; anything else (interrupted install, other spec, hand-made folder) is reported
"incomplete", and install() wipes and rebuilds it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from fluxc.errors import FluxcError
from fluxc.toolchain.spec import DEFAULT_SPEC, InstallSpec
from fluxc.workspace import cache_root

MARKER_NAME = ".fluxc-toolchain.json"
MARKER_FORMAT = 1


def toolchain_root() -> Path:
    # absolute: tools run in other working folders
    return Path(os.path.abspath(cache_root())) / "toolchain"


def toolchain_dir(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The venv folder for `spec` (it may not exist yet)."""
    return toolchain_root() / spec.folder_name


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path, spec: InstallSpec) -> Path:
    return venv / "lib" / "python{}.{}".format(*spec.python_minor) / "site-packages"


def read_marker(spec: InstallSpec = DEFAULT_SPEC) -> dict | None:
    """The completion marker if the folder is a complete install of `spec`, else None."""
    venv = toolchain_dir(spec)
    try:
        marker = json.loads((venv / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or marker.get("spec_hash") != spec.hash:
        return None
    if not venv_python(venv).exists():
        return None
    if spec.tpu_mlir and not (site_packages(venv, spec) / "tpu_mlir" / "__init__.py").exists():
        return None
    return marker


def state(spec: InstallSpec = DEFAULT_SPEC) -> str:
    """"ok" (complete install), "incomplete" (a folder without a valid marker) or "missing"."""
    if read_marker(spec) is not None:
        return "ok"
    return "incomplete" if toolchain_dir(spec).exists() else "missing"


def require_toolchain(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The venv folder of a complete install; FluxcError with the fix otherwise."""
    if read_marker(spec) is None:
        raise FluxcError(
            f"TPU-MLIR toolchain is not installed (or incomplete) at {toolchain_dir(spec)}; "
            "run `fluxc toolchain install`")
    return toolchain_dir(spec)


def toolchain_python(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The toolchain venv's python (run it with toolchain_env())."""
    return venv_python(require_toolchain(spec))


def toolchain_version(spec: InstallSpec = DEFAULT_SPEC) -> str:
    """A short id of the installed compiler, for compile cache keys, e.g. "tpu_mlir-1.30.2"."""
    return spec.name


def tpu_mlir_root(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The installed tpu_mlir package folder (TPUC_ROOT)."""
    return site_packages(require_toolchain(spec), spec) / "tpu_mlir"
