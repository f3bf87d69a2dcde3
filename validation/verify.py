"""fluxc verify: check a compiled workspace against an independent reference, on the chip
simulator. What was built comes only from the build record (BM1684X/fluxc_build.json).

1. Record: every file's size and sha256 against the record (any changed byte fails, even in
   parts the simulator never reads); the record made from this export (manifest sha256).
2. Structure: every file of the record loads on the simulator and holds exactly its nets,
   with the input/output names, shapes and dtypes of the manifest's PieceSpecs; device
   memory per chip (placement from the record) within a budget.
3. Reference checks: the rotary table against diffusers' FluxPosEmbed at the export's
   resolution; the runtime's timesteps/sigmas against diffusers' FlowMatchEulerDiscreteScheduler
   built from the source checkpoint's scheduler config.
4. Pieces on real activations, chained as on the chip: a tokenized prompt through the CLIP
   and T5 pieces, one denoising call of the transformer hop by hop (each piece takes the
   previous bmodel's output), the VAE on the latents that call predicts. Each piece is
   compared with the original model's submodule fed the same inputs (per hop: cosine,
   relative error, and for blocks the same on the update out - in), and with the clean
   reference chain (drift, reported per block).
5. End to end over the flux type's full step count (--steps shortens it): latent cosine and
   image PSNR against diffusers' FluxPipeline with the same prompt, seed and resolution; for a
   build with the VAE encoder (image input, issue 19) also img2img from VERIFY_IMAGE at
   VERIFY_STRENGTH against diffusers' FluxImg2ImgPipeline.
In 4 an image-input build's encoder encodes verify_image() (made here, no file) and is compared
with diffusers' own `vae.encode` on the original weights.
When the source checkpoint is not at hand, 3-5 use the exported ONNX pieces instead and the
report says so. All failures are collected; the caller exits non-zero if any.

A build of several image sizes (issue 11: a size-dependent net holds one stage per size) is
checked at every size; a check that depends on the size carries it (`size`, "WxH", shown as
"name @WxH"): structure (each size-dependent net has the stage of each size, its shapes read
from `model_tool --info`), the rotary table and schedule, the size-dependent pieces on the chip
(the text encoders run and are checked once; each further size reuses their outputs), and end
to end. Memory counts the I/O tensors of every size (one per role and distinct shape).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fluxc import workspace
from fluxc.build_record import RECOMPILE
from fluxc.errors import FluxcError, ToolError
from fluxc.export.manifest import load_manifest
from fluxc.runtime.device_memory import BUDGET_MB, bmodel_memory_from_info, io_bytes_per_device
from fluxc.runtime.cmodel_engine import CmodelEngine
from fluxc.runtime.models import ModelSet, open_onnx, read_build
from fluxc.runtime.pipeline import FluxPipeline, initial_latents, unpack_latents
from fluxc.runtime.scheduler import FlowMatchEulerScheduler
from fluxc.specs import DEFAULT_STEPS, piece_name
from fluxc.toolchain import run_tool
from fluxc.metrics import cosine, psnr, rel_err
from fluxc.validation.metrics import compare, rounded
from fluxc.validation.reference import (Reference, ReferenceModels, check_available, diffusers_generate,
                                        diffusers_img2img, diffusers_schedule, find_source, rotary_from_table)

# Device memory budget per chip: the SE7-32's (runtime/device_memory.py BUDGET_MB has the
# boards and where their figures come from). The board run measured 11419 MB.
DEFAULT_BUDGET_MB = BUDGET_MB["SE7-32"]

# ---- thresholds (per quantisation, as the build record says each piece was compiled)
# Every output of a piece, per hop: cosine >= the recipe's own threshold for the piece's
# quantisation (recorded per piece at compile: `tolerance[0]`), and relative error <= REL_ERR.
# Blocks (residual pieces), per hop, on the update out - in: cosine >= DELTA_COSINE and
# relative error <= DELTA_REL_ERR. Set from measured margins (tiny schnell W4BF16, 64x64;
# benchmarks/verify_margins.py, BENCHMARKS.md "Verify"):
#   W4BF16 blocks, good build: update rel. error <= 0.186, update cosine >= 0.983;
#   mutants: weights x1.05 0.269, T5 block x1.1 0.402, x1.25 1.15, zeroed 1.00, identity 1.00
#   (update cosine: x1.25 still 0.978 - the direction survives a scale, so the relative error is
#   what catches scaling; zeroed -0.06, identity 0.00). 0.25 sits between 0.186 and 0.269.
#   F16 blocks: 0.001; BF16 head/tail/T5 tail rel. error <= 0.0063, the BF16 tiny VAE 0.061.
#   BF16 blocks (tiny dev, 64x64): good build update rel. error <= 0.014 (double 0.0139, single
#   0.0122), update cosine >= 0.9999; mutants: weights x1.02 0.069, x1.05 0.177, x1.1 0.373,
#   x1.25 1.07. 0.04 sits between 0.014 and 0.069 (x1.02 is caught; it was 0.12, a guess).
REL_ERR = {"F16": 0.02, "BF16": 0.1, "W4BF16": 0.15, "W4F16": 0.15, "F32": 1e-4}
DELTA_COSINE = {"F16": 0.995, "BF16": 0.99, "W4BF16": 0.95, "W4F16": 0.95, "F32": 0.9999}
DELTA_REL_ERR = {"F16": 0.05, "BF16": 0.04, "W4BF16": 0.25, "W4F16": 0.25, "F32": 1e-3}
# End to end, by the transformer blocks' quantisation.
E2E_LATENT_COSINE = {"BF16": 0.99, "W4BF16": 0.98}
E2E_PSNR_DB = {"BF16": 30.0, "W4BF16": 18.0}
# Rotary table and schedule: float32 copies of the same numbers.
ROTARY_MAX_ERR = 1e-5
SCHEDULE_MAX_ERR = 1e-4  # timesteps in 0..1000: relative
# img2img end to end (image-input builds): the strength it runs at
VERIFY_STRENGTH = 0.6


def verify_image(width: int, height: int):
    """The input image of an image-input build's checks: smooth colour gradients and a disc
    (no file; deterministic), at 3/2 the build's size so the resize is exercised. PIL RGB."""
    from PIL import Image

    w, h = 3 * width // 2, 3 * height // 2
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2, 220.0, 40.0)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8), "RGB")


