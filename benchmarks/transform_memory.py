"""Peak memory of model_transform on full-size pieces, two ways, on the same exported ONNX:

- "own": model_transform with its own simplification (what fluxc ran before issue 18 item 3:
  OnnxConverter.model_simplify runs the whole piece in ONNX Runtime on copies of the model);
- "folded": fluxc.compile.fold (fold_script.py in the toolchain's Python, node by node, weights
  held out of onnx-simplifier's passes) then model_transform with `--do_onnx_sim ""`, as
  `fluxc compile` now does.

For each piece: wall time and peak RSS of each way's whole process tree (psutil, sampled every
0.25 s), and whether the two top MLIR files are byte-identical and the two weight npz files hold
the same tensors bit for bit (the rebind check's criterion, here on the full-size piece).

    .venv/bin/python benchmarks/transform_memory.py /work/fs/exp --work /work/fs/tm \
        --pieces dev_trans_block_0 dev_single_trans_block_0 t5_block_0
    .venv/bin/python benchmarks/transform_memory.py --render

The export is `fluxc export CHECKPOINT --height 1024 --width 1024 --t5-seq-len 512` of a full-size
checkpoint (`fluxc tiny --preset full`: random weights at the published sizes, bf16).
Results: benchmarks/results/transform_memory.json (rewritten after every piece).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from results_file import write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "transform_memory.json"
sys.path.insert(0, str(REPO))


def tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def measured(argv: list[str], cwd: Path, log: Path, env: dict) -> dict:
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    p = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(p))
            time.sleep(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    done.set()
    th.join()
    if rc:
        raise SystemExit(f"{argv[0]} failed ({rc}); see {log}")
    return {"wall_s": round(time.monotonic() - t0, 1), "peak_rss_gb": round(peak[0] / 1e9, 3)}


def run_piece(export: Path, name: str, work: Path, ways: list[str]) -> dict:
    from fluxc.compile.fold import SCRIPT
    from fluxc.compile.recipe import load_recipe, piece_plan, transform_args
    from fluxc.export.manifest import load_manifest
    from fluxc.toolchain import require_toolchain, toolchain_env

    venv = require_toolchain()
    env = toolchain_env()
    m = load_manifest(export)
    spec = m.spec(name)
    onnx = m.path(name).resolve()
    plan = piece_plan(load_recipe(None, "bm1684x"), spec, "W4BF16")
    out: dict = {"piece": name, "onnx": str(onnx)}
    for way in ways:
        wd = work / name / way
        done = wd / "figures.json"
        if done.is_file():
            out[way] = json.loads(done.read_text())
            continue
        wd.mkdir(parents=True, exist_ok=True)
        fig: dict = {}
        src = str(onnx)
        if way == "folded":
            fig["fold"] = measured([str(venv / "bin" / "python"), str(SCRIPT), str(onnx), "folded.onnx"], wd,
                                   wd / "fold.log", env)
            src = "folded.onnx"
        print(f"{name}: {way} model_transform ...", flush=True)
        fig["transform"] = measured([str(venv / "bin" / "model_transform"), "--model_name", spec.net_name,
                                     "--model_def", src, *transform_args(spec, plan, folded=way == "folded"),
                                     "--mlir", f"{spec.net_name}.mlir"], wd, wd / "transform.log", env)
        fig["peak_rss_gb"] = max(v["peak_rss_gb"] for v in fig.values() if isinstance(v, dict))
        fig["wall_s"] = round(sum(v["wall_s"] for v in fig.values() if isinstance(v, dict)), 1)
        for p in wd.glob("*.onnx*"):
            p.unlink()
        for p in wd.glob(f"{spec.net_name}_opt.onnx*"):
            p.unlink()
        done.write_text(json.dumps(fig) + "\n")
        out[way] = fig
        print(f"{name}: {way}: {fig['wall_s']} s, peak RSS {fig['peak_rss_gb']} GB", flush=True)
    if all(w in out for w in ("own", "folded")):
        a, b = work / name / "own", work / name / "folded"
        net = spec.net_name
        same_mlir = (a / f"{net}.mlir").read_bytes() == (b / f"{net}.mlir").read_bytes()
        wa, wb = np.load(a / f"{net}_top_f32_all_weight.npz"), np.load(b / f"{net}_top_f32_all_weight.npz")
        same_w = sorted(wa.files) == sorted(wb.files) and all(
            wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]) for k in wa.files)
        out["mlir_identical"], out["weights_identical"] = same_mlir, same_w
        out["weight_tensors"] = len(wa.files)
    return out


def render(doc: dict) -> str:
    rows = ["| piece | own: wall / peak RSS | folded: wall / peak RSS | top MLIR identical | weights identical |",
            "|---|---|---|---|---|"]
    for r in doc["pieces"].values():
        cell = lambda w: f"{r[w]['wall_s']:.0f} s / {r[w]['peak_rss_gb']:.1f} GB" if w in r else "-"  # noqa: E731
        rows.append(f"| {r['piece']} | {cell('own')} | {cell('folded')} | {r.get('mlir_identical', '-')} | "
                    f"{r.get('weights_identical', '-')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, nargs="?")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--pieces", nargs="+", default=["dev_trans_block_0"])
    ap.add_argument("--ways", nargs="+", default=["folded", "own"], choices=["folded", "own"])
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    if a.render:
        print(render(json.loads(RESULTS.read_text())))
        return
    if a.export is None or a.work is None:
        ap.error("EXPORT and --work are required")
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    doc = {"size": "full size: 1024x1024, T5 512 (4608 transformer tokens), random weights at the published "
                   "sizes (bf16)", "pieces": doc.get("pieces", {})}
    for name in a.pieces:
        doc["pieces"][name] = run_piece(a.export.resolve(), name, a.work.resolve(), a.ways)
        write_results(RESULTS, doc)
    print(render(doc))


if __name__ == "__main__":
    main()
