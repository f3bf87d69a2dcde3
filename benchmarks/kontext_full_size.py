"""FLUX.1 Kontext at full size on BM1684X: estimated step, VAE encoder time, device memory (issue 19, item 5).

    .venv/bin/python benchmarks/kontext_full_size.py --work DIR [--refs 1024,512] [--size 1024] [--t5-len 512]
        [--quantize W4BF16,BF16] [--encoders vae_encoder,tiny_vae_encoder] [--text-to-image] [--render]
    Example: nice -n 19 .venv/bin/python benchmarks/kontext_full_size.py --work /work/cache/kontext \\
        --refs 1024,512 --text-to-image

Measured (TPU-MLIR's cost model and `model_tool --info` of a compiled piece, bm1684x):
- one full-width double block and one single block (full_width_block.py: dim 3072, 24 x 128
  heads, random weights, seed 0, patched and wrapped as fluxc exports them, the default
  attention form "prescaled") at the Kontext token count of a size x size output with a
  ref x ref reference image: image (size/16)^2 + reference (ref/16)^2 + text t5_len tokens
  (1024 / 1024 / 512: 8704; 1024 / 512 / 512: 5632), deployed as block_breakdown.py deploys
  them (--quantize W4BF16; BF16 too for the 3-chip figure). Exported traced at 256 hidden tokens
  with the token axis dynamic (checked against torch at another count), made static at the full
  shapes by onnxsim before model_transform (block_breakdown.export_block): a traced export at
  8704 tokens would hold the 24 x 8704 x 8704 fp32 attention scores twice, and so would
  model_transform's own simplification (it runs the whole graph in onnxruntime).
  --text-to-image measures the blocks at 4608 tokens the same way, to compare against
  block_breakdown.json (static export).
- the VAE encoder piece at ref x ref input: fluxc's own wrapper and export
  (fluxc.export.pieces.build_piece_module, fluxc.export.onnx_io.export_piece, spec from
  fluxc.specs.encoder_spec), random weights at the published FLUX.1 VAE config (fluxc.tiny
  VAE_DEFAULTS + FULL_PRESET["vae"]) and taef1's (tiny_vae_encoder), compiled BF16 as
  recipes/bm1684x.yaml compiles them.

Computed from those and from full_size.json (the measured full-size text-to-image build; every
computed figure is labelled so in the results):
- the step: 19 double + 38 single blocks + head + tail; head and tail are full_size.json's
  (measured at 4096 image tokens) scaled by hidden tokens / 4096 (an upper bound: the head's
  text part does not grow);
- device memory on one chip (W4BF16): full_size.json's text-to-image build (11212.2 MiB:
  bmodels + I/O tensors) + the blocks' instruction growth (57 blocks) + the transformer file's
  runtime area growth (its largest net) + the I/O tensor growth (fluxc.runtime.device_memory.
  io_bytes_per_device on both builds' piece specs) + the encoder's bmodel, against
  runtime/device_memory.py BUDGET_MB["SE7-32"]; BF16 over 3 chips the same way, per chip,
  with every growth charged to every chip (an upper bound).

The work folder keeps each piece's logs, MLIR and profiles (block_breakdown.measure); a re-run
reuses every finished transform and deploy found there. Writes benchmarks/results/kontext_full_size.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from block_breakdown import measure
from full_width_block import block_tokens
from results_file import add_work_args, rendered_or_work, write_results

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
N_DOUBLE, N_SINGLE = 19, 38
FORM = "prescaled"  # patches/flux_attention.py's default, what fluxc exports (and full_size.json measured)
TRACE_HIDDEN = 256
# The full-size W4BF16 text-to-image build's per-piece `model_tool --info` at 4608 tokens
# (BENCHMARKS.md "Full size (computed from measured full-size pieces)"), bytes.
T2I_PIECES = {"double": {"instruct": 5753472, "runtime": 316223488},
              "single": {"instruct": 5658624, "runtime": 431771648}}


def flux_dims(flux_type: str, size: int, t5_len: int, ref: int = 0, tiny_vae: bool = True):
    """fluxc's FluxDims at the published FLUX.1 sizes (fluxc.tiny FULL_PRESET)."""
    from fluxc.export.dims import build_dims
    from fluxc.tiny import FULL_PRESET, TINY_VAE_DEFAULTS, VAE_DEFAULTS

    p = FULL_PRESET
    return build_dims(flux_type=flux_type, height=size, width=size, t5_len=t5_len,
                      transformer={**p["transformer"], "guidance_embeds": True}, clip=p["clip"], t5=p["t5"],
                      vae={**VAE_DEFAULTS, **p["vae"]},
                      tiny_vae={**TINY_VAE_DEFAULTS, **p["tiny_vae"]} if tiny_vae else None,
                      reference_size=(ref, ref) if ref else None)