def encoder_of(specs):
    """The VAE encoder piece of an image-input build, or None."""
    return next((s for s in specs if s.family == "vae_encoder"), None)


@dataclass
class Check:
    section: str  # record | structure | memory | reference | piece | drift | e2e
    name: str  # piece, file or item
    ok: bool
    detail: str = ""
    metrics: dict = field(default_factory=dict)
    size: str = ""  # "WxH" for a check made at one image size of a several-size build

    @property
    def label(self) -> str:
        return f"{self.name} @{self.size}" if self.size else self.name


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add(self, section, name, ok, detail="", size: str = "", **metrics) -> Check:
        c = Check(section, name, bool(ok), detail, metrics, size)
        self.checks.append(c)
        return c

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {"ok": not self.failures, "n_checks": len(self.checks), "n_failures": len(self.failures),
                "failures": [f"{c.section}: {c.label}: {c.detail}" for c in self.failures],
                "info": self.info, "checks": [asdict(c) for c in self.checks]}


def bmodel_memory(path: Path) -> dict | None:
    """Device memory of a bmodel from a fresh `model_tool --info` (bytes), None if unreadable."""
    with tempfile.TemporaryDirectory(prefix="fluxc-verify-") as td:
        log = Path(td) / "info.log"
        try:
            run_tool("model_tool", ["--info", str(Path(path).resolve())], cwd=Path(td), log=log, timeout=300)
        except ToolError:
            return None
        text = log.read_text(errors="replace")
    try:
        return bmodel_memory_from_info(text)
    except ValueError:  # no `device mem size` line
        return None


def _name_ok(got: str, want: str) -> bool:
    # TPU-MLIR may name an output after the op producing it plus its type
    # (e.g. "noise_pred_Add_f32"); the ONNX output name stays its prefix.
    return got == want or got.startswith(want + "_")


def check_net(rep: Report, spec, net, file: str, size: str = "") -> bool:
    problems = []
    if len(net.inputs) != len(spec.inputs):
        problems.append(f"{len(net.inputs)} inputs, expected {len(spec.inputs)}")
    if len(net.outputs) != len(spec.outputs):
        problems.append(f"{len(net.outputs)} outputs, expected {len(spec.outputs)}")
    for kind, got_l, want_l in (("input", net.inputs, spec.inputs), ("output", net.outputs, spec.outputs)):
        for g, w in zip(got_l, want_l):
            ok_name = g.name == w.name if kind == "input" else _name_ok(g.name, w.name)
            if not ok_name:
                problems.append(f"{kind} {g.name!r} where {w.name!r} expected")
            if tuple(g.shape) != tuple(w.shape):
                problems.append(f"{kind} {w.name} shape {list(g.shape)}, expected {list(w.shape)}")
            if g.dtype != w.dtype:
                problems.append(f"{kind} {w.name} dtype {g.dtype}, expected {w.dtype}")
    rep.add("structure", spec.name, not problems, "; ".join(problems) or f"in {file}", size=size)
    return not problems


class Recorder:
    """A model set that keeps, per piece, the inputs and outputs (spec names) of its last call."""

    def __init__(self, models, specs, on_piece=None):
        self.m = models
        self.spec = {s.net_name: s for s in specs}
        self.calls: dict[str, tuple[dict, dict]] = {}
        self.on_piece = on_piece

    def process(self, net, inputs):
        out = self.m.process(net, inputs)
        s = self.spec[net]
        vals = list(out.values())
        outs = {}
        for i, t in enumerate(s.outputs):
            v = out.get(t.name, vals[i] if i < len(vals) else None)
            if v is None:
                raise FluxcError(f"net {net} returned {len(vals)} outputs, expected {len(s.outputs)}")
            outs[t.name] = np.asarray(v, np.float32).reshape(t.shape)
        first = s.name not in self.calls
        self.calls[s.name] = ({k: np.array(v) for k, v in inputs.items()}, outs)
        if first and self.on_piece:
            self.on_piece(s.name)
        return out


