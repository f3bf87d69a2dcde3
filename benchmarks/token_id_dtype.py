"""Token ids as float32 (what sophon-demo's runtime feeds: `input_ids.numpy().astype(np.float32)`,
its bmodels compiled without --input_types) or as int32 (fluxc's piece contract)?

A CLIP-sized embedding lookup (vocab 49408, width 8) is compiled F16 for BM1684X both ways
(float32 ids -> Cast -> Gather; int32 ids -> Gather) and run on the chip simulator with ids
spread over the whole vocabulary. F16 holds integers exactly only up to 2048, so if the
compiler carries the float ids through F16 the lookup lands on wrong rows for large ids.
The result (rows exactly right per variant) goes to benchmarks/results/token_id_dtype.json.

Usage: .venv/bin/python benchmarks/token_id_dtype.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from results_file import git_commit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB, WIDTH, L = 49408, 8, 77


def build_onnx(path: Path, table: np.ndarray, ids_dtype: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if ids_dtype == "float32" else TensorProto.INT32
    nodes, x = [], "input_ids"
    if ids_dtype == "float32":
        nodes.append(helper.make_node("Cast", ["input_ids"], ["ids_i"], to=TensorProto.INT32))
        x = "ids_i"
    nodes.append(helper.make_node("Gather", ["table", x], ["emb"], axis=0))
    g = helper.make_graph(nodes, "ids", [helper.make_tensor_value_info("input_ids", elem, [1, L])],
                          [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, L, WIDTH])],
                          [numpy_helper.from_array(table, "table")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def run_variant(root: Path, table: np.ndarray, ids: np.ndarray, ids_dtype: str) -> dict:
    from fluxc.toolchain import run_tool

    d = root / ids_dtype
    d.mkdir()
    build_onnx(d / "ids.onnx", table, ids_dtype)
    np.savez(d / "in.npz", input_ids=ids.astype(ids_dtype))
    targs = ["--model_name", "ids", "--model_def", "ids.onnx", "--input_shapes", f"[[1,{L}]]", "--mlir", "ids.mlir"]
    if ids_dtype != "float32":
        targs += ["--input_types", ids_dtype]
    run_tool("model_transform", targs, d, d / "transform.log")
    run_tool("model_deploy", ["--mlir", "ids.mlir", "--quantize", "F16", "--chip", "bm1684x", "--model", "ids.bmodel"],
             d, d / "deploy.log")
    run_tool("model_runner", ["--model", "ids.bmodel", "--input", "in.npz", "--output", "out.npz"], d, d / "run.log")
    out = np.load(d / "out.npz")
    emb = out[out.files[0]].reshape(L, WIDTH)
    want = table[ids[0]].astype(np.float16).astype(np.float32)
    rows_ok = np.all(np.abs(emb - want) <= 1e-3 * np.abs(want).max(), axis=1)
    return {"rows_exact": int(rows_ok.sum()), "rows": L,
            "wrong_ids": [int(i) for i, ok in zip(ids[0], rows_ok) if not ok][:20]}


def main() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    ids = np.concatenate([[0, 1, 2047, 2048, 2049, 2051, 4097, 30001, 49406, 49407],
                          rng.integers(0, VOCAB, L - 10)]).astype(np.int64)[None]
    res = {}
    with tempfile.TemporaryDirectory(prefix="fluxc-ids-") as td:
        for dt in ("int32", "float32"):
            res[dt] = run_variant(Path(td), table, ids, dt)
            print(dt, res[dt], flush=True)
    commit = git_commit(short=False)
    out = REPO / "benchmarks" / "results" / "token_id_dtype.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": "embedding lookup vocab 49408, F16, BM1684X simulator: rows exactly right",
                               "commit": commit, "results": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
