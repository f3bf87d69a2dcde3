"""Several resolutions, one set of weights? model_tool --combine of one net at two shapes vs --dynamic.

Groundwork for issue 11 part 2 (several resolutions in one build). On the tiny schnell model
(1 double + 1 single block), exports the pieces at three resolutions (WIDTHxHEIGHT 64x64,
128x64, 128x128; one of them non-square), compiles the single block at each resolution
(model_transform + model_deploy W4BF16, bm1684x, same net name), then:
  - merge: `model_tool --combine` of the first two and of all three (same net name, different
    input shapes: TPU-MLIR makes them stages of one net) -> weight / device memory of the merged
    file against each single file, and whether the weight part is stored once;
  - dynamic: the largest shape compiled once with `model_deploy --dynamic` (one net for every
    size up to it);
and records each file's `model_tool --info` memory (weight, instruct, runtime, device) and the
compiler's estimate (compiler_profile_0.txt).

    .venv/bin/python benchmarks/resolution_merge.py [--keep DIR]

Figures go to benchmarks/results/resolution_merge.json (with the commit).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "resolution_merge.json"
SIZES = ((64, 64), (64, 128), (128, 128))  # (height, width)
PIECE = "schnell_single_trans_block_0"


def main() -> None:
    from fluxc.compile.parse import parse_info, parse_profile_ms
    from fluxc.export.driver import ExportOptions, run_export
    from fluxc.export.manifest import load_manifest
    from fluxc.tiny import build_tiny
    from fluxc.toolchain import run_tool

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="fluxc_resmerge_"))
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}

    def info(bmodel: Path, cwd: Path) -> dict:
        run_tool("model_tool", ["--info", bmodel.name], cwd=cwd, log=cwd / f"{bmodel.stem}.info.log")
        text = (cwd / f"{bmodel.stem}.info.log").read_text(errors="replace")
        bi = parse_info(text.replace("max:", ""))  # a dynamic net lists its inputs' maximum shapes
        return {"weight": bi.weight, "instruct": bi.instruct, "runtime": bi.runtime, "device": bi.device_mem,
                "nets": [{"name": n.name, "stages": len(n.stages)} for n in bi.nets]}

    def compile_one(wd: Path, exp: Path, spec, shapes: str, extra: list[str]) -> None:
        # in place: the piece's weights are external data next to it (onnx/weights/)
        run_tool("model_transform", ["--model_name", PIECE, "--model_def", str((exp / spec.file).resolve()),
                                     "--input_shapes", shapes, "--mlir", "b.mlir"], cwd=wd, log=wd / "transform.log")
        run_tool("model_deploy", ["--mlir", "b.mlir", "--quantize", "W4BF16", "--q_group_size", "64",
                                  "--chip", "bm1684x", *extra, "--model", "b.bmodel"], cwd=wd, log=wd / "deploy.log")

    try:
        model = work / "model"
        if not (a.keep and (model / "model_index.json").is_file()):  # --keep DIR: a rerun resumes
            model = build_tiny(model, flux_type="schnell", seed=0, force=True,
                               transformer={"num_layers": 1, "num_single_layers": 1}, clip={"num_hidden_layers": 1},
                               t5={"num_layers": 1})
        bmodels = []
        for h, w in SIZES:
            exp = work / f"onnx_{h}x{w}"
            run_export(ExportOptions(model=str(model), out=exp, height=h, width=w, t5_len=16), show_progress=False)
            spec = load_manifest(exp).spec(PIECE)
            shapes = "[" + ",".join("[" + ",".join(map(str, t.shape)) + "]" for t in spec.inputs) + "]"
            modes = [("static", [])] + ([("dynamic", ["--dynamic"])] if (h, w) == SIZES[-1] else [])
            for mode, extra in modes:
                wd = work / f"{mode}_{h}x{w}"
                wd.mkdir(exist_ok=True)
                if (wd / "b.bmodel").is_file() and (wd / "compiler_profile_0.txt").is_file():
                    pass  # compiled by an earlier run with --keep
                else:
                    compile_one(wd, exp, spec, shapes, extra)
                r = info(wd / "b.bmodel", wd)
                r.update(size=f"{w}x{h}", mode=mode, shapes=shapes,
                         estimate_ms=parse_profile_ms(wd / "compiler_profile_0.txt"),
                         file_bytes=(wd / "b.bmodel").stat().st_size)
                rows[f"{mode} {w}x{h}"] = r
                print(json.dumps(r), flush=True)
                if mode == "static":
                    bmodels.append(wd / "b.bmodel")
        # model_tool --info of a merged net reports its stage 0's runtime area: merged smallest
        # first, that understates what the net needs; largest first (what fluxc compile does) it
        # is the largest stage's.
        for k, order in ((2, "given"), (3, "given"), (2, "largest first"), (3, "largest first")):
            files = bmodels[:k] if order == "given" else list(reversed(bmodels[:k]))
            md = work / f"merged{k}" if order == "given" else work / f"merged{k}_largest_first"
            md.mkdir(exist_ok=True)
            run_tool("model_tool", ["--combine", *[str(b) for b in files], "-o", "merged.bmodel"], cwd=md,
                     log=md / "combine.log")
            r = info(md / "merged.bmodel", md)
            sizes = SIZES[:k] if order == "given" else list(reversed(SIZES[:k]))
            r.update(size=" + ".join(f"{w}x{h}" for h, w in sizes), mode=f"merged (model_tool --combine), {order}",
                     file_bytes=(md / "merged.bmodel").stat().st_size)
            rows[f"merged {k}" + ("" if order == "given" else ", largest first")] = r
            print(json.dumps(r), flush=True)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "resolution_merge", "commit": commit, "piece": PIECE,
                                   "model": "tiny schnell (dim 128), W4BF16, bm1684x", "rows": rows}, indent=2) + "\n")
    print("\n| file | nets (stages) | weight | instruct | runtime | device memory | estimate |")
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        est = f"{r['estimate_ms']:.3f} ms" if r.get("estimate_ms") else "-"
        print(f"| {k} | {', '.join(n['name'] + ' (' + str(n['stages']) + ')' for n in r['nets'])} "
              f"| {r['weight'] / 1024:.1f} KiB | {r['instruct'] / 1024:.1f} KiB | {r['runtime'] / 1024:.1f} KiB "
              f"| {r['device'] / 1024:.1f} KiB | {est} |")


if __name__ == "__main__":
    main()