def piece_chain(models, man, prompt: str, seed: int, guidance: float, on_piece=None, encoded=None) -> dict:
    """Run every piece once on real activations through `models` (any engine set):
    prompt -> CLIP, T5 -> one transformer call at the first timestep -> VAE on the latents
    that call predicts. Returns {"calls": piece -> (inputs, outputs), "t": ..., ...}.
    `encoded`: (pooled, T5 states) of this prompt from an earlier chain (a further image size:
    the text encoders do not depend on it), so only the transformer and the VAE run."""
    rec = Recorder(models, man.specs, on_piece)
    pipe = FluxPipeline(rec, man)
    pooled, t5 = encoded if encoded is not None else pipe.encode_prompt(prompt)
    lat, _ = initial_latents(man.dims, seed)
    pipe.scheduler.set_timesteps(DEFAULT_STEPS[man.dims.flux_type], lat.shape[1])
    t0, s0 = float(pipe.scheduler.timesteps[0]), float(pipe.scheduler.sigmas[0])
    noise = pipe.transformer(lat, t0, guidance, pooled, t5)
    x0 = lat - s0 * noise  # the clean latents this call predicts
    pipe.decode(x0)
    d = man.dims
    if encoder_of(man.specs) is not None:  # image-input build: the encoder on the verify image
        from fluxc.runtime.image_input import preprocess

        pipe.encode_image(preprocess(verify_image(d.width, d.height), d.height, d.width))
    return {"calls": rec.calls, "latents": lat, "t": t0, "sigma": s0, "pooled": pooled, "t5": t5,
            "x0_unpacked": unpack_latents(x0, 2 * (d.height // (d.vae_scale * 2)), 2 * (d.width // (d.vae_scale * 2)))}


def torch_reference(R, man, chip: dict, guidance: float, text_clean: dict | None = None) -> tuple[dict, dict]:
    """(per hop: the original submodules fed the chip's inputs, clean: the original chain).
    `text_clean`: the clean chain's CLIP and T5 pieces from an earlier size (a chain run with
    `encoded`): the text encoders are then neither run nor returned."""
    calls = chip["calls"]
    ins = {k: v[0] for k, v in calls.items()}
    p = man.dims.flux_type
    head = ins[f"{p}_head"]
    vae = piece_name("tiny_vae" if man.dims.tiny_vae else "vae")
    hop: dict = {}
    clean: dict = {}
    if text_clean is None:
        hop.update(R.clip(ins["clip_head"]["input_ids"], ins))
        hop.update(R.t5(ins["t5_head"]["input_ids"], ins))
    hop.update(R.transformer(head["hidden_states"], chip["t"], guidance, head["pooled_projections"],
                             head["encoder_hidden_states"], ins))
    hop.update(R.vae(ins[vae]["latents"]))
    if text_clean is None:
        clean.update(R.clip(ins["clip_head"]["input_ids"]))
        clean.update(R.t5(ins["t5_head"]["input_ids"]))
    text = text_clean or clean
    clean.update(R.transformer(head["hidden_states"], chip["t"], guidance, text["clip_tail"]["pooled"],
                               text["t5_tail"]["encoder_hidden_states"]))
    noise = clean[f"{p}_tail"]["noise_pred"]
    x0 = head["hidden_states"] - chip["sigma"] * noise
    d = man.dims
    clean.update(R.vae(unpack_latents(x0, 2 * (d.height // (d.vae_scale * 2)), 2 * (d.width // (d.vae_scale * 2)))))
    enc = encoder_of(man.specs)
    if enc is not None:  # the same image both ways: the hop is the clean chain
        ref = R.vae_encoder(ins[enc.name]["image"])
        hop.update(ref)
        clean.update(ref)
    return hop, clean


def onnx_reference(man, chip: dict, guidance: float, seed: int, prompt: str,
                   text_clean: dict | None = None) -> tuple[dict, dict]:
    """The same two references from the exported ONNX pieces (when the source is not at hand)."""
    ms = open_onnx(man)
    hop = {}
    for s in man.specs:
        if s.name not in chip["calls"]:  # a text encoder piece of a chain run with `encoded`
            continue
        inputs = chip["calls"][s.name][0]
        out = ms.process(s.net_name, inputs)
        vals = list(out.values())
        hop[s.name] = {t.name: np.asarray(out.get(t.name, vals[i]), np.float32).reshape(t.shape)
                       for i, t in enumerate(s.outputs)}
    encoded = None if text_clean is None else (text_clean["clip_tail"]["pooled"],
                                                text_clean["t5_tail"]["encoder_hidden_states"])
    clean = {k: v[1] for k, v in piece_chain(ms, man, prompt, seed, guidance, encoded=encoded)["calls"].items()}
    ms.close()
    return hop, clean


def _residual_input(spec, out_name: str, inputs: dict):
    base = out_name[:-4] if out_name.endswith("_out") else None
    if spec.index is None or base is None or base not in inputs:
        return None
    return inputs[base]


def check_piece(rep: Report, spec, built, chip_io, hop_ref: dict, clean_ref: dict, size: str = "") -> Check:
    inputs, outs = chip_io
    q = built.quantize
    cos_floor = float(built.tolerance[0])
    problems: list[str] = []
    figures: dict = {}
    worst = {"cosine": 1.0, "rel_err": 0.0}
    for t in spec.outputs:
        got = outs[t.name]
        inp = _residual_input(spec, t.name, inputs)
        h = compare(hop_ref[t.name], got, inp)
        dr = compare(clean_ref[t.name], got)
        figures[t.name] = {"hop": rounded(h), "drift": rounded({k: v for k, v in dr.items() if k != "flags"})}
        worst["cosine"] = min(worst["cosine"], h["cosine"])
        worst["rel_err"] = max(worst["rel_err"], h["rel_err"])
        problems += [f"{t.name}: {f}" for f in h["flags"]]
        if not h["cosine"] >= cos_floor:
            problems.append(f"{t.name}: cosine {h['cosine']:.5f} < {cos_floor} (recipe, {q})")
        if spec.index is not None and "delta_cosine" in h:
            worst["delta_cosine"] = min(worst.get("delta_cosine", 1.0), h["delta_cosine"])
            worst["delta_rel_err"] = max(worst.get("delta_rel_err", 0.0), h["delta_rel_err"])
            if not h["delta_cosine"] >= DELTA_COSINE[q]:
                problems.append(f"{t.name}: update cosine {h['delta_cosine']:.4f} < {DELTA_COSINE[q]}")
            if not h["delta_rel_err"] <= DELTA_REL_ERR[q]:
                problems.append(f"{t.name}: update rel. error {h['delta_rel_err']:.3f} > {DELTA_REL_ERR[q]}")
        elif not h["rel_err"] <= REL_ERR[q]:
            problems.append(f"{t.name}: rel. error {h['rel_err']:.4f} > {REL_ERR[q]}")
    detail = "; ".join(problems) or (f"{q}: cos {worst['cosine']:.5f} rel {worst['rel_err']:.2e}" +
                                     (f", update cos {worst['delta_cosine']:.4f} rel {worst['delta_rel_err']:.3f}"
                                      if "delta_cosine" in worst else ""))
    return rep.add("piece", spec.name, not problems, detail, size=size, quant=q, cosine_floor=cos_floor,
                   rel_err_max=REL_ERR[q], delta_cosine_min=DELTA_COSINE[q] if spec.index is not None else None,
                   delta_rel_err_max=DELTA_REL_ERR[q] if spec.index is not None else None,
                   worst={k: float(f"{v:.6g}") for k, v in worst.items()}, outputs=figures)


@dataclass
class SizeView:
    """The build at one of its image sizes: the export there (Manifest.at), the record's pieces
    there, the pieces whose spec depends on the size, and the label checks carry ("" for a
    one-size build, so its report reads as before)."""

    height: int
    width: int
    man: object
    built: dict  # piece name -> BuiltPiece at this size
    own: set  # pieces checked at this size: all at the first, the size-dependent ones at the others
    varies: set  # the pieces whose spec differs between sizes (labelled with the size)
    label: str

    def tag(self, piece: str) -> str:
        """The size label of a check of `piece` (or of an item that depends on the size: "")."""
        return self.label if piece in self.varies else ""


def build_sizes(man, rec) -> list[SizeView]:
    """The build's sizes (first first) as SizeViews; one for a one-size build."""
    sizes = rec.sizes or [(man.dims.height, man.dims.width)]
    views = [man.at(h, w) for h, w in sizes]
    first = {s.name: s.to_dict() for s in views[0].specs}
    varies = {s.name for v in views[1:] for s in v.specs if s.to_dict() != first[s.name]}
    out = []
    for i, ((h, w), v) in enumerate(zip(sizes, views)):
        built = {p.spec.name: p for p in (rec.pieces_at(h, w) if len(sizes) > 1 else rec.pieces)}
        own = {s.name for s in v.specs} if i == 0 else {s.name for s in v.specs if s.to_dict() != first[s.name]}
        out.append(SizeView(h, w, v, built, own, varies, f"{w}x{h}" if len(sizes) > 1 else ""))
    return out


def verify_workspace(models: Path, export: Path | None = None, quantize: str | None = None,
                     flux_type: str | None = None, budget_mb: float = DEFAULT_BUDGET_MB,
                     devices: int | None = None, e2e: bool = True, steps: int | None = None, seed: int = 0,
                     prompt: str = "a photo of an astronaut riding a horse on the moon",
                     pieces: str | None = None, guidance: float = 3.5, reference: str = "auto",
                     say=print, cluster: str | None = None, full_size_checks: bool = False) -> Report:
    t_start = time.perf_counter()
    models = Path(models)
    exp, man, rec = open_build(models, export, quantize, flux_type)
    if full_size_checks and not cluster:
        raise FluxcError("--full-size-checks needs --cluster ADDRESS: one full-size block takes the simulator more "
                         "than 15 min, so every piece is checked as a task on a Ray cluster")
    if cluster and man.probe and not full_size_checks:
        raise FluxcError(f"the build in {models} is full size (its export has probe pieces); with --cluster, pass "
                         f"--full-size-checks to check every full-size piece on the simulator as a cluster task")
    if cluster and len(rec.sizes or []) > 1:
        raise FluxcError(f"fluxc verify --cluster checks one-size builds; the build in {models} has "
                         f"{len(rec.sizes)} sizes: verify it without --cluster (every size is checked)")
    d = man.dims
    if d.kontext:
        raise FluxcError("fluxc verify does not check FLUX.1 Kontext builds yet (issue 19); check one with "
                         "`fluxc run --backend cmodel --image ref.png` against `--backend onnx`")
    q = rec.quantize
    n_steps = steps or DEFAULT_STEPS[d.flux_type]
    sizes = build_sizes(man, rec)
    rep = Report()
    rep.info.update({"models": str(models), "export": str(exp), "record": str(rec.path), "flux_type": d.flux_type,
                     "quantize": q, "tiny_vae": d.tiny_vae, "resolution": [d.height, d.width],
                     # a several-size build (issue 11) is checked at every size; checks that depend
                     # on the size carry it ("size": "WxH")
                     "build_sizes": rec.size_labels, "budget_mb": budget_mb,
                     "size_dependent_pieces": sorted(sizes[0].varies),
                     "recipe": rec.raw["recipe"], "devices": rec.devices,
                     "thresholds": {"piece_cosine": "recipe (per piece, from the build record)", "rel_err": REL_ERR,
                                    "delta_cosine": DELTA_COSINE, "delta_rel_err": DELTA_REL_ERR,
                                    "e2e_latent_cosine": E2E_LATENT_COSINE, "e2e_psnr_db": E2E_PSNR_DB}})
    if len(sizes) > 1:
        say(f"sizes: {', '.join(rec.size_labels)} (width x height); {len(sizes[0].varies)} size-dependent pieces "
            "are checked at each size, the others once")
    specs = man.specs

    # ---- 1. record vs files
    bad = check_record(rep, rec, exp, say)
    # ---- 2. structure and device memory
    ms, engines = load_on_simulator(rep, rec, specs, say, sizes)
    check_device_memory(rep, rec, bad, budget_mb, say)
    if len(engines) < len(specs) or any(c.section in ("record", "structure") and not c.ok for c in rep.checks):
        # figures from files that are not what was built would mean nothing
        rep.add("piece", "all pieces", False, "skipped: the files do not match the build record or the export "
                "(see record/structure)")
        ms.close()
        return rep

    # ---- 3. reference
    src, R = open_reference(rep, man, reference, say)
    for z in sizes:
        if R is not None:
            check_rotary_table(rep, Reference(R.models, z.man.dims) if z.label else R, z.man, z.label)
        check_schedule(rep, z.man, src, n_steps, z.label)

    # ---- 4. pieces on real activations: chained on the chip here (the text encoders once), or
    # one cluster task per piece
    if cluster:
        check_pieces_on_cluster(rep, man, rec, R, prompt, seed, guidance, pieces, cluster, exp, say)
    else:
        text = None
        for z in sizes:
            text = check_pieces_on_chip(rep, ms, z.man, z, R, prompt, seed, guidance, pieces, say, text)

    # ---- 5. end to end, at every size
    if e2e:
        failed = bool(rep.failures)
        for z in sizes:
            if failed:
                rep.add("e2e", f"{n_steps}-step generation", False, "skipped: earlier checks failed", size=z.label)
                continue
            Rz = Reference(R.models, z.man.dims) if (R is not None and z.label) else R
            end_to_end(rep, z.man, ms, Rz, q, n_steps, seed, prompt, guidance, say, z.label)
            if encoder_of(z.man.specs) is not None:
                end_to_end(rep, z.man, ms, Rz, q, n_steps, seed, prompt, guidance, say, z.label, image=True)
    ms.close()
    rep.info["seconds"] = round(time.perf_counter() - t_start, 1)
    return rep


def open_build(models: Path, export: Path | None, quantize: str | None, flux_type: str | None):
    """(export folder, its manifest, the build record) of a workspace; one-line errors for a
    missing folder, another flux type, or a missing/truncated/other build."""
    if not models.is_dir():
        raise FluxcError(f"models folder {models} does not exist; run fluxc export and fluxc compile first")
    loc = workspace.locate(models)  # a workspace or a bmodel folder (fluxc compile --out)
    exp = Path(export) if export else loc.export
    man = load_manifest(exp)
    d = man.dims
    d.check_asked(flux_type, None, f"the export in {exp}")
    rec = read_build(loc.chip, d, quantize, check_files=False)  # one-line error: missing/truncated/other build
    return exp, man, rec


def check_record(rep: Report, rec, exp: Path, say) -> dict[str, str]:
    """1. Every file of the build record against its recorded size and sha256, and the record
    against the export's manifest. Returns {file name: why} for the files that do not match."""
    say(f"record: {rec.path.name}: {len(rec.files)} file(s), {len(rec.pieces)} pieces; hashing the files")
    bad = {f.path.name: why for f, why in rec.mismatched_files()}
    for f in rec.files:
        holds = ", ".join(f.nets[:3]) + (" ..." if len(f.nets) > 3 else "")
        rep.add("record", f.path.name, f.path.name not in bad,
                (f"{bad[f.path.name]} (holds {holds}); {RECOMPILE}" if f.path.name in bad else
                 f"sha256 {f.sha256[:12]}, device {f.device}"))
    try:
        rec.check_export(exp)
        rep.add("record", "export manifest.json", True, "the export the build was compiled from")
    except FluxcError as e:
        rep.add("record", "export manifest.json", False, str(e))
    return bad


def load_on_simulator(rep: Report, rec, specs, say, sizes: list[SizeView] | None = None
                      ) -> tuple[ModelSet, dict[str, CmodelEngine]]:
    """2. Every file of the record loaded on the chip simulator: it holds exactly its recorded
    nets, each with its piece spec's inputs and outputs (check_net). Returns the model set and,
    per piece whose net passed, the engine holding it. Several sizes: a size-dependent net is
    checked at each size against the stage of that size's shapes (`model_tool --info` lists a
    net's stages; the simulator loads a net with its largest stage's buffers)."""
    say("structure: loading every bmodel of the record on the chip simulator")
    sizes = sizes or []
    varies = sizes[0].varies if len(sizes) > 1 else set()
    spec_of = {s.name: s for s in specs}
    ms = ModelSet("cmodel")
    engines: dict[str, CmodelEngine] = {}
    for f in rec.files:
        if not f.path.is_file():
            continue
        try:
            eng = CmodelEngine(f.path)
        except FluxcError as e:
            rep.add("structure", f.path.name, False, str(e).splitlines()[0])
            continue
        ms.add(eng)
        extra, missing = sorted(set(eng.nets) - set(f.nets)), sorted(set(f.nets) - set(eng.nets))
        here = [bp for bp in rec.pieces if bp.file == f.path.name and bp.net in eng.nets]
        stages = None
        if any(bp.spec.name in varies for bp in here):
            stages = net_stages(f.path)
            if stages is None:
                rep.add("structure", f.path.name, False, "model_tool --info cannot read it (the stages of its nets)")
                continue
        rep.add("structure", f.path.name, not extra and not missing,
                f"nets {extra} not in the record; " * bool(extra) + f"missing nets {missing}" * bool(missing)
                or f"{len(eng.nets)} nets as recorded"
                + (f", {max(len(v) for v in stages.values())} stages (one per size)" if stages else ""))
        for bp in here:
            name = bp.spec.name
            if name not in varies:
                if check_net(rep, spec_of[name], eng.nets[bp.net], f.path.name):
                    engines[name] = eng
                continue
            ok = True
            for z in sizes:
                spec = z.man.spec(name)
                ok &= check_net(rep, spec, at_stage(eng.nets[bp.net], stages.get(bp.net, []), spec),
                                f.path.name, z.label)
            if ok:
                engines[name] = eng
    for s in specs:
        if s.name not in engines and not any(c.name == s.name for c in rep.checks):
            rep.add("structure", s.name, False, f"net {s.net_name!r} not loaded from {rec.piece(s.name).file}")
    return ms, engines


def net_stages(path: Path) -> dict[str, list[tuple[list, list]]] | None:
    """net -> [(input shapes, output shapes) per stage] of a bmodel, from a fresh
    `model_tool --info` (None if it cannot read the file)."""
    from fluxc.compile.parse import parse_info

    with tempfile.TemporaryDirectory(prefix="fluxc-verify-") as td:
        log = Path(td) / "info.log"
        try:
            run_tool("model_tool", ["--info", str(Path(path).resolve())], cwd=Path(td), log=log, timeout=300)
            nets = parse_info(log.read_text(errors="replace")).nets
        except (ToolError, ValueError):
            return None
    return {n.name: [([list(t.shape) for t in st["inputs"]], [list(t.shape) for t in st["outputs"]])
                     for st in n.stages] for n in nets}


def at_stage(net, stages: list[tuple[list, list]], spec):
    """The loaded net (names, dtypes) with the shapes of its stage whose input shapes are the
    spec's; no such stage: the net as loaded (check_net then names the shapes that differ)."""
    from fluxc.runtime.engine import NetInfo, TensorInfo

    want = [list(t.shape) for t in spec.inputs]
    for ins, outs in stages:
        if [list(x) for x in ins] == want and len(ins) == len(net.inputs) and len(outs) == len(net.outputs):
            return NetInfo(net.name, [TensorInfo(t.name, tuple(sh), t.dtype) for t, sh in zip(net.inputs, ins)],
                           [TensorInfo(t.name, tuple(sh), t.dtype) for t, sh in zip(net.outputs, outs)])
    return net


def check_device_memory(rep: Report, rec, bad: dict[str, str], budget_mb: float, say) -> None:
    """2. Device memory per chip, as the record places the files, within `budget_mb`."""
    say("memory: per device as the build record places the files (model_tool --info figures of the record "
        "for files whose sha256 matches, measured again otherwise) plus the I/O tensors the sail runtime "
        "allocates there")
    # the I/O tensors of every size (one per role, chip and distinct shape, as the sail runtime allocates them)
    per_size = ([{p.net: p.spec for p in rec.pieces_at(h, w)} for h, w in rec.sizes] if len(rec.sizes) > 1
                else [{p.net: p.spec for p in rec.pieces}])
    io = io_bytes_per_device(per_size, {p.net: p.device for p in rec.pieces})
    of = f" of {len(per_size)} sizes" if len(per_size) > 1 else ""
    for dev in range(rec.devices):
        total, parts, unread = io.get(dev, 0), [f"I/O tensors{of} {io.get(dev, 0) / 2**20:.1f} MB"], []
        for f in rec.on_device(dev):
            if f.path.name not in bad and f.memory.get("device"):
                m = {"total": int(f.memory["device"])}
            else:
                m = bmodel_memory(f.path) if f.path.is_file() else None
            if m is None:
                unread.append(f.path.name)
                continue
            total += m["total"]
            parts.append(f"{f.path.name} {m['total'] / 2**20:.1f} MB")
        mb = total / 2**20
        detail = ", ".join(parts)
        if unread:
            detail = f"model_tool cannot read {', '.join(unread)}; " + detail
        elif mb > budget_mb:
            detail = f"{mb:.1f} MB > budget {budget_mb:.0f} MB: " + detail
        rep.add("memory", f"device {dev}", not unread and mb <= budget_mb, detail, device_mb=round(mb, 3),
                budget_mb=budget_mb)


def open_reference(rep: Report, man, reference: str, say):
    """3. The independent reference: (source, Reference of the original diffusers/transformers
    models) when the source checkpoint is at hand, else (None, None): the exported ONNX stands
    in, and the report says so."""
    src, why = (None, "--reference onnx") if reference == "onnx" else find_source(man)
    if src is not None and check_available():
        src, why = None, check_available()
    if src is None:
        msg = f"REFERENCE: the source checkpoint is not at hand ({why}): checked against the exported ONNX only"
        say(msg)
        rep.info["reference"] = {"kind": "onnx", "why": why}
        rep.add("reference", "source checkpoint", True, f"not at hand ({why}); checked against the ONNX only")
        return None, None
    say(f"reference: the original models from {src.folder} (diffusers/transformers, unpatched)")
    rep.info["reference"] = {"kind": "source", "folder": str(src.folder),
                             "tiny_vae": str(src.tiny_vae) if src.tiny_vae else None}
    _quiet_libraries()
    return src, Reference(ReferenceModels(src, say=say), man.dims)


def check_rotary_table(rep: Report, R, man, size: str = "") -> None:
    """3. The export's rotary table against diffusers' FluxPosEmbed at the export's resolution."""
    d = man.dims
    table = np.load(man.rotary_path)
    c_ref, s_ref = R.rotary()
    if table.shape != tuple(d.rotary_shape):
        rep.add("reference", "rotary_emb.npy", False, f"shape {table.shape}, expected {d.rotary_shape}", size=size)
    else:
        c, s = rotary_from_table(table)
        err = max(float(np.abs(c - c_ref).max()), float(np.abs(s - s_ref).max()))
        rep.add("reference", "rotary_emb.npy", err <= ROTARY_MAX_ERR,
                f"max |table - FluxPosEmbed| {err:.2e} (<= {ROTARY_MAX_ERR}) at {d.width}x{d.height}",
                size=size, max_abs_err=err)


def check_schedule(rep: Report, man, src, n_steps: int, size: str = "") -> None:
    """3. The runtime's timesteps and sigmas (the export's scheduler config) against diffusers'
    FlowMatchEulerDiscreteScheduler (the source's config when at hand)."""
    d = man.dims
    sched_cfg_path = (src.folder / "scheduler" / "scheduler_config.json") if src else man.scheduler_config_path
    ours = FlowMatchEulerScheduler.from_file(man.scheduler_config_path)
    ours.set_timesteps(n_steps, d.image_tokens)
    try:
        ts_ref, sg_ref = diffusers_schedule(json.loads(Path(sched_cfg_path).read_text()), n_steps, d.image_tokens)
        ts_err = float(np.abs(ours.timesteps - ts_ref).max()) / 1000.0
        sg_err = float(np.abs(ours.sigmas - sg_ref).max())
        err = max(ts_err, sg_err)
        rep.add("reference", "scheduler", err <= SCHEDULE_MAX_ERR,
                f"{n_steps} steps vs diffusers' FlowMatchEulerDiscreteScheduler ({sched_cfg_path}): max timestep "
                f"err {ts_err * 1000:.3g}, sigma err {sg_err:.3g}" + (
                    f"; ours {np.round(ours.timesteps, 2).tolist()} vs {np.round(ts_ref, 2).tolist()}"
                    if err > SCHEDULE_MAX_ERR else ""), size=size, max_err=err)
    except ImportError as e:
        rep.add("reference", "scheduler", True, f"not checked: {e.name} not installed", size=size)


def check_pieces_on_chip(rep: Report, ms, man, z: SizeView, R, prompt: str, seed: int, guidance: float,
                         pieces: str | None, say, text: tuple | None = None) -> tuple:
    """4. Every piece of size `z` that is checked there (z.own; those matching `pieces` if
    given) on real activations chained on the chip against the reference fed the same inputs
    (check_piece); the drift along the chain goes to the report's info. `text`: what the first
    size's call returned, so a further size reuses the text encoders' outputs (chip and clean
    reference) instead of running them again. Returns that for the next size."""
    specs = man.specs
    at = f" at {z.label}" if z.label else ""
    say(f"pieces{at}: {len(z.own)} pieces chained on the chip simulator (" +
        ("prompt -> text encoders -> " if text is None else "the text encoders' outputs -> ") +
        "one transformer call -> VAE)")
    t0 = time.perf_counter()
    chip_run = piece_chain(ms, man, prompt, seed, guidance, on_piece=lambda n: say(f"  chip: {n}"),
                           encoded=None if text is None else text[0])
    say(f"  chip chain {time.perf_counter() - t0:.1f} s; reference per hop and clean chain ...")
    t0 = time.perf_counter()
    text_clean = None if text is None else text[1]
    if R is not None:
        hop_ref, clean_ref = torch_reference(R if not z.label else Reference(R.models, man.dims), man, chip_run,
                                             guidance, text_clean)
    else:
        hop_ref, clean_ref = onnx_reference(man, chip_run, guidance, seed, prompt, text_clean)
    say(f"  reference {time.perf_counter() - t0:.1f} s")
    for s in specs:
        if s.name not in z.own or (pieces and not fnmatch.fnmatch(s.name, pieces)):
            continue
        c = check_piece(rep, s, z.built[s.name], chip_run["calls"][s.name], hop_ref[s.name], clean_ref[s.name],
                        z.tag(s.name))
        say(f"  {c.label:<28} {'ok  ' if c.ok else 'FAIL'} {c.detail}")
    # drift along the chain (reported; the per-hop checks above decide)
    drift = chain_drift([s for s in specs if s.name in chip_run["calls"]], chip_run, clean_ref)
    if text is None:
        rep.info["drift_cosine"] = drift
    else:
        rep.info.setdefault("drift_cosine_by_size", {})[z.label] = drift
    if pieces:
        rep.info["pieces_only"] = pieces
    if text is not None:
        return text
    kinds = {s.kind: s.name for s in specs}
    return ((chip_run["pooled"], chip_run["t5"]),
            {"clip_tail": clean_ref[kinds["clip_tail"]], "t5_tail": clean_ref[kinds["t5_tail"]]})


def check_pieces_on_cluster(rep: Report, man, rec, R, prompt: str, seed: int, guidance: float, pieces: str | None,
                            cluster: str, exp: Path, say) -> None:
    """4. with --cluster: every piece (those matching `pieces`) as one Ray task on the chip
    simulator, fed the reference chain's inputs (the exported ONNX pieces chained on the
    prompt), judged by check_piece against the reference fed the same inputs. Each check
    records the node it ran on and its wall time (fluxc/cluster/verify.py)."""
    from fluxc.cluster.verify import run_pieces  # deferred: Ray is an optional extra

    t0 = time.perf_counter()
    ox = open_onnx(man)
    try:
        chain = piece_chain(ox, man, prompt, seed, guidance)
    finally:
        ox.close()
    if R is not None:
        hop_ref, clean_ref = torch_reference(R, man, chain, guidance)
    else:
        hop_ref = clean_ref = {k: v[1] for k, v in chain["calls"].items()}
    say(f"pieces: inputs from the ONNX chain and the reference's outputs in {time.perf_counter() - t0:.1f} s; "
        f"each piece on the simulator as a cluster task")
    feeds = {s.name: chain["calls"][s.name][0] for s in man.specs if not pieces or fnmatch.fnmatch(s.name, pieces)}
    got = run_pieces(cluster, rec, man.specs, exp, feeds, say)
    built = {p.spec.name: p for p in rec.pieces}
    where = {}
    for s in man.specs:
        if s.name not in feeds:
            continue
        r = got[s.name]
        node = r.get("node") or {}
        where[s.name] = {"node_id": node.get("node_id"), "ip": node.get("ip"), "host": node.get("host"),
                         "wall_s": r.get("wall_s"), "forward_s": r.get("forward_s")}
        if "outputs" not in r:
            rep.add("piece", s.name, False, r["error"].splitlines()[0], **where[s.name])
            continue
        c = check_piece(rep, s, built[s.name], (feeds[s.name], r["outputs"]), hop_ref[s.name], clean_ref[s.name])
        c.metrics.update(where[s.name])
        c.detail += f" (node {node.get('ip')} {str(node.get('node_id'))[:8]}, {r['wall_s']:.1f} s)"
    rep.info["cluster"] = {"address": cluster, "pieces": where,
                           "inputs": "the exported ONNX pieces chained on the prompt (each piece checked alone)"}
    if pieces:
        rep.info["pieces_only"] = pieces


def chain_drift(specs, chip_run: dict, clean_ref: dict) -> dict[str, float]:
    """Per piece: cosine of its last output on the chip chain against the clean reference chain."""
    drift = {}
    for s in specs:
        o = s.outputs[-1].name
        drift[s.name] = round(cosine(clean_ref[s.name][o], chip_run["calls"][s.name][1][o]), 6)
    return drift


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", module="diffusers")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # deferred: transformers and diffusers are heavy, and only a source-checkpoint reference needs them
        from transformers.utils import logging as tl

        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    try:
        from diffusers.utils import logging as dl

        dl.set_verbosity_error()
        dl.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def end_to_end(rep: Report, man, ms, R, q: str, steps: int, seed: int, prompt: str, guidance: float, say,
               size: str = "", image: bool = False) -> None:
    """`steps` of generation on the chip against the reference; image=True: img2img from
    verify_image() at VERIFY_STRENGTH (diffusers' FluxImg2ImgPipeline)."""
    d = man.dims
    at = f" at {size}" if size else ""
    img_kw = dict(image=verify_image(d.width, d.height), strength=VERIFY_STRENGTH) if image else {}
    name = f"{steps}-step img2img (strength {VERIFY_STRENGTH})" if image else f"{steps}-step generation"
    say(f"end to end{at}: {name} on the chip simulator ...")
    t0 = time.perf_counter()
    got = FluxPipeline(ms, man)(prompt, None, steps, guidance, seed,
                                on_step=lambda i, n: say(f"  chip step {i}/{n}"), **img_kw)
    t1 = time.perf_counter()
    if R is not None:
        what = "diffusers FluxImg2ImgPipeline" if image else "diffusers FluxPipeline"
        say(f"end to end: {name} of {what} (torch, float32) ...")
        if image:
            lat, img = diffusers_img2img(R.models, d, img_kw["image"], VERIFY_STRENGTH, prompt, steps, guidance,
                                         seed)
        else:
            lat, img = diffusers_generate(R.models, man.dims, prompt, steps, guidance, seed)
    else:
        say(f"end to end: {name} on the ONNX pieces (source checkpoint not at hand) ...")
        ox = open_onnx(man)
        r = FluxPipeline(ox, man)(prompt, None, steps, guidance, seed, **img_kw)
        ox.close()
        lat, img = r.latents, r.image
        what = "ONNX pieces"
    t2 = time.perf_counter()
    lat_cos = cosine(lat, got.latents)
    lat_rel = rel_err(lat, got.latents)
    p = psnr(img, got.image)
    ok = lat_cos >= E2E_LATENT_COSINE[q] and p >= E2E_PSNR_DB[q]
    rep.add("e2e", name, ok,
            f"vs {what}: latent cosine {lat_cos:.5f} (>= {E2E_LATENT_COSINE[q]}), rel. error {lat_rel:.4f}, "
            f"image PSNR {p:.2f} dB (>= {E2E_PSNR_DB[q]})",
            size=size, latent_cosine=round(lat_cos, 6), latent_rel_err=round(lat_rel, 6), psnr_db=round(p, 3),
            chip_s=round(t1 - t0, 2), reference_s=round(t2 - t1, 2), steps=steps, seed=seed, prompt=prompt,
            reference=what)