def encoder_exporter(kind: str, size: int, t5_len: int, ref: int):
    """export(wd) for block_breakdown.measure: the VAE encoder piece as `fluxc export` writes it."""

    def export(wd: Path) -> tuple[str, str]:
        import torch
        from diffusers import AutoencoderKL, AutoencoderTiny

        from fluxc.export.onnx_io import export_piece
        from fluxc.export.pieces import build_piece_module
        from fluxc.specs import encoder_spec
        from fluxc.tiny import FULL_PRESET, TINY_VAE_DEFAULTS, VAE_DEFAULTS

        tiny = kind == "tiny_vae_encoder"
        dims = flux_dims("kontext", size, t5_len, ref, tiny_vae=tiny)
        spec = encoder_spec(dims)
        torch.manual_seed(0)
        vae = (AutoencoderTiny(**{**TINY_VAE_DEFAULTS, **FULL_PRESET["tiny_vae"]}) if tiny
               else AutoencoderKL(**{**VAE_DEFAULTS, **FULL_PRESET["vae"]})).eval()
        mod = build_piece_module(spec, dims, vae)
        export_piece(mod, spec, wd)
        mod.fluxc_patcher.restore()
        shapes = "[" + ",".join("[" + ",".join(map(str, t.shape)) + "]" for t in spec.inputs) + "]"
        return spec.file, shapes

    return export


def io_mib(dims) -> float:
    """The sail runtime's I/O tensors of a one-chip build of `dims` (every net on chip 0)."""
    from fluxc.runtime.device_memory import io_bytes_per_device
    from fluxc.specs import piece_specs

    specs = {s.net_name: s for s in piece_specs(dims)}
    return io_bytes_per_device(specs, {n: 0 for n in specs})[0] / MIB


def _q(run: dict, q: str) -> dict | None:
    m = run["quantize"].get(q)
    return None if m is None or "failed" in m else m


def t2i_block(doc: dict, bb: dict, kind: str, q: str) -> tuple[dict | None, str]:
    """A block's device memory (MiB: weight, instruct, runtime) at the text-to-image token count:
    this script's own (traced) measurement when it has one (--text-to-image), else the full-size
    build's pieces (W4BF16) or block_breakdown.json (BF16)."""
    for r in doc["blocks"]:
        if r["block"] == kind and not r.get("ref_size") and _q(r, q):
            return _q(r, q)["device_memory_mb"], "this script, text-to-image run (measured)"
    if q == "W4BF16":
        return {k: v / MIB for k, v in T2I_PIECES[kind].items()}, "full-size W4BF16 build's pieces (measured)"
    for r in bb.get("runs", []):
        if r["block"] == kind and r["form"] == FORM and _q(r, q) and _q(r, q).get("device_memory_mb"):
            return _q(r, q)["device_memory_mb"], "block_breakdown.json (measured)"
    return None, "not measured"


def growth(doc: dict, bb: dict, runs: dict, q: str) -> dict | None:
    """Instruction growth (all 57 blocks) and runtime-area growth (the largest net) of the
    transformer from the text-to-image token count to this one, MiB; None if a part is missing."""
    new = {k: _q(runs[k], q)["device_memory_mb"] for k in ("double", "single") if k in runs and _q(runs[k], q)}
    old = {k: t2i_block(doc, bb, k, q) for k in ("double", "single")}
    if len(new) < 2 or not all(v[0] for v in old.values()):
        return None
    # instruct of this script's runs is recorded; older records: total - weight - runtime
    ins = lambda m: m["instruct"] if "instruct" in m else m["total"] - m["weight"] - m["runtime"]  # noqa: E731
    instr = sum(cnt * (ins(new[k]) - ins(old[k][0])) for k, cnt in (("double", N_DOUBLE), ("single", N_SINGLE)))
    rt = max(new[k]["runtime"] for k in new) - max(old[k][0]["runtime"] for k in old)
    return {"instructions_mib": round(instr, 1), "runtime_area_mib": round(rt, 1),
            "new_runtime_mib": {k: new[k]["runtime"] for k in new},
            "text_to_image_from": {k: old[k][1] for k in old}}


