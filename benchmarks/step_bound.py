"""How fast a full-size denoising step can get with TPU-MLIR 1.30.2's kernels for bm1684x, from
figures already measured (no compile here):

- per full-width block (1024x1024, T5 512: 4608 tokens; default graph form), the cost model's
  compute time (TIU cycles: every command of the block's compute unit, 1 cycle = 1 ns) from
  benchmarks/results/block_breakdown.json, i.e. the block's time if all of its DMA were hidden
  under compute, and what its compute is made of (A16MatMul / MatMul at the chip's peak,
  Softmax, GELU, elementwise);
- the step's other pieces (head, tail) from benchmarks/results/full_size.json;
- step lower bound = 19 x double + 38 x single (compute only) + head + tail, against issue 18's
  goals (W4BF16 <= 5.4 s, BF16 <= 5.9 s) and the matmul FLOPs at 16 TFLOPS (the chip's peak).

    .venv/bin/python benchmarks/step_bound.py            # writes benchmarks/results/step_bound.json
    .venv/bin/python benchmarks/step_bound.py --render   # prints the table

Size: full size (full-width blocks, 4608 tokens). Cost model, not a board measurement.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from results_file import write_results

RESULTS = Path(__file__).resolve().parent / "results"
GOALS_S = {"W4BF16": 5.4, "BF16": 5.9}
COUNTS = {"double": 19, "single": 38}
PEAK_TFLOPS = 16.0


def compute() -> dict:
    bb = json.loads((RESULTS / "block_breakdown.json").read_text())
    fs = json.loads((RESULTS / "full_size.json").read_text())
    blocks: dict = {}
    for run in bb["runs"]:
        if run["form"] != "prescaled":
            continue
        for q, r in run["quantize"].items():
            b = r.get("breakdown")
            if not b:
                continue
            by = {t["op"]: t["tiu_cycles"] / 1e6 for t in b["by_type"]}
            blocks.setdefault(q, {})[run["block"]] = {
                "estimate_ms": round(r["estimate_ms"], 3), "compute_ms": round(b["tiu_cycles"] / 1e6, 3),
                "dma_not_hidden_ms": round(b["gdma_only"] * b["total_cycles"] / 1e6, 3),
                "flops": r["flops"], "compute_by_op_ms": {k: round(v, 3) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
            }
    out: dict = {"source": {"block_breakdown": bb["commit"], "full_size": fs["commit"][:10]}, "builds": {}}
    for q, bl in blocks.items():
        if set(bl) != set(COUNTS):
            continue
        key = "w4bf16" if q == "W4BF16" else "bf16"
        est = fs[key]
        step_ms = est["est_step_s"] * 1000
        blocks_ms = sum(COUNTS[k] * bl[k]["estimate_ms"] for k in COUNTS)
        rest_ms = step_ms - blocks_ms  # head + tail (and anything else per step) as the full build has them
        compute_ms = sum(COUNTS[k] * bl[k]["compute_ms"] for k in COUNTS)
        flops = sum(COUNTS[k] * bl[k]["flops"] for k in COUNTS)
        out["builds"][q] = {
            "blocks": bl, "step_estimate_s": round(step_ms / 1000, 3),
            "head_tail_ms": round(rest_ms, 1),
            "step_bound_all_dma_hidden_s": round((compute_ms + rest_ms) / 1000, 3),
            "step_at_peak_flops_s": round(flops / (PEAK_TFLOPS * 1e12) + rest_ms / 1000, 3),
            "goal_s": GOALS_S[q],
            "goal_below_bound": GOALS_S[q] < (compute_ms + rest_ms) / 1000,
        }
    return out


def render(doc: dict) -> str:
    rows = ["| build | step (cost model) | bound: all DMA hidden | blocks' matmul FLOPs at 16 TFLOPS | goal | goal below the bound |",
            "|---|---|---|---|---|---|"]
    for q, b in doc["builds"].items():
        rows.append(f"| {q} | {b['step_estimate_s']:.3f} s | {b['step_bound_all_dma_hidden_s']:.3f} s | "
                    f"{b['step_at_peak_flops_s']:.3f} s | {b['goal_s']} s | {'yes' if b['goal_below_bound'] else 'no'} |")
    rows += ["", "| build | block | estimate | compute (TIU) | DMA not hidden | compute by op |", "|---|---|---|---|---|---|"]
    for q, b in doc["builds"].items():
        for k, v in b["blocks"].items():
            ops = ", ".join(f"{o} {ms:.1f}" for o, ms in list(v["compute_by_op_ms"].items())[:5])
            rows.append(f"| {q} | {k} | {v['estimate_ms']:.1f} ms | {v['compute_ms']:.1f} ms | "
                        f"{v['dma_not_hidden_ms']:.1f} ms | {ops} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", action="store_true", help="print the results file as markdown and stop")
    a = ap.parse_args()
    path = RESULTS / "step_bound.json"
    if a.render:
        print(render(json.loads(path.read_text())))
        return
    doc = compute()
    write_results(path, doc)
    print(render(doc))


if __name__ == "__main__":
    main()
