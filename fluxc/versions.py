"""Versions of installed Python distributions: the one place they are read, for the export
manifest (this process) and for the TPU-MLIR toolchain venv (fluxc/toolchain/install.py runs
this file by path with the venv's python: standard library only, Python 3.10 and up).

    python fluxc/versions.py tpu_mlir torch   ->  {"python": "3.10.14", "tpu_mlir": "1.30.2", ...}
"""
from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version

# the libraries whose versions an export records in its manifest
EXPORT_LIBRARIES = ("fluxc", "torch", "diffusers", "transformers", "onnx")


def package_versions(names, missing: str | None = None, with_python: bool = False) -> dict[str, str | None]:
    """{name: installed version, or `missing`} for each distribution name, in order; with
    with_python, the interpreter's version first under "python"."""
    out: dict[str, str | None] = {}
    if with_python:
        out["python"] = ".".join(map(str, sys.version_info[:3]))
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = missing
    return out


def library_versions() -> dict[str, str]:
    """The export libraries' versions in this process ("not installed" for a missing one)."""
    return package_versions(EXPORT_LIBRARIES, missing="not installed")


def format_versions(versions: dict) -> str:
    """"python 3.10.14, tpu_mlir 1.30.2, ..." (entries without a version left out)."""
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


if __name__ == "__main__":
    print(json.dumps(package_versions(sys.argv[1:], with_python=True)))
