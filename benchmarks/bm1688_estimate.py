"""Full-width FLUX.1 blocks on BM1688 vs BM1684X: the compiler's estimated time and device memory.

Builds one full-width double block and one single block (dim 3072, 24 heads x 128, random
weights) at the reference's BM1688 configuration (512x512 image = 1024 tokens, T5 length 256),
wraps them with fluxc's own piece wrappers and patches, exports them to ONNX, runs
model_transform once per block, then model_deploy W4BF16 (q_group_size 64, as
recipes/<chip>.yaml) for each chip, and reads the compiler's estimate (last line of
compiler_profile_0.txt, at that chip's cost-model clock: fluxc/compile/chips.py) and
`model_tool --info`'s device memory. The blocks alone per denoising step are then
19 double + 38 single blocks (head and tail are not measured here).

    .venv/bin/python benchmarks/bm1688_estimate.py [--size 512] [--t5-len 256] [--keep DIR]

Figures go to benchmarks/results/bm1688_estimate.json (with the commit).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from full_width_block import full_width_block
from results_file import write_results

from fluxc.compile.chips import get_chip
from fluxc.compile.parse import parse_info, parse_profile_ms
from fluxc.toolchain import run_tool

RESULTS = Path(__file__).resolve().parent / "results" / "bm1688_estimate.json"
CHIPS = ("bm1684x", "bm1688")
N_DOUBLE, N_SINGLE = 19, 38


def export_block(kind: str, size: int, t5_len: int, wd: Path) -> str:
    """ONNX of one full-width block through fluxc's wrappers; returns model_transform's shapes."""
    # deferred: torch (and the export wrappers, which import it) are heavy; --help should not load them
    import torch

    from fluxc.export.pieces import DoubleBlock, SingleBlock
    from fluxc.patches import Patcher

    blk, args, names, shapes = full_width_block(kind, size, t5_len)
    with Patcher() as p:
        p.apply(blk)
        m = SingleBlock(blk) if kind == "single" else DoubleBlock(blk)
        with torch.no_grad():
            torch.onnx.export(m, args, str(wd / "b.onnx"), input_names=names, opset_version=17, dynamo=False)
    del blk, m
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--t5-len", type=int, default=256)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--blocks", default="single,double", help="which blocks (a double block's transform "
                    "needs ~10 GB RAM)")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="fluxc_bm1688_"))
    rows = []
    try:
        for kind in a.blocks.split(","):
            wd = work / kind
            wd.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            if not (wd / "b.mlir").is_file():  # (a kept folder is reused)
                shapes = export_block(kind, a.size, a.t5_len, wd)
                run_tool("model_transform", ["--model_name", f"{kind}_block", "--model_def", "b.onnx",
                                             "--input_shapes", shapes, "--mlir", "b.mlir"], cwd=wd,
                         log=wd / "transform.log")
                (wd / "b.onnx").unlink()
                print(f"{kind}: export + transform {time.time() - t0:.0f} s", flush=True)
            for chip in CHIPS:
                cd = wd / chip
                cd.mkdir(exist_ok=True)
                for f in wd.iterdir():  # the MLIR itself copied (tools check its folder), the rest linked
                    if f.is_file() and not (cd / f.name).exists():
                        if f.suffix == ".mlir":
                            shutil.copy(f, cd / f.name)
                        else:
                            (cd / f.name).symlink_to(f)
                t0 = time.time()
                run_tool("model_deploy", ["--mlir", "b.mlir", "--quantize", "W4BF16", "--q_group_size", "64",
                                          "--chip", chip, "--model", "b.bmodel"], cwd=cd, log=cd / "deploy.log")
                run_tool("model_tool", ["--info", "b.bmodel"], cwd=cd, log=cd / "info.log")
                bi = parse_info((cd / "info.log").read_text(errors="replace"))
                prof = (cd / "compiler_profile_0.txt").read_text().strip().splitlines()[-1]
                ms = parse_profile_ms(cd / "compiler_profile_0.txt", get_chip(chip).cost_model_mhz)
                flops = float(re.search(r"flops:\s*(\d+)", prof).group(1))
                row = {"block": kind, "chip": chip, "estimate_ms": ms, "flops": flops,
                       "implied_tflops": round(flops / (ms * 1e-3) / 1e12, 3),
                       "peak_tflops": get_chip(chip).peak_tflops_bf16,
                       "device_mb": round(bi.device_mem / 2**20, 2), "weight_mb": round(bi.weight / 2**20, 2),
                       "runtime_mb": round(bi.runtime / 2**20, 2), "deploy_s": round(time.time() - t0, 1),
                       "profile_line": prof}
                rows.append(row)
                print(json.dumps(row), flush=True)
                for f in cd.glob("*.bmodel"):
                    f.unlink()
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    by = {(r["block"], r["chip"]): r for r in rows}
    step = weights = None
    if all((k, c) in by for k in ("single", "double") for c in CHIPS):
        step = {c: round(N_DOUBLE * by[("double", c)]["estimate_ms"] + N_SINGLE * by[("single", c)]["estimate_ms"], 1)
                for c in CHIPS}
        weights = {c: round(N_DOUBLE * by[("double", c)]["weight_mb"] + N_SINGLE * by[("single", c)]["weight_mb"], 1)
                   for c in CHIPS}
    write_results(RESULTS, {"size": a.size, "t5_len": a.t5_len, "quantize": "W4BF16 (q_group_size 64)", "rows": rows,
                            "blocks_per_step_ms": step, "blocks_weight_mb": weights,
                            "note": "compiler cost model, not a board measurement; 19 double + 38 single blocks, "
                                    "head/tail excluded"})
    print("\n| block | chip | estimate | implied TFLOPS (peak) | weight | device memory |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['chip']} | {r['estimate_ms']:.1f} ms | {r['implied_tflops']:.2f} ({r['peak_tflops']}) "
              f"| {r['weight_mb']:.1f} MB | {r['device_mb']:.1f} MB |")
    print(f"\nblocks per step: {step}; block weights: {weights} MB -> {RESULTS}")


if __name__ == "__main__":
    main()
