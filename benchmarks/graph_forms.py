"""Measure how the graph form of a FLUX single block changes TPU-MLIR's on-chip estimate.

    .venv/bin/python benchmarks/graph_forms.py [--block single|double] [--t5-len 256] [--size 512]
                                               [--forms default,slices,sdpa,concat]
    Example: .venv/bin/python benchmarks/graph_forms.py --t5-len 256 --size 512 --forms default,slices

Builds one full-width FLUX single block (full_width_block.py: dim 3072, 24 heads x 128, random weights), wraps it
with fluxc.export.pieces.SingleBlock in each form, exports it (TorchScript, opset 17),
compiles it with model_transform + model_deploy (BF16, bm1684x; needs `fluxc toolchain
install`) and prints the last line of compiler_profile_0.txt (the compiler's estimate).
Forms:
  default  matmul attention, rotary x*C + (x@P)*S, proj_out split in two weights
  slices   rotary in the direct form T[...,0]*x[...,0] + T[...,1]*x[...,1] (sophon-demo style)
  sdpa     attention through F.scaled_dot_product_attention
  concat   proj_out applied to concat([attn, mlp]) as in diffusers
Measured 2026-11-30 (t5 256 + 512x512 image = 1280 tokens, BF16): default 34.45 ms,
slices 115.43 ms (four stride-2 Slices of q/k: ~77 M GDMA cycles), sdpa 34.45 ms (identical
to matmul attention), concat 42.50 ms. Double block (--block double, same sizes): default
42.25 ms, slices 123.23 ms.
Takes ~2-3 min per form on 2 cores and ~3 GB RAM.
"""
from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from full_width_block import full_width_block

from fluxc.toolchain import run_tool


def measure(form: str, t5_len: int, size: int, work: Path, block: str = "single") -> str:
    # deferred: torch (and the export wrappers, which import it) are heavy; --help should not load them
    import torch

    from fluxc.export.pieces import DoubleBlock, SingleBlock
    from fluxc.patches import FluxAttnExportProcessor, Patcher

    if block != "single" and form == "concat":
        raise SystemExit("the concat form only exists for single blocks")
    J = t5_len + (size // 16) ** 2
    blk, args, names, shapes = full_width_block(block, size, t5_len)
    wd = work / f"{block}_{form}"
    wd.mkdir(parents=True, exist_ok=True)
    with Patcher() as p:
        p.apply(blk)
        if form == "slices":
            blk.attn.processor.rotary = "slices"
        elif form == "sdpa":
            blk.attn.processor = FluxAttnExportProcessor("sdpa")
        elif form != "default" and form != "concat":
            raise SystemExit(f"unknown form {form!r}")
        m = SingleBlock(blk, split_proj_out=form != "concat") if block == "single" else DoubleBlock(blk)
        with torch.no_grad():
            torch.onnx.export(m, args, str(wd / "b.onnx"), input_names=names, opset_version=17, dynamo=False)
    t0 = time.time()
    run_tool("model_transform", ["--model_name", "b", "--model_def", "b.onnx", "--input_shapes", shapes,
                                 "--mlir", "b.mlir"],
             cwd=wd, log=wd / "transform.log")
    run_tool("model_deploy", ["--mlir", "b.mlir", "--quantize", "BF16", "--chip", "bm1684x", "--model", "b.bmodel"],
             cwd=wd, log=wd / "deploy.log")
    last = (wd / "compiler_profile_0.txt").read_text().strip().splitlines()[-1]
    ms = re.search(r"runtime:\s*([\d.]+)ms", last)
    return f"{block} {form:8s} tokens={J}: estimate {ms.group(1) if ms else '?'} ms ({time.time() - t0:.0f} s) | {last}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example: python benchmarks/graph_forms.py "
                                 "--t5-len 256 --size 512 --forms default,slices")
    ap.add_argument("--t5-len", type=int, default=256)
    ap.add_argument("--size", type=int, default=512, help="square image size in pixels")
    ap.add_argument("--forms", default="default,slices,sdpa,concat")
    ap.add_argument("--block", choices=("single", "double"), default="single")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folders here")
    a = ap.parse_args(argv)
    work = a.keep or Path(tempfile.mkdtemp(prefix="fluxc_forms_"))
    try:
        for form in a.forms.split(","):
            print(measure(form, a.t5_len, a.size, work, a.block), flush=True)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
