"""Full-size FLUX.1-schnell W4BF16 (1024x1024, T5 length 512, tiny VAE, one BM1684X) device
memory as the sail runtime would hold it: the bmodels' weight + instruct + runtime plus the
I/O tensors runtime/sail_flux.py allocates (one per role, runtime/device_memory.py).

What is measured and what is not (say so wherever the figure is quoted):
- I/O tensors: exact, from the full-size piece specs (fluxc/specs.py) through io_plan.
- Transformer file: from the full-width blocks compiled alone (tpu-mlir-facts.md): W4BF16
  single block weight 77.5 MB, device 487 MB (so 409.5 MB non-weight); double block W4BF16
  weight 186 MB. Head / tail weights from parameter counts in BF16 (90 / 38 MB, as
  fluxc/compile/split.py). The combined file's runtime area is shared: taken as the single
  block's non-weight 409.5 MB (it also holds that block's instructions: the other blocks'
  instructions are not counted, so this part is a lower bound).
- T5 (W4BF16 blocks, F16 embedding), CLIP (F16) and the tiny VAE (BF16): parameter counts
  only (no full-size compile of them here); runtimes are guesses marked as such.
The lead may replace these with `device_memory_for_build` on the measured full-size build.

Several image sizes (issue 17 item 5): the sail runtime allocates every size's tensors at load,
one per role and distinct shape (io_plan_sizes); "io_tensors_by_sizes" gives that exact figure
for 1024x1024 alone, + 1344x768, + 1344x768 + 512x512 (the sizes of benchmarks/resolution_merge.py).

Usage: .venv/bin/python benchmarks/sail_device_memory.py [--json benchmarks/results/sail_device_memory.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from results_file import git_commit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 2**20


def full_dims():
    from fluxc.specs import FluxDims

    return FluxDims(flux_type="schnell", height=1024, width=1024, clip_vocab=49408, clip_dim=768, clip_layers=12,
                    clip_len=77, t5_vocab=32128, t5_dim=4096, t5_layers=24, t5_len=512, inner_dim=3072, head_dim=128,
                    in_channels=64, out_channels=64, num_double=19, num_single=38, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=False, latent_channels=16, vae_scale=8, tiny_vae=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "sail_device_memory.json"))
    a = ap.parse_args()
    from fluxc.runtime.device_memory import BUDGET_MB, build_device_memory
    from fluxc.runtime.sail_flux import io_plan, io_plan_sizes, kinds_of
    from fluxc.specs import piece_specs

    d = full_dims()
    specs = {s.net_name: s for s in piece_specs(d)}
    tensors, _ = io_plan(specs, {n: 0 for n in specs}, kinds_of(specs))
    # T5-XXL block: q,k,v,o 4 x 4096^2 + gated FFN 3 x 4096 x 10240 = 192.9 M params; W4 with
    # groups of 64 (int4 + a bf16 scale and zero per group) = 0.5625 bytes per parameter
    t5_block_params = 4 * 4096**2 + 3 * 4096 * 10240
    files = {
        "schnell_w4bf16_transformer.bmodel (blocks measured, head/tail from params)": {
            "weight": (19 * 186.0 + 38 * 77.5 + 90.0 + 38.0) * MB, "instruct": 0, "runtime": (487.0 - 77.5) * MB},
        "w4bf16_t5.bmodel (params; runtime guessed)": {
            "weight": (24 * t5_block_params * 0.5625 + 32128 * 4096 * 2) , "instruct": 0, "runtime": 150 * MB},
        "clip.bmodel (params; runtime guessed)": {"weight": 123e6 * 2, "instruct": 0, "runtime": 30 * MB},
        "tiny_vae_decoder_bf16.bmodel (params; runtime guessed)": {"weight": 1.2e6 * 2, "instruct": 0,
                                                                   "runtime": 600 * MB},
    }
    for f in files.values():
        f["total"] = int(f["weight"] + f["instruct"] + f["runtime"])
    per_chip = build_device_memory([(0, m) for m in files.values()], tensors)
    chip = per_chip[0]
    io_rows = sorted(((t.role, list(t.shape), t.dtype, round(t.nbytes / MB, 2)) for t in tensors), key=lambda r: -r[3])
    try:
        commit = git_commit(short=False)
    except OSError:
        commit = ""
    res = {
        "what": "full-size FLUX.1-schnell W4BF16, 1024x1024, T5 512, tiny VAE, one BM1684X: device memory per the "
                "sail runtime's plan; I/O tensors exact, transformer from full-width blocks compiled alone, "
                "T5/CLIP/VAE from parameter counts (see the script's docstring)",
        "commit": commit,
        "io_tensors": {"count": len(tensors), "mb": round(chip["io"] / MB, 1), "rows": io_rows},
        "files_mb": {k: round(v["total"] / MB, 1) for k, v in files.items()},
        "total_mb": round(chip["total"] / MB, 1),
        "reference_measured_mb": 11419,
        "budget_mb": BUDGET_MB,
        "old_sail_engine_io_mb": round(sum(
            sum(int(__import__("numpy").prod(t.shape)) * 4 for t in list(s.inputs) + list(s.outputs))
            for s in specs.values()) / MB, 1),
    }
    # every size's I/O tensors, as the runtime allocates them for a several-size build
    by_sizes = []
    for sizes in ([(1024, 1024)], [(1024, 1024), (768, 1344)], [(1024, 1024), (768, 1344), (512, 512)]):
        per = [{s.net_name: s for s in piece_specs(replace(d, height=h, width=w))} for h, w in sizes]
        ts, _ = io_plan_sizes(per, {n: 0 for n in per[0]}, kinds_of(per[0]))
        by_sizes.append({"sizes": [f"{w}x{h}" for h, w in sizes], "count": len(ts),
                         "mb": round(sum(t.nbytes for t in ts) / MB, 1)})
    res["io_tensors_by_sizes"] = by_sizes
    print(json.dumps({k: v for k, v in res.items() if k != "io_tensors"}, indent=1))
    print(f"I/O tensors: {len(tensors)} tensors, {res['io_tensors']['mb']} MB; largest: {io_rows[:4]}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