def compute(doc: dict, full: dict, bb: dict, budget: float) -> dict:
    """The computed figures (step, device memory, verdict) from the measured runs."""
    size, t5 = doc["size"], doc["t5_len"]
    w4 = full["w4bf16"]
    kinds = w4["by_piece_kind"]
    head_ms, tail_ms = kinds["dev_head"]["estimate_ms"], kinds["dev_tail"]["estimate_ms"]
    t2i_n, _ = block_tokens(size, t5)
    t2i = {"tokens": t5 + t2i_n, "step_ms": w4["estimate_ms"]["denoising_step_ms"],
           "source": "full_size.json w4bf16 (measured full-size build, cost model)",
           "double_ms": round(kinds["dev_trans_block"]["estimate_ms"] / N_DOUBLE, 3),
           "single_ms": round(kinds["dev_single_trans_block"]["estimate_ms"] / N_SINGLE, 3),
           "device_mib": w4["device_mem_mb"][0]}
    t2i["block_breakdown_ms"] = {r["block"]: _q(r, "W4BF16")["estimate_ms"] for r in bb.get("runs", [])
                                 if r["form"] == FORM and _q(r, "W4BF16")}
    t2i["traced_here_ms"] = {r["block"]: _q(r, "W4BF16")["estimate_ms"] for r in doc["blocks"]
                             if not r.get("ref_size") and _q(r, "W4BF16")}
    io_t2i = io_mib(flux_dims("dev", size, t5))
    t2i["io_mib"] = round(io_t2i, 2)
    out: dict = {"text_to_image": t2i, "kontext": {}, "encoders": {}}
    for r in doc["encoders"]:
        e = _q(r, "BF16")
        if e:
            out["encoders"][f"{r['block']}@{r['ref_size']}"] = {
                "kind": r["block"], "input": r.get("input"), "estimate_ms": e["estimate_ms"],
                "device_memory_mb": e["device_memory_mb"], "implied_tflops": e["implied_tflops"],
                "quantize": "BF16", "how": "measured (cost model, model_tool --info)"}
    for ref in doc["refs"]:
        runs = {r["block"]: r for r in doc["blocks"] if r.get("ref_size") == ref}
        enc = {r["block"]: (r, _q(r, "BF16")) for r in doc["encoders"] if r["ref_size"] == ref and _q(r, "BF16")}
        w = {k: _q(runs[k], "W4BF16") for k in ("double", "single") if k in runs}
        if not all(w.get(k) for k in ("double", "single")):
            continue
        n, j = block_tokens(size, t5, ref)
        scale = n / t2i_n
        blocks_ms = N_DOUBLE * w["double"]["estimate_ms"] + N_SINGLE * w["single"]["estimate_ms"]
        step = blocks_ms + (head_ms + tail_ms) * scale
        k = {"ref_size": ref, "tokens": j, "hidden_tokens": n,
             "double_ms": w["double"]["estimate_ms"], "single_ms": w["single"]["estimate_ms"],
             "blocks_ms": round(blocks_ms, 1), "head_tail_ms": round((head_ms + tail_ms) * scale, 2),
             "head_tail_how": f"computed: full_size.json dev_head {head_ms:.2f} + dev_tail {tail_ms:.2f} ms "
                              f"(measured at {t2i_n} image tokens) x {n}/{t2i_n}",
             "step_ms": round(step, 1), "step_vs_text_to_image": round(step / t2i["step_ms"], 3),
             "step_how": "computed: 19 x double + 38 x single (measured, cost model) + head/tail (scaled)"}
        io_k = io_mib(flux_dims("kontext", size, t5, ref))
        g = growth(doc, bb, runs, "W4BF16")
        if g:
            parts = {"text_to_image_build": t2i["device_mib"], "blocks_instructions": g["instructions_mib"],
                     "runtime_area": g["runtime_area_mib"], "io_tensors": round(io_k - io_t2i, 1)}
            base = sum(parts.values())
            mem = {"how": "computed from measured parts: full_size.json's W4BF16 text-to-image build (measured, "
                          "tiny VAE) + the growth of the 57 blocks' instructions and of the transformer file's "
                          "runtime area (its largest net), measured blocks at this token count vs at 4608 + the "
                          "I/O tensors' growth (fluxc's sail I/O plan, computed) + the encoder bmodel (measured at "
                          f"{ref}x{ref} input)",
                   "parts_mib": parts, "growth": g, "without_encoder_mib": round(base, 1), "budget_mib": budget}
            for label, kind in (("tiny_vae_build", "tiny_vae_encoder"), ("with_full_vae_encoder", "vae_encoder")):
                if kind in enc:
                    tot = base + enc[kind][1]["device_memory_mb"]["total"]
                    mem[label] = {"encoder": kind, "encoder_mib": enc[kind][1]["device_memory_mb"]["total"],
                                  "total_mib": round(tot, 1), "fits_se7_32": tot <= budget,
                                  "headroom_mib": round(budget - tot, 1)}
            if "with_full_vae_encoder" in mem:
                mem["with_full_vae_encoder"]["note"] = (
                    "the measured build's tiny VAE decoder kept; a full-VAE build also swaps it for the full "
                    "AutoencoderKL decoder (not measured here)")
            k["device_memory_w4bf16_one_chip"] = mem
        gb = growth(doc, bb, runs, "BF16")
        if gb and full.get("bf16"):
            enc_mib = max((e["device_memory_mb"]["total"] for _, e in enc.values()), default=0.0)
            chips = [round(c + max(0.0, gb["instructions_mib"]) + gb["runtime_area_mib"] + (io_k - io_t2i)
                           + (enc_mib if i == 0 else 0.0), 1)
                     for i, c in enumerate(full["bf16"]["device_mem_mb"])]
            k["device_memory_bf16_3_chips"] = {
                "how": "computed upper bound: full_size.json's BF16 3-chip figures (measured) + on EVERY chip the "
                       "whole instruction growth of the 57 blocks, the largest runtime-area growth and the whole "
                       "I/O growth, + the larger encoder on chip 0",
                "growth": gb, "per_chip_mib": chips, "budget_mib": budget,
                "fits_se7_32_budget_per_chip": all(c <= budget for c in chips)}
        out["kontext"][str(ref)] = k
    return out


