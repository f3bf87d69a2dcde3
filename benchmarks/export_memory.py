"""Peak memory of `fluxc export` vs the number of blocks.

Builds two random-weight FLUX.1 checkpoints with the real hidden sizes (transformer 24 heads
x 128 = 3072 wide, joint_attention_dim 4096, pooled 768; T5 d_model 4096 / d_ff 10240 /
64 heads; CLIP 768 wide) but different block counts, saved in bf16 like the real weights,
then runs `fluxc export` on each in a subprocess at a small resolution and reads the
subprocess's peak RSS (os.wait4 rusage, the kernel's own high-water mark).

Block-by-block loading means the peak should be the same for both (within 10%) and well
under the checkpoint size.

    .venv/bin/python benchmarks/export_memory.py [--work DIR] [--keep]
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

REAL_SIZES = {
    "transformer": {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 4096,
                    "pooled_projection_dim": 768},
    "t5": {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "d_kv": 64},
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
}
CASES = {  # name -> (double, single, t5 layers, clip layers)
    "small": (1, 1, 1, 1),
    "large": (3, 3, 6, 2),
}
EXPORT_ARGS = ["--height", "256", "--width", "256", "--t5-seq-len", "64"]


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def build(work: Path, name: str, counts: tuple[int, int, int, int]) -> Path:
    from fluxc.tiny import build_tiny

    out = work / f"ckpt_{name}"
    if (out / "model_index.json").is_file():
        return out
    d, s, t5, clip = counts
    ov = {k: dict(v) for k, v in REAL_SIZES.items()}
    ov["transformer"].update(num_layers=d, num_single_layers=s)
    ov["t5"]["num_layers"] = t5
    ov["clip"]["num_hidden_layers"] = clip
    t = time.time()
    build_tiny(out, "schnell", 0, force=True, dtype="bfloat16", **ov)
    print(f"built {name}: {folder_bytes(out) / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)
    return out


def measure(ckpt: Path, out: Path) -> dict:
    fluxc = Path(sys.executable).with_name("fluxc")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(fluxc), "export", str(ckpt), "--out", str(out), *EXPORT_ARGS]
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t
    log = p.stdout.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"fluxc export failed ({p.returncode}):\n{log}")
    m = json.loads((out / "manifest.json").read_text())
    biggest = max((out / e["file"]).stat().st_size for e in m["pieces"])
    return {"peak_rss_bytes": ru.ru_maxrss * 1024, "wall_s": wall, "pieces": len(m["pieces"]),
            "onnx_bytes": folder_bytes(out), "largest_piece_bytes": biggest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fluxc-export-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, counts in CASES.items():
        ckpt = build(a.work, name, counts)
        r = measure(ckpt, a.work / f"onnx_{name}")
        r.update(case=name, double=counts[0], single=counts[1], t5=counts[2], clip=counts[3],
                 ckpt_bytes=folder_bytes(ckpt))
        rows.append(r)
        print(json.dumps(r), flush=True)
    print()
    print("| case | double+single | T5 / CLIP layers | checkpoint (bf16) | pieces | largest piece (fp32 ONNX) "
          "| export wall | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['double']}+{r['single']} | {r['t5']} / {r['clip']} | {r['ckpt_bytes'] / 1e9:.2f} GB "
              f"| {r['pieces']} | {r['largest_piece_bytes'] / 1e9:.2f} GB | {r['wall_s']:.0f} s "
              f"| {r['peak_rss_bytes'] / 1e9:.2f} GB |")
    lo, hi = rows[0]["peak_rss_bytes"], rows[-1]["peak_rss_bytes"]
    print(f"\npeak RSS ratio large/small: {hi / lo:.3f} (target within 10%: {'yes' if abs(hi / lo - 1) <= 0.10 else 'NO'})")
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
