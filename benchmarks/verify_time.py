"""How long `fluxc verify` takes on the tiny demo build (issue 9: at most 3 min on 2 cores).

Builds (or reuses, in --work) the demo's workspace: the tiny schnell model with the tiny VAE,
exported at 64x64 / T5 32 and compiled W4BF16, as scripts/demo.sh does; then times
`fluxc verify` with its defaults (every piece on the simulator against the original model, hop
by hop, and end to end over schnell's full 4 steps against diffusers' FluxPipeline) and, as
the demo runs it, with `--steps 1`. Writes wall time, peak RSS and the load average around
each run to benchmarks/results/verify_time.json with the commit.

    .venv/bin/python benchmarks/verify_time.py --work /tmp/fluxc-verify-time
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_file import git_commit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "verify_time.json"


def fluxc(*args: str) -> list[str]:
    return [sys.executable, "-m", "fluxc.cli", *args]


def timed(cmd: list[str], cwd: Path) -> dict:
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return {"command": " ".join(cmd[3:]), "returncode": r.returncode, "wall_s": round(wall, 1),
            "children_max_rss_gb": round(ru.ru_maxrss * 1024 / 1e9, 3),
            "load_avg_before": [round(x, 2) for x in load0],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()], "last_line": tail[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Example: .venv/bin/python benchmarks/verify_time.py --work /tmp/fluxc-verify-time")
    ap.add_argument("--work", type=Path, required=True, help="folder for the demo workspace (reused when present)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, models = work / "tiny-schnell", work / "models"
    steps = [
        fluxc("tiny", str(model), "--flux-type", "schnell", "--seed", "0", "--force")
        if not (model / "model_index.json").is_file() else None,
        fluxc("export", str(model), "--out", str(models / "onnx"), "--height", "64", "--width", "64",
              "--t5-seq-len", "32", "--tiny-vae", str(model / "tiny_vae")),
        fluxc("compile", "--models", str(models), "--quantize", "W4BF16", "--flux-type", "schnell", "--tiny-vae"),
    ]
    for cmd in filter(None, steps):
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-2000:] + r.stderr[-2000:])
            return 1
    runs = {"default (4-step end to end)": timed(fluxc("verify", "--models", str(models)), work),
            "--steps 1 (as scripts/demo.sh)": timed(fluxc("verify", "--models", str(models), "--steps", "1"), work)}
    commit = git_commit(short=False)
    res = {"commit": commit, "size": "tiny schnell, 64x64, T5 32, W4BF16, tiny VAE (the demo build)",
           "cpus": len(os.sched_getaffinity(0)), "runs": runs}
    from fluxc.fsutil import write_json_atomic

    write_json_atomic(a.out, res)
    for k, v in runs.items():
        print(f"{k}: {v['wall_s']} s (exit {v['returncode']}), load {v['load_avg_before']} -> {v['load_avg_after']}")
    print(f"wrote {a.out}")
    return 0 if all(v["returncode"] == 0 for v in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