def render(doc: dict) -> str:
    """Markdown for BENCHMARKS.md from the results file."""
    c = doc["computed"]
    t = c["text_to_image"]
    out = [f"Commit `{doc['commit']}`; bm1684x; TPU-MLIR's cost model (1 cycle = 1 ns), not a board measurement; "
           f"{doc['size']}x{doc['size']} output, T5 {doc['t5_len']}, blocks W4BF16 (group 64).", "",
           "| build | tokens | double block | single block | step: 19 double + 38 single + head/tail | "
           "vs text-to-image |", "|---|---|---|---|---|---|",
           f"| text-to-image (full_size.json: the compiled full-size build) | {t['tokens']} | {t['double_ms']:.1f} ms "
           f"| {t['single_ms']:.1f} ms | {t['step_ms']:.0f} ms (measured build) | 1.00 |"]
    for ref, k in c["kontext"].items():
        out.append(f"| Kontext, reference {ref}x{ref} | {k['tokens']} | {k['double_ms']:.1f} ms (measured) | "
                   f"{k['single_ms']:.1f} ms (measured) | {k['step_ms']:.0f} ms (computed) | "
                   f"{k['step_vs_text_to_image']:.2f} |")
    if t.get("traced_here_ms"):
        out += ["", "Same-route check at 4608 tokens (traced at 256 hidden tokens, made static, as the Kontext blocks): "
                + ", ".join(f"{b} {v:.3f} ms" for b, v in sorted(t["traced_here_ms"].items()))
                + "; the static export (block_breakdown.json): "
                + ", ".join(f"{b} {v:.3f} ms" for b, v in sorted(t["block_breakdown_ms"].items())) + "."]
    if c.get("encoders"):
        out += ["", "| encoder (BF16, random weights) | input | estimate | implied TFLOPS | weight | runtime | "
                "device memory |", "|---|---|---|---|---|---|---|"]
        for e in c["encoders"].values():
            m = e["device_memory_mb"]
            out.append(f"| {e['kind']} | {'x'.join(map(str, e['input'][2:]))} | {e['estimate_ms']:.1f} ms (measured) | "
                       f"{e['implied_tflops']} | {m['weight']} MiB | {m['runtime']} MiB | {m['total']} MiB |")
    rows = []
    for ref, k in c["kontext"].items():
        mem = k.get("device_memory_w4bf16_one_chip")
        if not mem:
            continue
        pm = mem["parts_mib"]
        for label in ("tiny_vae_build", "with_full_vae_encoder"):
            v = mem.get(label)
            if v:
                rows.append(f"| {ref}x{ref} | {v['encoder']} | {pm['text_to_image_build']:.0f} | "
                            f"+{pm['blocks_instructions']:.0f} | +{pm['runtime_area']:.0f} | +{pm['io_tensors']:.0f} | "
                            f"+{v['encoder_mib']:.0f} | **{v['total_mib']:.0f}** | "
                            f"{'fits' if v['fits_se7_32'] else '**does not fit**'} ({v['headroom_mib']:+.0f}) |")
    if rows:
        out += ["", f"Device memory, W4BF16 on one chip, I/O included (computed from measured parts, MiB; SE7-32 "
                f"budget {c['kontext'][next(iter(c['kontext']))]['device_memory_w4bf16_one_chip']['budget_mib']} MiB):",
                "", "| reference | encoder | text-to-image build (measured) | block instructions | runtime area | "
                "I/O tensors | encoder | Kontext build | SE7-32 (headroom) |", "|---|---|---|---|---|---|---|---|---|"] + rows
    rows = [f"| {ref}x{ref} | {', '.join(f'{x:.0f}' for x in k['device_memory_bf16_3_chips']['per_chip_mib'])} | "
            f"{'fits' if k['device_memory_bf16_3_chips']['fits_se7_32_budget_per_chip'] else 'does not fit'} |"
            for ref, k in c["kontext"].items() if k.get("device_memory_bf16_3_chips")]
    if rows:
        out += ["", "BF16 over 3 chips (computed upper bound, MiB per chip; full_size.json's BF16 figures "
                f"{', '.join(str(x) for x in doc.get('bf16_text_to_image_mib', []))} + every growth on every chip):", "",
                "| reference | per chip | each chip within the SE7-32 budget |", "|---|---|---|"] + rows
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: nice -n 19 .venv/bin/python benchmarks/kontext_full_size.py "
                                        "--work /work/cache/kontext --refs 1024,512 --text-to-image")
    add_work_args(ap)
    ap.add_argument("--size", type=int, default=1024, help="square output size in pixels")
    ap.add_argument("--refs", default="1024,512", help="square reference image sizes, comma-separated")
    ap.add_argument("--quantize", default="W4BF16,BF16", help="block quantisations (W4BF16 is the figure asked "
                    "for; BF16 gives the 3-chip memory)")
    ap.add_argument("--encoders", default="tiny_vae_encoder,vae_encoder", help="encoder pieces to compile at "
                    "the largest reference size (empty: none)")
    ap.add_argument("--text-to-image", action="store_true", help="also measure both blocks at the "
                    "text-to-image token count the same (traced) way")
    a = ap.parse_args(argv)
    res_path = RESULTS / "kontext_full_size.json"
    if rendered_or_work(ap, a, res_path, render):
        return
    from fluxc.runtime.device_memory import BUDGET_MB

    refs = [int(r) for r in a.refs.split(",") if r]
    qs = [q for q in a.quantize.split(",") if q]
    doc: dict = {"what": "FLUX.1 Kontext at full size, bm1684x: blocks at the Kontext token count and the VAE "
                         "encoder (measured: cost model of compiled pieces) and the step / device memory "
                         "(computed from measured parts)", "size": a.size, "t5_len": a.t5_len, "refs": refs,
                 "chip": "bm1684x", "form": FORM, "trace_hidden": TRACE_HIDDEN, "blocks": [], "encoders": []}

    def save():
        full = json.loads((RESULTS / "full_size.json").read_text())
        bb = json.loads((RESULTS / "block_breakdown.json").read_text())
        doc["computed"] = compute(doc, full, bb, BUDGET_MB["SE7-32"])
        doc["sources"] = {"full_size.json": full.get("commit"), "block_breakdown.json": bb.get("commit")}
        doc["bf16_text_to_image_mib"] = full.get("bf16", {}).get("device_mem_mb", [])
        write_results(res_path, doc)

    def block(ref: int, kind: str) -> None:
        print(f"{kind} block, reference {ref or 'none (text-to-image)'} ...", flush=True)
        r = measure(kind, FORM, qs, a.size, a.t5_len, a.work, ref_size=ref, trace_hidden=TRACE_HIDDEN)
        for m in r["quantize"].values():
            m.pop("breakdown", None)
        doc["blocks"].append(r)
        save()

    for ref in refs:
        for kind in ("double", "single"):
            block(ref, kind)
    if a.text_to_image:  # the single block is quick; the double block (export ~5 min) after the encoders
        block(0, "single")
    for ref in refs:  # the encoder compiles at the reference's size (fluxc.specs.encoder_spec)
        for kind in [e for e in a.encoders.split(",") if e]:
            print(f"encoder {kind} at {ref}x{ref} ...", flush=True)
            r = measure(kind, "piece", ["BF16"], ref, a.t5_len, a.work,
                        export=encoder_exporter(kind, a.size, a.t5_len, ref))
            r["ref_size"], r["input"] = ref, [1, 3, ref, ref]
            for m in r["quantize"].values():
                m.pop("breakdown", None)
            doc["encoders"].append(r)
            save()
    if a.text_to_image:
        block(0, "double")
    print(render(json.loads(res_path.read_text())))
    print(f"wrote {res_path}")


if __name__ == "__main__":
    main()
