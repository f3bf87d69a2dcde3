"""The `fluxc export` driver: checkpoint -> one ONNX file per piece + manifest.json.

Order of work:
1. resolve MODEL (local folder or Hub id) and the tiny VAE; validate everything that can be
   validated without loading weights (configs, safetensors headers, resolution, out folder);
2. plan: a content key per piece (piece spec, component config, the identity of the
   tensors it reads, fluxc's export code, library versions); a piece whose key and ONNX
   sha256 match the existing manifest is reused, the others are exported;
3. if anything changes, the old manifest is first re-written with "complete": false;
4. pieces are exported one at a time: the component model lives on the meta device, only
   the piece's tensors are loaded (float32), exported, checked and released;
5. side files (tokenizers, rotary table, VAE and scheduler configs) are synced;
6. manifest.json is written last, atomically, with "complete": true.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fluxc.errors import FluxcError
from fluxc.export import manifest as mf
from fluxc.export.checkpoint import TINY_VAE_PATTERNS, Checkpoint, describe_source, same_model, source_record
from fluxc.export.dims import build_dims, check_resolution, size_label
from fluxc.export.keys import code_hash, entry_ok, piece_key
from fluxc.export.lora import fuse_loras
from fluxc.export.onnx_io import clean_stale_temps
from fluxc.export.piece_export import export_pieces
from fluxc.export.probes import export_probes, probe_specs, want_probe
from fluxc.export.progress import progress
from fluxc.export.side_files import sync_side_files
from fluxc.export.sizes import export_sizes, size_specs
from fluxc.export.source import HUB_IDS, detect_flux_type, resolve
from fluxc.export.weights import prune_unused
from fluxc.specs import FLUX_TYPES, FluxDims, PieceSpec, piece_specs
from fluxc.versions import library_versions
from fluxc.workspace import export_dir, models_dir


@dataclass
class ExportOptions:
    model: str | None = None
    out: Path | None = None
    models: Path | None = None
    flux_type: str | None = None
    height: int = 1024
    width: int = 1024
    t5_len: int = 512
    tiny_vae: str | None = None
    force: bool = False
    probe: bool | None = None  # also export probe pieces (None: when the image is above PROBE_AUTO_TOKENS)
    loras: list = field(default_factory=list)  # --lora FILE[:SCALE] strings or LoraArg (fluxc.export.lora)
    # --resolution: (height, width) per image size of the build, the first one = (height, width);
    # None: the one size (height, width)
    resolutions: list[tuple[int, int]] | None = None
    image_input: bool = False  # also export the VAE encoder (img2img; issue 19)
    reference_size: tuple[int, int] | None = None  # Kontext: (height, width) of the reference image

    def sizes(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = [(self.height, self.width)]
        for hw in self.resolutions or []:
            hw = (int(hw[0]), int(hw[1]))
            if hw not in out:
                out.append(hw)
        return out


@dataclass
class ExportResult:
    export_dir: Path
    exported: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0
    piece_seconds: dict[str, float] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)  # exported through torch (the others were rebound)
    probes: int = 0  # probe pieces in probe/ (exported or unchanged)
    sizes: list[str] = field(default_factory=list)  # WIDTHxHEIGHT of every image size of the export


def resolve_inputs(opts: ExportOptions) -> tuple[Checkpoint, str, FluxDims, Path]:
    if opts.flux_type is not None and opts.flux_type not in FLUX_TYPES:
        raise FluxcError(f"--flux-type {opts.flux_type!r} is unknown; use dev, schnell or kontext")
    if opts.resolutions and (int(opts.resolutions[0][0]), int(opts.resolutions[0][1])) != (opts.height, opts.width):
        raise ValueError("ExportOptions: resolutions[0] must be (height, width)")
    for h, w in opts.sizes():
        check_resolution(h, w)
    model = opts.model or HUB_IDS[opts.flux_type or "schnell"]
    source = resolve(model, what="model")
    tiny = resolve(opts.tiny_vae, what="tiny VAE", patterns=TINY_VAE_PATTERNS) if opts.tiny_vae else None
    ckpt = Checkpoint(source, tiny)
    flux_type = detect_flux_type(ckpt.configs["transformer"], opts.flux_type, ckpt.folder)
    dims = build_dims(flux_type=flux_type, height=opts.height, width=opts.width, t5_len=opts.t5_len,
                      transformer=ckpt.configs["transformer"], clip=ckpt.configs["text_encoder"],
                      t5=ckpt.configs["text_encoder_2"], vae=ckpt.configs["vae"],
                      tiny_vae=ckpt.configs.get("tiny_vae"), image_input=opts.image_input,
                      reference_size=opts.reference_size)
    if dims.kontext and len(opts.sizes()) > 1:
        raise FluxcError("several --resolution sizes are not supported for FLUX.1 Kontext yet; export one size")
    if opts.out is not None:
        out = Path(opts.out)
    else:
        out = export_dir(models_dir(opts.models))
    if out.exists() and not out.is_dir():
        raise FluxcError(f"--out {out} is a file; give a folder")
    return ckpt, flux_type, dims, out


def run_export(opts: ExportOptions, *, show_progress: bool = True,
               on_piece: Callable[[PieceSpec, Any, Path], None] | None = None) -> ExportResult:
    """Run a whole export. `on_piece(spec, module, onnx_path)` is called right after each
    newly exported piece, while its weights are still loaded (parity checks)."""
    t0 = time.time()
    ckpt, flux_type, dims, out = resolve_inputs(opts)
    specs = piece_specs(dims)
    source_rec = source_record(ckpt)
    old = mf.read_manifest_json(out)
    if old is not None and old.get("source") and not same_model(old["source"], source_rec) and not opts.force:
        raise FluxcError(f"{out} holds an export of another model ({describe_source(old['source'])}); "
                         f"pass --force to replace it or choose another --out")
    old_entries = {} if (old is None or opts.force) else {e.get("name"): e for e in old.get("pieces", [])}

    versions = library_versions()
    code = code_hash()
    # LoRA hook (fluxc.export.lora): the tensors the LoRAs touch are fused into a file of the
    # export and ckpt.stores point at it, so the touched pieces' keys and weights follow.
    lora_records = fuse_loras(opts.loras, ckpt, out)

    plan: list[tuple[PieceSpec, str, list[str]]] = []
    for spec in specs:
        comp = spec.component
        prefixes = list(spec.parts)
        plan.append((spec, piece_key(spec, comp, prefixes, ckpt, code, versions), prefixes))
    todo = [s.name for s, k, _ in plan if not entry_ok(out, old_entries.get(s.name), k)]

    out.mkdir(parents=True, exist_ok=True)
    options = {"flux_type": flux_type, "height": opts.height, "width": opts.width, "t5_seq_len": opts.t5_len,
               "tiny_vae": opts.tiny_vae, "probe": opts.probe}
    if lora_records:
        options["lora"] = lora_records
    if opts.image_input:
        options["image_input"] = True
    if dims.kontext:
        options["reference_size"] = size_label(dims.ref_height, dims.ref_width)
    if len(opts.sizes()) > 1:
        options["resolutions"] = [size_label(h, w) for h, w in opts.sizes()]
    if old is not None and (todo or old.get("complete") is not True) and (out / mf.MANIFEST).exists():
        # From here on the folder may change: never leave a manifest a later run would trust.
        mf.mark_incomplete(out, old)

    result = ExportResult(out)
    clean_stale_temps(out)
    extra = [(h, w, size_specs(dims, h, w, specs)) for h, w in opts.sizes()[1:]]
    total = len(plan) + sum(len(x[2]) for x in extra) + (len(probe_specs(dims)[1]) if want_probe(opts, dims) else 0)
    with progress(show_progress, total) as advance:
        entries = export_pieces([(s, k) for s, k, _ in plan], dims, ckpt, out, old_entries, advance, on_piece, result)
        probe = export_probes(opts, ckpt, dims, out, old, code, versions, advance)
        result.probes = len(probe["pieces"]) if probe else 0
        sizes = export_sizes(opts, ckpt, dims, extra, out, old, code, versions, advance, on_piece, result)
    result.sizes = [size_label(h, w) for h, w in opts.sizes()]

    files = sync_side_files(ckpt, dims, out)
    # Pieces of an earlier export that are not part of this one.
    keep = {s.file for s in specs} | {e["external_data"] for e in entries if e.get("external_data")}
    prune_unused(out, {loc for e in entries for loc in e.get("weight_files", [])})
    if old is not None:
        for e in old.get("pieces", []):
            for f in (e.get("file"), e.get("external_data")):
                if f and f not in keep and (out / f).is_file():
                    (out / f).unlink()

    mf.write_manifest(out, source=source_rec, options=options, versions=versions, dims=dims, files=files,
                      pieces=entries, probe=probe, resolutions=sizes)
    result.seconds = time.time() - t0
    return result
