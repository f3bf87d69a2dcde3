"""Where one full-width FLUX block's estimated time goes: TPU-MLIR's cost model, broken down.

    .venv/bin/python benchmarks/block_breakdown.py [--blocks single,double] [--size 1024] [--t5-len 512]
        [--quantize BF16,W4BF16] [--forms fattention,prescaled] [--work DIR] [--name block_breakdown]
    Example: .venv/bin/python benchmarks/block_breakdown.py --blocks single --forms fattention,prescaled \\
        --work /tmp/bb --name block_breakdown_single

Builds one full-width block (full_width_block.py: dim 3072, 24 heads x 128, random weights,
torch seed 0) at the given image size and T5 length, patched as fluxc exports it, in each
attention form of patches/flux_attention.py (fattention: the scale after the MatMul, the chain
TPU-MLIR fuses into FAttention; prescaled: the scale folded into the q norm, the form before;
slices: prescaled with the reference's strided-slice rotary, as graph_forms.py's "slices"),
exports it (TorchScript, opset 17), runs model_transform once per form and model_deploy per
quantisation (bm1684x), and reads each deploy's compiler_profile_0.txt with
fluxc.compile.profile_breakdown: estimate, TIU/GDMA busy shares, DMA not hidden by compute,
shares by op type and the top layers; and whether the deploy log reports the fused attention.
Writes benchmarks/results/<name>.json.

Memory and time on 2 cores: a single block at 4608 tokens peaks at ~8.3 GB in model_transform
(~2.5 min), a double block at 14-17.6 GB (~10 min); run one at a time. The work folder keeps
the logs, MLIR, profiles and the transform's weights (the ONNX and bmodels are deleted after
use; --clean deletes the weights too); a re-run reuses a finished transform or deploy found there.

measure() also serves benchmarks/kontext_full_size.py: a FLUX.1 Kontext reference (ref_size), a
block traced at a few tokens and made static at the full shapes (trace_hidden: for token counts
whose attention scores would not fit in memory during export), or another piece (export).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

from full_width_block import DYNAMIC_AXES, block_tokens, full_width_block
from results_file import git_commit, write_results

from fluxc.compile.parse import parse_info, parse_profile_ms
from fluxc.compile.profile_breakdown import breakdown, table
from fluxc.toolchain import run_tool
from fluxc.errors import ToolError

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1 << 20
# a form that is not an attention form of patches/flux_attention.py: (attention, rotary) of the processor
PROCESSOR_FORMS = {"slices": ("prescaled", "slices")}  # the reference's (sophon-demo's) strided-slice rotary
FATTENTION = re.compile(r"fattention.*success", re.IGNORECASE)


def export_block(block: str, form: str, size: int, t5_len: int, wd: Path, ref_size: int = 0,
                 trace_hidden: int | None = None) -> str:
    """The block's ONNX in wd/b.onnx; returns model_transform's --input_shapes (full shapes).
    With trace_hidden: traced at that many hidden tokens with the hidden-token axis dynamic
    (full_width_block.DYNAMIC_AXES), checked against torch at a second token count (an ONNX
    with a token count baked in fails there), then made static at the full shapes by
    static_onnx()."""
    import torch

    from fluxc.export.pieces import DoubleBlock, SingleBlock
    from fluxc.patches import Patcher

    blk, args, names, shapes = full_width_block(block, size, t5_len, ref_size, trace_hidden)
    dyn = DYNAMIC_AXES[block] if trace_hidden else None
    with Patcher() as p:
        p.apply(blk)
        blk.attn.processor.attention, blk.attn.processor.rotary = PROCESSOR_FORMS.get(form, (form, "matmul"))
        m = SingleBlock(blk) if block == "single" else DoubleBlock(blk)
        with torch.no_grad():
            torch.onnx.export(m, args, str(wd / "b.onnx"), input_names=names, opset_version=17, dynamo=False,
                              dynamic_axes=dyn)
            if trace_hidden:
                check_dynamic(m, block, size, t5_len, ref_size, trace_hidden, wd)
    del blk, m
    if trace_hidden:
        static_onnx(wd, names, shapes)
    return shapes


def check_dynamic(m, block: str, size: int, t5_len: int, ref_size: int, trace_hidden: int, wd: Path) -> None:
    """The dynamic ONNX against the torch block at trace_hidden + 64 hidden tokens (onnxruntime,
    float32); the result in wd/dynamic_check.json; raises if they differ."""
    import numpy as np
    import onnxruntime as ort

    _, args, names, _ = full_width_block(block, size, t5_len, ref_size, trace_hidden + 64)
    want = m(*args)
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    sess = ort.InferenceSession(str(wd / "b.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(w).max()) for w in want)
    rec = {"trace_hidden": trace_hidden, "checked_hidden": trace_hidden + 64, "max_abs_err": err,
           "max_abs_ref": scale, "shapes": [list(g.shape) for g in got]}
    (wd / "dynamic_check.json").write_text(json.dumps(rec) + "\n")
    del sess
    if not err <= 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"dynamic-axes ONNX differs from torch at another token count: {rec}")


STATIC_SCRIPT = """
import json, sys
import onnx, onnxsim
src, dst, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m, ok = onnxsim.simplify(onnx.load(src), overwrite_input_shapes=shapes, check_n=0)
assert ok, "onnxsim could not validate the simplified model"
dyn = [i.name for i in m.graph.input if any(d.dim_param or not d.dim_value for d in i.type.tensor_type.shape.dim)]
assert not dyn, f"inputs still dynamic: {dyn}"
left = sorted({n.op_type for n in m.graph.node if n.op_type in ("Shape", "ConstantOfShape")})
assert not left, f"shape ops left: {left}"
onnx.save(m, dst)
print("static:", {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input})
"""


def static_onnx(wd: Path, names: list[str], shapes: str) -> None:
    """wd/b.onnx (dynamic hidden-token axis) -> wd/b_static.onnx at the full shapes, simplified
    by onnx-simplifier in the toolchain's Python (node-by-node constant folding: no run of the
    whole graph). model_transform's own simplification runs the whole graph in onnxruntime on
    random inputs (tpu_mlir OnnxOpt.ConstantFolding), which at 8704 tokens holds the
    24 x 8704 x 8704 fp32 attention scores; the static ONNX lets it skip that (--do_onnx_sim "")."""
    import subprocess

    from fluxc.toolchain import toolchain_env, toolchain_python

    full = {n: s for n, s in zip(names, json.loads(shapes))}
    with open(wd / "static.log", "w") as log:
        r = subprocess.run([str(toolchain_python()), "-c", STATIC_SCRIPT, "b.onnx", "b_static.onnx", json.dumps(full)],
                           cwd=wd, env=toolchain_env(), stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"onnxsim to static shapes failed (exit {r.returncode}); see {wd / 'static.log'}")


def mlir_input_shapes(mlir: Path) -> list[str]:
    """The tensor types of the transformed MLIR's main function inputs (to confirm the full shapes)."""
    for line in mlir.read_text(errors="replace").splitlines():
        if "func.func @main(" in line:
            return [t.rstrip("x") for t in re.findall(r"tensor<([0-9x]+)f32>", line.split("->")[0])]
    return []


