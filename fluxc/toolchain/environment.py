"""The environment toolchain tools and simulator workers run with."""
from __future__ import annotations

import os
from pathlib import Path

from fluxc.toolchain.glibc import glibc_preload
from fluxc.toolchain.installed import require_toolchain, site_packages
from fluxc.toolchain.spec import DEFAULT_SPEC, InstallSpec

# Variables of the calling process that must not leak into the toolchain's Python.
SCRUB_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONNOUSERSITE", "VIRTUAL_ENV",
              "CONDA_PREFIX", "PYENV_VERSION", "__PYVENV_LAUNCHER__")


def scrubbed_env() -> dict[str, str]:
    """This process's environment without the variables in SCRUB_VARS."""
    return {k: v for k, v in os.environ.items() if k not in SCRUB_VARS}


def _join(*parts: str | None) -> str:
    return os.pathsep.join(p for p in parts if p)


def toolchain_env(spec: InstallSpec = DEFAULT_SPEC) -> dict[str, str]:
    """The environment for running toolchain tools or a long-lived simulator worker started
    with toolchain_python(): venv bin first on PATH, the variables tpu_mlir 1.30.2's __init__
    sets for its children (TPUC_ROOT, PYTHONPATH, LD_LIBRARY_PATH with lib, lib/capi,
    lib/third_party), and the glibc fix (LD_PRELOAD, see fluxc/toolchain/glibc.py). The
    dynamic loader reads LD_LIBRARY_PATH/LD_PRELOAD at process start, so a worker must be
    STARTED with this env (setting it inside a running process is too late)."""
    return build_env(require_toolchain(spec), spec)


def build_env(venv: Path, spec: InstallSpec) -> dict[str, str]:
    """toolchain_env() for the venv at `venv`, which need not be marked complete yet."""
    env = scrubbed_env()
    env["VIRTUAL_ENV"] = str(venv)
    if not spec.tpu_mlir:
        env["PATH"] = _join(str(venv / "bin"), os.environ.get("PATH"))
        return env
    root = site_packages(venv, spec) / "tpu_mlir"
    ppl = root / "cross_toolchains" / "ppl_compile"
    # Mirrors tpu_mlir/__init__.py (1.30.2): the tools re-apply it themselves; a worker that
    # imports pyruntime_bm / model_runner directly needs it from the start.
    env["PATH"] = _join(str(venv / "bin"), str(root / "bin"), str(root / "python" / "tools"),
                        str(root / "python" / "utils"), str(ppl / "bin"), os.environ.get("PATH"))
    env["PYTHONPATH"] = _join(str(root), str(root / "python"), str(root / "python" / "tools"),
                              str(root / "regression"), str(root / "customlayer" / "python"))
    env["LD_LIBRARY_PATH"] = _join(str(root / "lib"), str(root / "lib" / "capi"),
                                   str(root / "lib" / "third_party"), os.environ.get("LD_LIBRARY_PATH"))
    env["TPUC_ROOT"] = str(root)
    env.setdefault("PPL_PROJECT_ROOT", str(ppl))
    env.setdefault("PPL_BUILD_PATH", str(root / "build" / "ppl"))
    env.setdefault("PPL_RUNTIME_PATH", str(ppl / "deps"))
    env.setdefault("TPUKERNEL_CUSTOM_FIRMWARE_PATH", str(root / "lib" / "libcmodel_custom.so"))
    env.setdefault("CUSTOM_LAYER_UNITTEST_DIR", str(root / "customlayer" / "test_if" / "unittest"))
    preload = glibc_preload(root)
    if preload:
        env["LD_PRELOAD"] = preload
    return env
