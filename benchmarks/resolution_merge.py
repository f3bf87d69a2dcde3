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
    .venv/bin/python benchmarks/resolution_merge.py --full-width [--keep DIR]

Figures go to benchmarks/results/resolution_merge.json (with the commit).

--full-width: the same at the published width instead: one FLUX single block of
FLUX.1's size (dim 3072, 24 heads x 128; random weights, seed 0), wrapped as fluxc's
export wraps it (fluxc.export.pieces.SingleBlock under fluxc's patches), T5 length 512, at
1024x1024, 1344x768 (width x height, non-square) and 512x512; each exported (TorchScript,
opset 17), compiled W4BF16 (group 64, as fluxc compiles blocks) and merged largest first
(1, 2, 3 sizes). No --dynamic row (its transform at this width is the same cost and it has no
estimate). About 8.5 GB RAM and 1.8 GB disk at a time; ~20-40 min on 2 cores.
Figures go to benchmarks/results/resolution_merge_fullwidth.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import results_file

RESULTS = Path(__file__).resolve().parent / "results" / "resolution_merge.json"
RESULTS_FULL_WIDTH = RESULTS.with_name("resolution_merge_fullwidth.json")
SIZES = ((64, 64), (64, 128), (128, 128))  # (height, width)
FULL_WIDTH_SIZES = ((1024, 1024), (768, 1344), (512, 512))  # (height, width), largest first
FULL_WIDTH_T5 = 512
PIECE = "schnell_single_trans_block_0"


def bmodel_info(bmodel: Path, cwd: Path) -> dict:
    """model_tool --info of one bmodel: memory parts and nets (with their stage counts)."""
    from fluxc.compile.parse import parse_info
    from fluxc.toolchain import run_tool

    run_tool("model_tool", ["--info", bmodel.name], cwd=cwd, log=cwd / f"{bmodel.stem}.info.log")
    text = (cwd / f"{bmodel.stem}.info.log").read_text(errors="replace")
    bi = parse_info(text.replace("max:", ""))  # a dynamic net lists its inputs' maximum shapes
    return {"weight": bi.weight, "instruct": bi.instruct, "runtime": bi.runtime, "device": bi.device_mem,
            "nets": [{"name": n.name, "stages": len(n.stages)} for n in bi.nets]}


def compile_w4(wd: Path, onnx_file: Path, shapes: str, extra: list[str]) -> None:
    """model_transform + model_deploy W4BF16 (group 64, bm1684x) of one ONNX file into wd/b.bmodel."""
    from fluxc.toolchain import run_tool

    run_tool("model_transform", ["--model_name", PIECE, "--model_def", str(onnx_file.resolve()),
                                 "--input_shapes", shapes, "--mlir", "b.mlir"], cwd=wd, log=wd / "transform.log")
    run_tool("model_deploy", ["--mlir", "b.mlir", "--quantize", "W4BF16", "--q_group_size", "64",
                              "--chip", "bm1684x", *extra, "--model", "b.bmodel"], cwd=wd, log=wd / "deploy.log")


def combine(files: list[Path], md: Path) -> dict:
    """model_tool --combine of files (in that order) into md/merged.bmodel; its info."""
    from fluxc.toolchain import run_tool

    md.mkdir(exist_ok=True)
    run_tool("model_tool", ["--combine", *[str(b) for b in files], "-o", "merged.bmodel"], cwd=md,
             log=md / "combine.log")
    r = bmodel_info(md / "merged.bmodel", md)
    r["file_bytes"] = (md / "merged.bmodel").stat().st_size
    return r


def write_results(path: Path, rows: dict, **head) -> None:
    results_file.write_results(path, {**head, "rows": rows})
    print("\n| file | nets (stages) | weight | instruct | runtime | device memory | estimate |")
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        est = f"{r['estimate_ms']:.3f} ms" if r.get("estimate_ms") else "-"
        print(f"| {k} | {', '.join(n['name'] + ' (' + str(n['stages']) + ')' for n in r['nets'])} "
              f"| {r['weight'] / 1024:.1f} KiB | {r['instruct'] / 1024:.1f} KiB | {r['runtime'] / 1024:.1f} KiB "
              f"| {r['device'] / 1024:.1f} KiB | {est} |")


def full_width(work: Path) -> None:
    """--full-width: one FLUX.1-size single block at three sizes, compiled and merged."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    from fluxc.compile.parse import parse_profile_ms
    from fluxc.export.pieces import SingleBlock
    from fluxc.patches import Patcher, rotary_table

    torch.manual_seed(0)
    blk = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).eval()
    rows: dict[str, dict] = {}
    bmodels = []
    for h, w in FULL_WIDTH_SIZES:
        J = FULL_WIDTH_T5 + (h // 16) * (w // 16)
        wd = work / f"static_{w}x{h}"
        wd.mkdir(parents=True, exist_ok=True)
        shapes = f"[[1,{J},3072],[1,3072],[1,{J},1,64,2,2]]"
        if not ((wd / "b.bmodel").is_file() and (wd / "compiler_profile_0.txt").is_file()):
            table = torch.from_numpy(rotary_table(FULL_WIDTH_T5, h, w, axes_dims=(16, 56, 56)))
            with Patcher() as p, torch.no_grad():
                p.apply(blk)
                torch.onnx.export(SingleBlock(blk), (torch.randn(1, J, 3072), torch.randn(1, 3072), table),
                                  str(wd / "b.onnx"), input_names=["hidden_states", "temb", "rotary_emb"],
                                  opset_version=17, dynamo=False)
            compile_w4(wd, wd / "b.onnx", shapes, [])
            for f in wd.glob("*.onnx"):
                f.unlink()  # 566 MB each; the bmodel is what is measured
            for f in wd.glob("*.npz"):
                f.unlink()
        r = bmodel_info(wd / "b.bmodel", wd)
        r.update(size=f"{w}x{h}", mode="static", tokens=J, shapes=shapes,
                 estimate_ms=parse_profile_ms(wd / "compiler_profile_0.txt"),
                 file_bytes=(wd / "b.bmodel").stat().st_size)
        rows[f"static {w}x{h}"] = r
        bmodels.append(wd / "b.bmodel")
        print(json.dumps(r), flush=True)
        write_results(RESULTS_FULL_WIDTH, rows, piece="one single block, dim 3072 (FLUX.1 width), T5 512",
                      model="random weights (seed 0), W4BF16 group 64, bm1684x")
    for k in (2, 3):
        r = combine(bmodels[:k], work / f"merged{k}")
        r.update(size=" + ".join(f"{w}x{h}" for h, w in FULL_WIDTH_SIZES[:k]),
                 mode="merged (model_tool --combine), largest first")
        rows[f"merged {k}"] = r
        print(json.dumps(r), flush=True)
    write_results(RESULTS_FULL_WIDTH, rows, piece="one single block, dim 3072 (FLUX.1 width), T5 512",
                  model="random weights (seed 0), W4BF16 group 64, bm1684x")


def main() -> None:
    from fluxc.compile.parse import parse_profile_ms
    from fluxc.export.driver import ExportOptions, run_export
    from fluxc.export.manifest import load_manifest
    from fluxc.tiny import build_tiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="work folder kept (and resumed from) instead of a temp one")
    ap.add_argument("--full-width", action="store_true", help="one FLUX.1-width single block at 3 sizes")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="fluxc_resmerge_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.full_width:
        try:
            return full_width(work)
        finally:
            if a.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    rows: dict[str, dict] = {}
    info = bmodel_info

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
                    # in place: the piece's weights are external data next to it (onnx/weights/)
                    compile_w4(wd, exp / spec.file, shapes, extra)
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
            r = combine(files, md)
            sizes = SIZES[:k] if order == "given" else list(reversed(SIZES[:k]))
            r.update(size=" + ".join(f"{w}x{h}" for h, w in sizes), mode=f"merged (model_tool --combine), {order}")
            rows[f"merged {k}" + ("" if order == "given" else ", largest first")] = r
            print(json.dumps(r), flush=True)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    write_results(RESULTS, rows, piece=PIECE, model="tiny schnell (dim 128), W4BF16, bm1684x")

if __name__ == "__main__":
    main()