def measure(block: str, form: str, quantizes: list[str], size: int, t5_len: int, work: Path,
            clean: bool = False, ref_size: int = 0, trace_hidden: int | None = None, export=None) -> dict:
    """Transform once, deploy per quantisation, read the profiles (module docstring).
    ref_size: a FLUX.1 Kontext reference image (square, pixels) whose tokens follow the image's;
    trace_hidden: export traced at that many hidden tokens with a dynamic token axis, made
    static at the full shapes before model_transform (export_block).
    export: another piece instead of a block (`block` then names it, `form` is a label):
    export(wd) writes the ONNX into wd and returns (its file name, --input_shapes)."""
    tag = (f"_ref{ref_size}" if ref_size else "") + ("_traced" if trace_hidden else "")
    wd = work / f"{block}_{form}_{size}_{t5_len}{tag}"
    wd.mkdir(parents=True, exist_ok=True)
    n, j = block_tokens(size, t5_len, ref_size)
    out: dict = {"block": block, "form": form, "quantize": {}}
    if export is None:
        out["tokens"] = j
    if ref_size:
        out.update({"ref_size": ref_size, "hidden_tokens": n})
    pending = [q for q in quantizes if not (wd / f"profile_{q}.txt").is_file()]
    if pending and not (wd / "transform.done").is_file():
        t0 = time.time()
        if export is not None:
            src, shapes = export(wd)
            extra = []
        else:
            shapes = export_block(block, form, size, t5_len, wd, ref_size, trace_hidden)
            src, extra = ("b_static.onnx", ["--do_onnx_sim", ""]) if trace_hidden else ("b.onnx", [])
        print(f"{block} {form}: exported in {time.time() - t0:.0f} s; model_transform ...", flush=True)
        t1 = time.time()
        run_tool("model_transform", ["--model_name", "b", "--model_def", src, "--input_shapes", shapes,
                                     "--mlir", "b.mlir", *extra], cwd=wd, log=wd / "transform.log")
        (wd / "transform.done").write_text(f"{time.time() - t1:.0f}\n")
        for p in wd.glob("*.onnx*"):
            p.unlink()
    if trace_hidden:
        out["traced"] = {"trace_hidden": trace_hidden, "mlir_inputs": mlir_input_shapes(wd / "b.mlir")}
        if (wd / "dynamic_check.json").is_file():
            out["traced"]["dynamic_check"] = json.loads((wd / "dynamic_check.json").read_text())
    for q in quantizes:
        prof = wd / f"profile_{q}.txt"
        if not prof.is_file():
            print(f"{block} {form}: model_deploy {q} ...", flush=True)
            t0 = time.time()
            # the dynamic-activation types refuse to start without a tolerance (used only with test inputs)
            extra = ["--tolerance", "0.9,0.5"] if q.endswith("DYN") else []
            try:
                run_tool("model_deploy", ["--mlir", "b.mlir", "--quantize", q, "--chip", "bm1684x",
                                          "--model", f"b_{q}.bmodel", *extra], cwd=wd, log=wd / f"deploy_{q}.log")
            except ToolError as e:
                tail = [ln for ln in (wd / f"deploy_{q}.log").read_text(errors="replace").splitlines() if ln.strip()]
                out["quantize"][q] = {"failed": tail[-1][:300] if tail else str(e)[:300]}
                print(f"{block} {form}: model_deploy {q} failed: {out['quantize'][q]['failed']}", flush=True)
                continue
            shutil.copyfile(wd / "compiler_profile_0.txt", prof)
            (wd / f"deploy_{q}.seconds").write_text(f"{time.time() - t0:.0f}\n")
            run_tool("model_tool", ["--info", f"b_{q}.bmodel"], cwd=wd, log=wd / f"info_{q}.log")
            (wd / f"b_{q}.bmodel").unlink(missing_ok=True)
            for pat in (f"b_bm1684x_{q.lower()}*", f"b_tpu_addressed_bm1684x_{q.lower()}*"):
                for p in wd.glob(pat):
                    if p.is_file() and p.suffix in (".npz", ".mlir"):
                        p.unlink()
        log = (wd / f"deploy_{q}.log").read_text(errors="replace")
        b = breakdown(prof, top_layers=15)
        ms = parse_profile_ms(prof)
        flops = re.search(r"flops:\s*(\d+)", prof.read_text())
        info = wd / f"info_{q}.log"
        mem = parse_info(info.read_text(errors="replace")) if info.is_file() else None
        out["quantize"][q] = {
            "device_memory_mb": None if mem is None else {
                "total": round(mem.device_mem / MB, 1), "weight": round(mem.weight / MB, 1),
                "runtime": round(mem.runtime / MB, 1),
                "instruct": round((mem.device_mem - mem.weight - mem.runtime) / MB, 2)},
            "commit": git_commit(), "estimate_ms": ms, "flops": int(flops.group(1)) if flops else None,
            "implied_tflops": round(int(flops.group(1)) / (ms * 1e9), 2) if flops and ms else None,
            "fattention_in_log": bool(FATTENTION.search(log)),
            "fattention_lines": [ln.strip() for ln in log.splitlines() if "fattention" in ln.lower()][:4],
            "deploy_seconds": float((wd / f"deploy_{q}.seconds").read_text()),
            "breakdown": b,
        }
        print(f"\n{block} block, form {form}, {q}, {out.get('tokens', '-')} tokens: estimate {ms:.2f} ms, "
              f"fattention in log: {out['quantize'][q]['fattention_in_log']}\n{table(b)}\n", flush=True)
    if (wd / "transform.done").is_file():
        out["transform_seconds"] = float((wd / "transform.done").read_text())
    if clean:  # the transform's weights (needed by a later deploy of another quantisation)
        for p in wd.glob("*.npz"):
            p.unlink()
    return out


