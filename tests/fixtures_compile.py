"""Session fixtures for the compile area: the tiny exports compiled once by the real
TPU-MLIR compiler, laid out as models workspaces (<ws>/onnx -> the export,
<ws>/BM1684X = the bmodels), shared by every test that needs bmodels.

Both fixtures use one build cache (`compile_build_dir`): the dev and schnell tiny models
are built with the same seed, so their CLIP and T5 pieces are byte-identical and the
second compile reuses them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_fluxc_compile(args: list[str], env: dict | None = None, timeout: float = 1500,
                      cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`fluxc compile ARGS` in a subprocess (the real CLI, in `cwd`, default the repo), output captured."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("COLUMNS", "160")
    return subprocess.run([sys.executable, "-m", "fluxc.cli", "compile", *map(str, args)], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def make_workspace(root: Path, export_dir: Path) -> Path:
    """A models workspace whose onnx/ is the given export."""
    root.mkdir(parents=True, exist_ok=True)
    link = root / "onnx"
    if not link.exists():
        link.symlink_to(Path(export_dir).resolve(), target_is_directory=True)
    return root


def compile_into(ws: Path, build_dir: Path, args: list[str]) -> dict:
    r = run_fluxc_compile(["--models", ws, "--build-dir", build_dir, *args])
    if r.returncode != 0:
        raise AssertionError(f"fluxc compile {args} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return json.loads((ws / "BM1684X" / "compile_report.json").read_text())


@pytest.fixture(scope="session")
def compile_build_dir(tmp_path_factory) -> Path:
    """The session's compile cache. FLUXC_TEST_BUILD_CACHE names a folder kept across sessions
    (a developer's reruns skip the compiler for unchanged pieces); CI leaves it unset, so every
    CI run compiles from nothing."""
    keep = os.environ.get("FLUXC_TEST_BUILD_CACHE")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("compile_build")


@pytest.fixture(scope="session")
def compiled_schnell_w4(tmp_path_factory, export_schnell_tinyvae, compile_build_dir) -> Path:
    """Models folder: onnx/ (tiny schnell export with the tiny VAE) + BM1684X/ (W4BF16)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws_schnell_w4"), export_schnell_tinyvae)
    compile_into(ws, compile_build_dir, ["--quantize", "W4BF16", "--flux-type", "schnell", "--tiny-vae"])
    return ws


@pytest.fixture(scope="session")
def compiled_dev_bf16(tmp_path_factory, export_dev, compile_build_dir) -> Path:
    """Models folder: onnx/ (tiny dev export, full VAE) + BM1684X/ (BF16 over 3 devices)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws_dev_bf16"), export_dev)
    compile_into(ws, compile_build_dir, ["--quantize", "BF16", "--flux-type", "dev", "--num-devices", "3"])
    return ws
