"""The isolated TPU-MLIR toolchain: a private Python 3.10 venv holding tpu_mlir, and the one
way the rest of fluxc runs its tools.

Why a separate venv: tpu_mlir needs Python >=3.10,<3.11 and pins numpy/protobuf/transformers
versions that clash with the export stack (torch/diffusers in the project venv).

Layout (outside the repo):

    <cache_root()>/toolchain/
      tpu_mlir-1.30.2-<spec hash>/          the venv (bin/python, bin/model_transform, ...)
        .fluxc-toolchain.json               completion marker, written LAST by install()
      tpu_mlir-1.30.2-<spec hash>.lock      flock taken by install() (concurrent installs wait)
      tpu_mlir-1.30.2-<spec hash>.install.log   output of the last install (uv or pip)
      tpu_mlir-1.30.2-<spec hash>.venv.log      output of `python3.10 -m venv`

The modules, one job each:

    spec.py         what goes into a toolchain venv (InstallSpec, DEFAULT_SPEC, pinned versions)
    installed.py    where a venv lives, its completion marker and state, require_toolchain
    glibc.py        the host-glibc preload that lets tpu_mlir's tools start on newer hosts
    environment.py  the environment tools and simulator workers run with (toolchain_env)
    process.py      child processes: logged runs, the tool launcher, killing a process tree
    run.py          run_tool: one TPU-MLIR console script, in its environment
    python310.py    finding a Python 3.10 to build the venv with
    packages.py     installing the packages into the venv with uv or pip
    install.py      install(): lock, venv, packages, checks, marker; installed_versions
    smoke.py        smoke_check(): compile and simulate a one-operator model

This package re-exports only the names the compile step, the runtime, validation and the
benchmarks call: run_tool, require_toolchain, toolchain_python, toolchain_env and
toolchain_version. Everything else is imported from its module.
"""
from __future__ import annotations

from fluxc.toolchain.environment import toolchain_env
from fluxc.toolchain.installed import require_toolchain, toolchain_python, toolchain_version
from fluxc.toolchain.run import run_tool

__all__ = ["run_tool", "require_toolchain", "toolchain_python", "toolchain_env", "toolchain_version"]