def render(doc: dict, rows: int = 8) -> str:
    """Markdown for BENCHMARKS.md from a results file: one summary table, then the op types of
    each block and quantisation."""
    out = [f"Measured at commit {doc['commit']}, {doc['size']}x{doc['size']}, T5 {doc['t5_len']} "
           f"({doc['runs'][0]['tokens']} tokens), bm1684x, TPU-MLIR cost model (1 cycle = 1 ns).", "",
           "| block | attention form | quantize | estimate | implied TFLOPS | FAttention | TIU busy | GDMA busy | "
           "DMA not hidden | idle |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        for q, m in r["quantize"].items():
            if "failed" in m:
                out.append(f"| {r['block']} | {r['form']} | {q} | model_deploy failed: {m['failed'][:80]} | | | | | | |")
                continue
            b = m["breakdown"]
            out.append(f"| {r['block']} | {r['form']} | {q} | {m['estimate_ms']:.1f} ms | {m['implied_tflops']} | "
                       f"{'yes' if m['fattention_in_log'] else 'no'} | {100 * b['tiu_busy']:.0f}% | "
                       f"{100 * b['gdma_busy']:.0f}% | {100 * b['gdma_only']:.0f}% | {100 * b['idle']:.0f}% |")
    for r in doc["runs"]:
        for q, m in r["quantize"].items():
            if "failed" in m:
                continue
            b = m["breakdown"]
            out += ["", f"{r['block']} block, {r['form']}, {q} ({m['estimate_ms']:.1f} ms): share of the block's "
                    f"cycles by op type (GDMA: Load/Store attributed to the op they feed or drain)", "",
                    "| op | layers | TIU | GDMA | GDMA MB |", "|---|---|---|---|---|"]
            for t in b["by_type"][:rows]:
                out.append(f"| {t['op']} | {t['layers']} | {100 * t['tiu']:.1f}% | {100 * t['gdma']:.1f}% | "
                           f"{t['gdma_bytes'] / 1e6:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: python benchmarks/block_breakdown.py --blocks single "
                                        "--forms fattention,prescaled --work /tmp/bb")
    ap.add_argument("--blocks", default="single,double")
    ap.add_argument("--size", type=int, default=1024, help="square image size in pixels")
    ap.add_argument("--t5-len", type=int, default=512)
    ap.add_argument("--quantize", default="BF16,W4BF16")
    ap.add_argument("--forms", default="fattention,prescaled")
    ap.add_argument("--work", type=Path, default=None, help="work folder (logs, MLIR, profiles kept); required "
                    "unless --render")
    ap.add_argument("--name", default="block_breakdown", help="results file benchmarks/results/<name>.json")
    ap.add_argument("--clean", action="store_true", help="delete the transform's weights when done (a later "
                    "--quantize then transforms again)")
    ap.add_argument("--render", action="store_true", help="print the results file as markdown and stop")
    a = ap.parse_args(argv)
    res_path = RESULTS / f"{a.name}.json"
    if a.render:
        print(render(json.loads(res_path.read_text())))
        return
    tokens = a.t5_len + (a.size // 16) ** 2
    for block in a.blocks.split(","):
        for form in a.forms.split(","):
            r = measure(block, form, a.quantize.split(","), a.size, a.t5_len, a.work, a.clean)
            # merged into the file as it is now (another run may have written it meanwhile)
            old = json.loads(res_path.read_text()) if res_path.is_file() else {}
            runs = {f"{x['block']}/{x['form']}": x for x in old.get("runs", []) if x.get("tokens") == tokens}
            prev = runs.get(f"{block}/{form}", {"quantize": {}})
            r["quantize"] = {**prev.get("quantize", {}), **r["quantize"]}
            runs[f"{block}/{form}"] = r
            write_results(res_path, {
                "what": "TPU-MLIR cost-model breakdown of one full-width FLUX block (random weights), bm1684x",
                "size": a.size, "t5_len": a.t5_len, "chip": "bm1684x",
                "runs": sorted(runs.values(), key=lambda x: (x["block"], x["form"]))})
    print(f"wrote {res_path}")


if __name__ == "__main__":
    main()
