"""Compile speed: fluxc compile vs the reference's way, on the same tiny export, in one run.

  fluxc (cold):  `fluxc compile` into an empty build cache: pieces in parallel (--jobs
                 default), every piece checked on the chip simulator, combined files.
  fluxc (rerun): the same command again, nothing changed (cache hits only).
  fluxc --no-check (cold): like the reference, no simulator check, into another empty cache
                 (pieces still in parallel, plus model_tool --info of each piece).
  reference:     the sophon-demo gen_bmodel.sh way: each piece in turn, model_transform
                 then model_deploy, no test inputs (no check), then model_tool --combine.

Usage:
  .venv/bin/python benchmarks/compile_speed.py [--export DIR] [--quantize W4BF16] [--json out.json]
Without --export it builds the tiny schnell model (tiny VAE) and exports it at 128x128,
T5 length 32 (the test suite's sizes). Needs the toolchain (`fluxc toolchain install`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_export(root: Path) -> Path:
    from fluxc.export.driver import ExportOptions, run_export
    from fluxc.tiny import build_tiny

    model = build_tiny(root / "tiny_schnell", "schnell", 0)
    out = root / "onnx"
    run_export(ExportOptions(model=str(model), out=out, height=128, width=128, t5_len=32,
                             tiny_vae=str(model / "tiny_vae")), show_progress=False)
    return out


def fluxc_compile(export: Path, out: Path, build: Path, quantize: str, extra: list[str]) -> tuple[float, dict]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fluxc.cli", "compile", str(export), "--quantize", quantize,
                        "--out", str(out), "--build-dir", str(build), *extra], cwd=REPO,
                       capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"fluxc compile failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return dt, json.loads((out / "compile_report.json").read_text())


def reference_way(export: Path, work: Path, quantize: str) -> tuple[float, int]:
    """Each piece in turn: transform then deploy (no checks), then combine per family."""
    from fluxc.compile.recipe import load_recipe, piece_plan, transform_args
    from fluxc.compile.pipeline import output_files
    from fluxc.export.manifest import load_manifest
    from fluxc.toolchain import run_tool

    m = load_manifest(export)
    recipe = load_recipe()
    t0 = time.monotonic()
    runs = 0
    fam: dict[str, list[Path]] = {}
    for s in m.specs:
        plan = piece_plan(recipe, s, quantize)
        d = work / s.name
        d.mkdir(parents=True)
        run_tool("model_transform", ["--model_name", s.net_name, "--model_def", str(m.path(s.name).resolve()),
                                     *transform_args(s, plan, folded=False), "--mlir", f"{s.net_name}.mlir"], d, d / "t.log")
        args = ["--mlir", f"{s.net_name}.mlir", "--quantize", plan.quantize, "--chip", "bm1684x",
                "--model", f"{s.name}.bmodel"]
        if plan.quantize.startswith("W4"):
            args += ["--q_group_size", str(plan.options.get("q_group_size", 64))]
        run_tool("model_deploy", args, d, d / "d.log")
        runs += 2
        fam.setdefault(s.family, []).append(d / f"{s.name}.bmodel")
    names = output_files(m.dims.flux_type, quantize, 1, m.dims.tiny_vae)
    for f, files in fam.items():
        name = names[f].format(i=0)
        if len(files) > 1:
            run_tool("model_tool", ["--combine", *map(str, files), "-o", name], work, work / f"{f}.log")
            runs += 1
    return time.monotonic() - t0, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path)
    ap.add_argument("--quantize", default="W4BF16")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from fluxc.toolchain import require_toolchain

    require_toolchain()
    with tempfile.TemporaryDirectory(prefix="fluxc-compile-bench-") as tmp:
        tmp = Path(tmp)
        export = a.export or tiny_export(tmp)
        cold, rep = fluxc_compile(export, tmp / "out", tmp / "build", a.quantize, [])
        rerun, rep2 = fluxc_compile(export, tmp / "out", tmp / "build", a.quantize, [])
        nocheck, rep3 = fluxc_compile(export, tmp / "out2", tmp / "build2", a.quantize, ["--no-check"])
        ref, ref_runs = reference_way(export, tmp / "ref", a.quantize)
    res = {
        "pieces": len(rep["pieces"]), "quantize": a.quantize, "cores": os.cpu_count(),
        "fluxc_cold_s": round(cold, 1), "fluxc_jobs": rep["jobs"], "fluxc_tool_runs": rep["tool_runs"],
        "fluxc_checked": rep["check"],
        "fluxc_rerun_s": round(rerun, 2), "fluxc_rerun_tool_runs": rep2["tool_runs"],
        "fluxc_nocheck_cold_s": round(nocheck, 1), "fluxc_nocheck_tool_runs": rep3["tool_runs"],
        "reference_s": round(ref, 1), "reference_tool_runs": ref_runs,
        "reference_over_fluxc_cold": round(ref / cold, 2),
        "reference_over_fluxc_nocheck_cold": round(ref / nocheck, 2),
        "reference_over_fluxc_rerun": round(ref / rerun, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
