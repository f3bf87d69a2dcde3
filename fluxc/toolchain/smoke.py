"""The toolchain's smoke check: a one-operator ONNX model compiled, run on the chip simulator
and compared with numpy."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fluxc.errors import FluxcError
from fluxc.toolchain.installed import require_toolchain, toolchain_dir
from fluxc.toolchain.run import run_tool

SMOKE_SHAPE = (1, 16)
SMOKE_OUT = 8
SMOKE_MIN_COSINE = 0.999
SMOKE_MAX_ABS = 0.05


def _build_smoke_model(work: Path):
    # onnx deferred: heavy, and only the smoke check (not `fluxc toolchain install`) needs it
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((SMOKE_SHAPE[1], SMOKE_OUT)) * 0.25).astype(np.float32)
    x = rng.standard_normal(SMOKE_SHAPE).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SMOKE_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SMOKE_SHAPE[0], SMOKE_OUT])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by the toolchain's older onnx
    onnx.checker.check_model(model)
    onnx.save(model, str(work / "smoke.onnx"))
    np.savez(work / "smoke_in.npz", x=x)
    return x, w


def smoke_check(progress: Callable[[str], None] = print, keep: bool = False) -> dict:
    """Compile a one-operator ONNX model (MatMul) with model_transform + model_deploy (BF16,
    bm1684x, the compiler checking itself on the simulator), run the bmodel on the chip
    simulator with model_runner and compare with numpy. Returns a dict with "ok",
    "max_abs_err", "cosine", per-step seconds and the work folder; raises ToolError if a tool
    fails and FluxcError if the result is wrong."""
    require_toolchain()
    work = Path(tempfile.mkdtemp(prefix="fluxc-smoke-"))
    steps: dict[str, float] = {}
    ok = False
    try:
        t = time.monotonic()
        progress("[1/4] building a one-operator ONNX model (MatMul 1x16 @ 16x8)")
        x, w = _build_smoke_model(work)
        ref = x @ w
        steps["build"] = time.monotonic() - t

        t = time.monotonic()
        progress("[2/4] model_transform (ONNX -> MLIR, checked against ONNX Runtime)")
        run_tool("model_transform", ["--model_name", "smoke", "--model_def", "smoke.onnx",
                                     "--input_shapes", f"[[{SMOKE_SHAPE[0]},{SMOKE_SHAPE[1]}]]",
                                     "--mlir", "smoke.mlir", "--test_input", "smoke_in.npz",
                                     "--test_result", "smoke_top.npz"],
                 cwd=work, log=work / "model_transform.log")
        steps["model_transform"] = time.monotonic() - t

        t = time.monotonic()
        progress("[3/4] model_deploy BF16 bm1684x (compiles, then checks itself on the simulator)")
        run_tool("model_deploy", ["--mlir", "smoke.mlir", "--quantize", "BF16", "--chip", "bm1684x",
                                  "--model", "smoke.bmodel", "--test_input", "smoke_in_f32.npz",
                                  "--test_reference", "smoke_top.npz", "--tolerance", "0.99,0.90"],
                 cwd=work, log=work / "model_deploy.log")
        steps["model_deploy"] = time.monotonic() - t

        t = time.monotonic()
        progress("[4/4] model_runner on the chip simulator, compared with numpy")
        run_tool("model_runner", ["--model", "smoke.bmodel", "--input", "smoke_in.npz", "--output", "out.npz"],
                 cwd=work, log=work / "model_runner.log")
        steps["model_runner"] = time.monotonic() - t
        with np.load(work / "out.npz") as out:
            if len(out.files) != 1:
                raise FluxcError(f"smoke check: expected one output in {work / 'out.npz'}, got {out.files}")
            y = out[out.files[0]].astype(np.float64).reshape(ref.shape)
        ref64 = ref.astype(np.float64)
        max_abs = float(np.abs(y - ref64).max())
        cosine = float((y * ref64).sum() / (np.linalg.norm(y) * np.linalg.norm(ref64) + 1e-30))
        ok = bool(cosine >= SMOKE_MIN_COSINE and max_abs <= SMOKE_MAX_ABS)
        result = {"ok": ok, "max_abs_err": max_abs, "cosine": cosine,
                  "max_abs_ref": float(np.abs(ref64).max()),
                  "seconds": {k: round(v, 2) for k, v in steps.items()},
                  "work_dir": str(work), "toolchain": str(toolchain_dir())}
        if not ok:
            raise FluxcError(f"smoke check: simulator output differs from numpy (max abs err {max_abs:.4g}, "
                             f"cosine {cosine:.6f}; need <= {SMOKE_MAX_ABS} and >= {SMOKE_MIN_COSINE}); "
                             f"files kept in {work}")
        return result
    finally:
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
