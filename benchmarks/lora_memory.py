"""Peak memory of `fluxc export` with and without a LoRA (fluxc/export/lora.py).

Builds (or reuses) the "small" real-width random checkpoint of benchmarks/export_memory.py
(transformer 3072 wide, T5 4096 / 10240, CLIP 768, 1 block of each kind, bf16), writes random
LoRAs in diffusers' format for it (bf16, every Linear of every transformer block plus CLIP's
q/k/v/out projections, at a typical and at a large rank), then runs `fluxc export` on it in a
subprocess without and with each LoRA and reads the subprocess's peak RSS from the kernel
(os.wait4 rusage). The goal (issue 11): with a LoRA, the peak stays within 10% of the peak
without.

    .venv/bin/python benchmarks/lora_memory.py [--work DIR] [--keep] [--ranks 16,128]

Figures go to benchmarks/results/lora_memory.json (with the commit).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_memory import CASES, EXPORT_ARGS, build, folder_bytes  # noqa: E402
from results_file import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lora_memory.json"


def make_lora(ckpt: Path, out: Path, rank: int) -> tuple[Path, int]:
    """A random bf16 LoRA (diffusers keys) on every Linear of the transformer blocks and CLIP's
    attention projections. Returns (file, number of adapted layers)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from fluxc.export.checkpoint import Checkpoint
    from fluxc.export.source import resolve

    ck = Checkpoint(resolve(str(ckpt)), None)
    sd = {}
    g = torch.Generator().manual_seed(rank)
    picks = [("transformer", lambda n: n.startswith(("transformer_blocks.", "single_transformer_blocks."))),
             ("text_encoder", lambda n: n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")))]
    for comp, want in picks:
        for name, mod in ck.model(comp).named_modules():
            if isinstance(mod, nn.Linear) and want(name):
                o, i = mod.weight.shape
                sd[f"{comp}.{name}.lora_A.weight"] = (torch.randn(rank, i, generator=g) / i ** 0.5).to(torch.bfloat16)
                sd[f"{comp}.{name}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.01).to(torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out))
    return out, len(sd) // 2


def export_peak(ckpt: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fluxc.cli", "export", str(ckpt), "--out", str(out), *EXPORT_ARGS, *extra]
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    log = p.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fluxc export failed:\n{log}")
    m = json.loads((out / "manifest.json").read_text())
    return {"peak_rss_bytes": ru.ru_maxrss * 1024, "wall_s": round(time.time() - t, 1),
            "lora": m["options"].get("lora")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fluxc-export-memory"))
    ap.add_argument("--keep", action="store_true", help="keep checkpoint, LoRAs and exports")
    ap.add_argument("--ranks", default="16,128", help="LoRA ranks to measure (comma separated)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = build(a.work, "small", CASES["small"])
    rows = []
    base = export_peak(ckpt, a.work / "onnx_plain", [])
    rows.append({"case": "no LoRA", "rank": 0, "lora_bytes": 0, "layers": 0, **base})
    print(json.dumps(rows[-1]), flush=True)
    for rank in [int(r) for r in a.ranks.split(",") if r]:
        f, layers = make_lora(ckpt, a.work / f"lora_r{rank}.safetensors", rank)
        r = export_peak(ckpt, a.work / f"onnx_r{rank}", ["--lora", f"{f}:0.8"])
        rows.append({"case": f"LoRA rank {rank}", "rank": rank, "lora_bytes": f.stat().st_size, "layers": layers, **r})
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["peak_vs_no_lora"] = round(r["peak_rss_bytes"] / base["peak_rss_bytes"], 4)
    write_results(RESULTS, {"checkpoint": "small real-width (export_memory.py)", "checkpoint_bytes": folder_bytes(ckpt),
                            "export_args": EXPORT_ARGS, "rows": rows})
    print("\n| case | LoRA file (bf16) | adapted layers | export wall | peak RSS | vs no LoRA |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['lora_bytes'] / 1e6:.0f} MB | {r['layers']} | {r['wall_s']:.0f} s "
              f"| {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_vs_no_lora']:.3f} |")
    worst = max(r["peak_vs_no_lora"] for r in rows)
    print(f"\nworst peak ratio {worst:.3f} (target <= 1.10: {'yes' if worst <= 1.10 else 'NO'}) -> {RESULTS}")
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
