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

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fluxc.errors import FluxcError
from fluxc.export import manifest as mf
from fluxc.export.dims import build_dims, check_resolution, size_label
from fluxc.export.source import (HUB_IDS, Source, WeightStore, check_flux_folder, detect_flux_type, model_revision,
                                 read_json, resolve)
from fluxc.fsutil import atomic_path, sha256_file, sha256_json, write_json_atomic
from fluxc.specs import FLUX_TYPES, KINDS, FluxDims, PieceSpec, piece_specs

TINY_VAE_PATTERNS = ["config.json", "*.safetensors"]


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


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fluxc", "torch", "diffusers", "transformers", "onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def code_hash() -> str:
    """Hash of the code that shapes the exported graphs (wrappers, patches, ONNX writer)."""
    import fluxc.export as ex
    import fluxc.patches as pa

    h = hashlib.sha256()
    files = [Path(ex.__file__).parent / n for n in ("pieces.py", "onnx_io.py", "loading.py", "weights.py")]
    files += sorted(Path(pa.__file__).parent.glob("*.py"))
    for p in files:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The checkpoint: configs, weight stores, meta models

class Checkpoint:
    def __init__(self, source: Source, tiny: Source | None):
        self.source, self.tiny = source, tiny
        folder = source.folder
        check_flux_folder(folder)
        self.folder = folder
        self.configs: dict[str, dict[str, Any]] = {
            c: read_json(folder / c / "config.json", f"{c} config")
            for c in ("transformer", "text_encoder", "text_encoder_2", "vae")
        }
        self.component_folders = {c: folder / c for c in self.configs}
        if tiny is not None:
            cfg_path = tiny.folder / "config.json"
            if not cfg_path.is_file() and (tiny.folder / "tiny_vae" / "config.json").is_file():
                tiny.folder = tiny.folder / "tiny_vae"
                cfg_path = tiny.folder / "config.json"
            if not cfg_path.is_file():
                raise FluxcError(f"--tiny-vae {tiny.model}: no config.json there; give an AutoencoderTiny folder "
                                 f"(e.g. madebyollin/taef1)")
            tcfg = read_json(cfg_path, "tiny VAE config")
            if tcfg.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
                raise FluxcError(f"--tiny-vae {tiny.model} is a {tcfg.get('_class_name')}, not an AutoencoderTiny")
            self.configs["tiny_vae"] = tcfg
            self.component_folders["tiny_vae"] = tiny.folder
        # Opening the stores reads only the safetensors headers; it validates every file.
        self.stores = {c: WeightStore.open(f, c) for c, f in self.component_folders.items()}
        self._models: dict[str, Any] = {}

    def revision(self) -> str:
        return self.source.revision or model_revision(self.folder, {c: self.stores[c] for c in
                                                                    ("transformer", "text_encoder",
                                                                     "text_encoder_2", "vae")})

    def model(self, component: str):
        """The component's model with every parameter on the meta device (built once)."""
        if component not in self._models:
            from fluxc.export.loading import build_on_meta

            self._models[component] = build_on_meta(lambda: _construct(component, self.configs[component],
                                                                       self.component_folders[component]))
        return self._models[component]


def _construct(component: str, cfg: dict[str, Any], folder: Path):
    if component == "transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(cfg)
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(cfg)
    if component == "tiny_vae":
        from diffusers import AutoencoderTiny

        return AutoencoderTiny.from_config(cfg)
    if component == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder)))
    if component == "text_encoder_2":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config.from_pretrained(str(folder)))
    raise ValueError(component)


# ---------------------------------------------------------------------------------------------
# The piece wrappers (fluxc.export.pieces, written separately): the only coupling point.
# A piece's component (checkpoint subfolder) and weight prefixes are its kind's (fluxc.specs.KINDS).

def build_piece(spec: PieceSpec, dims: FluxDims, ckpt: "Checkpoint"):
    """The wrapper module; its in-memory patches are undone by `unpatch` after export."""
    from fluxc.export import pieces

    return pieces.build_piece_module(spec, dims, ckpt.model(spec.component))


def unpatch(module) -> None:
    p = getattr(module, "fluxc_patcher", None)
    if p is not None:
        p.restore()


# ---------------------------------------------------------------------------------------------

def resolve_inputs(opts: ExportOptions) -> tuple[Checkpoint, str, FluxDims, Path]:
    if opts.flux_type is not None and opts.flux_type not in FLUX_TYPES:
        raise FluxcError(f"--flux-type {opts.flux_type!r} is unknown; use dev or schnell")
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
                      tiny_vae=ckpt.configs.get("tiny_vae"))
    if opts.out is not None:
        out = Path(opts.out)
    else:
        from fluxc.workspace import export_dir, models_dir

        out = export_dir(models_dir(opts.models))
    if out.exists() and not out.is_dir():
        raise FluxcError(f"--out {out} is a file; give a folder")
    return ckpt, flux_type, dims, out


def _source_record(ckpt: Checkpoint) -> dict[str, Any]:
    s = ckpt.source
    rec = {"model": s.model, "kind": s.kind, "path": str(ckpt.folder) if s.kind == "local" else None,
           "revision": ckpt.revision()}
    if ckpt.tiny is not None:
        t = ckpt.tiny
        rec["tiny_vae"] = {"model": t.model, "kind": t.kind, "path": str(t.folder) if t.kind == "local" else None,
                           "revision": t.revision or "sha256:" + ckpt.stores["tiny_vae"].identity()[:32]}
    return rec


def _same_model(old: dict[str, Any], new: dict[str, Any]) -> bool:
    if old.get("kind") != new.get("kind"):
        return False
    if new.get("kind") == "local":
        return old.get("path") == new.get("path")
    return old.get("model") == new.get("model")


def _describe(src: dict[str, Any]) -> str:
    return str(src.get("path") or src.get("model"))


def _entry_ok(out: Path, entry: dict[str, Any] | None, key: str) -> bool:
    if not entry or entry.get("key") != key:
        return False
    f = out / entry.get("file", "")
    if not f.is_file() or sha256_file(f) != entry.get("sha256"):
        return False
    if any(not (out / loc).is_file() for loc in entry.get("weight_files", [])):
        return False
    data = entry.get("external_data")
    if data:
        d = out / data
        if not d.is_file() or sha256_file(d) != entry.get("external_sha256"):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Side files: written only when their content changes.

def _write_bytes_if_changed(dst: Path, data: bytes) -> bool:
    if dst.is_file() and dst.read_bytes() == data:
        return False
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
    return True


def _sync_tree(src: Path, dst: Path) -> bool:
    def listing(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    want = listing(src)
    if dst.is_dir() and listing(dst) == want:
        return False
    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp)
    return True


def _rotary_bytes(dims: FluxDims, transformer_cfg: dict[str, Any]) -> bytes:
    import io

    import numpy as np

    from fluxc.patches.rotary import rotary_table

    axes = transformer_cfg.get("axes_dims_rope", (16, 56, 56))
    table = np.ascontiguousarray(rotary_table(dims, axes_dims=tuple(int(a) for a in axes)), dtype=np.float32)
    if table.shape != dims.rotary_shape:
        raise FluxcError(f"rotary table shape {table.shape} differs from {dims.rotary_shape} (bug)")
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    return buf.getvalue()


def _sync_side_files(ckpt: Checkpoint, dims: FluxDims, out: Path) -> dict[str, str]:
    folder = ckpt.folder
    files = {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2", "rotary_emb": "rotary_emb.npy",
             "vae_config": "vae_config.json", "scheduler_config": "scheduler/scheduler_config.json"}
    for tok in ("tokenizer", "tokenizer_2"):
        _sync_tree(folder / tok, out / tok)
    _write_bytes_if_changed(out / files["rotary_emb"], _rotary_bytes(dims, ckpt.configs["transformer"]))
    _write_bytes_if_changed(out / files["vae_config"], (folder / "vae" / "config.json").read_bytes())
    if "tiny_vae" in ckpt.configs:
        files["tiny_vae_config"] = "tiny_vae_config.json"
        _write_bytes_if_changed(out / files["tiny_vae_config"],
                                (ckpt.component_folders["tiny_vae"] / "config.json").read_bytes())
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise FluxcError(f"{folder} is not a complete FLUX.1 checkpoint (scheduler/scheduler_config.json is missing)")
    _write_bytes_if_changed(out / files["scheduler_config"], sched.read_bytes())
    return files


# ---------------------------------------------------------------------------------------------

def run_export(opts: ExportOptions, *, show_progress: bool = True,
               on_piece: Callable[[PieceSpec, Any, Path], None] | None = None) -> ExportResult:
    """Run a whole export. `on_piece(spec, module, onnx_path)` is called right after each
    newly exported piece, while its weights are still loaded (parity checks)."""
    t0 = time.time()
    ckpt, flux_type, dims, out = resolve_inputs(opts)
    specs = piece_specs(dims)
    source_rec = _source_record(ckpt)
    old = mf.read_manifest_json(out)
    if old is not None and old.get("source") and not _same_model(old["source"], source_rec) and not opts.force:
        raise FluxcError(f"{out} holds an export of another model ({_describe(old['source'])}); "
                         f"pass --force to replace it or choose another --out")
    old_entries = {} if (old is None or opts.force) else {e.get("name"): e for e in old.get("pieces", [])}

    versions = library_versions()
    code = code_hash()
    # LoRA hook (fluxc.export.lora): the tensors the LoRAs touch are fused into a file of the
    # export and ckpt.stores point at it, so the touched pieces' keys and weights follow.
    from fluxc.export.lora import fuse_loras

    lora_records = fuse_loras(opts.loras, ckpt, out)

    plan: list[tuple[PieceSpec, str, list[str]]] = []
    for spec in specs:
        comp = spec.component
        prefixes = list(spec.parts)
        plan.append((spec, _piece_key(spec, comp, prefixes, ckpt, code, versions), prefixes))
    todo = [s.name for s, k, _ in plan if not _entry_ok(out, old_entries.get(s.name), k)]

    out.mkdir(parents=True, exist_ok=True)
    options = {"flux_type": flux_type, "height": opts.height, "width": opts.width, "t5_seq_len": opts.t5_len,
               "tiny_vae": opts.tiny_vae, "probe": opts.probe}
    if lora_records:
        options["lora"] = lora_records
    if len(opts.sizes()) > 1:
        options["resolutions"] = [size_label(h, w) for h, w in opts.sizes()]
    if old is not None and (todo or old.get("complete") is not True) and (out / mf.MANIFEST).exists():
        # From here on the folder may change: never leave a manifest a later run would trust.
        write_json_atomic(out / mf.MANIFEST, {**old, "complete": False})

    result = ExportResult(out)
    entries: list[dict[str, Any]] = []
    from fluxc.export.loading import release
    from fluxc.export.onnx_io import clean_stale_temps, export_piece

    clean_stale_temps(out)
    templates: dict[str, tuple[PieceSpec, dict[str, str]]] = {}  # repeated kind -> first block exported

    extra = [(h, w, _size_specs(dims, h, w, specs)) for h, w in opts.sizes()[1:]]
    total = len(plan) + sum(len(x[2]) for x in extra) + (len(probe_specs(dims)[1]) if _want_probe(opts, dims) else 0)
    with _progress(show_progress, total) as advance:
        for spec, key, prefixes in plan:
            comp = spec.component
            if spec.name not in todo:
                e = dict(old_entries[spec.name])
                e.update(spec.to_dict())
                entries.append(e)
                _remember_template(spec, e, templates)
                result.reused.append(spec.name)
                advance(f"{spec.name} (unchanged)")
                continue
            tp = time.time()
            advance(f"{spec.name}", start=True)
            e = _rebind(spec, dims, ckpt, out, templates, on_piece)
            if e is None:
                e = _export_one(spec, dims, ckpt, out, prefixes, on_piece)
                result.traced.append(spec.name)
            e.update({**spec.to_dict(), "key": key})
            _remember_template(spec, e, templates)
            entries.append(e)
            result.exported.append(spec.name)
            result.piece_seconds[spec.name] = time.time() - tp
            advance(f"{spec.name} exported", done=True)

        probe = _export_probes(opts, ckpt, dims, out, old, code, versions, advance)
        result.probes = len(probe["pieces"]) if probe else 0
        sizes = _export_sizes(opts, ckpt, dims, extra, out, old, code, versions, advance, on_piece, result)
    result.sizes = [size_label(h, w) for h, w in opts.sizes()]

    files = _sync_side_files(ckpt, dims, out)
    # Pieces of an earlier export that are not part of this one.
    keep = {s.file for s in specs} | {e["external_data"] for e in entries if e.get("external_data")}
    from fluxc.export.weights import prune_unused

    prune_unused(out, {loc for e in entries for loc in e.get("weight_files", [])})
    if old is not None:
        for e in old.get("pieces", []):
            for f in (e.get("file"), e.get("external_data")):
                if f and f not in keep and (out / f).is_file():
                    (out / f).unlink()

    manifest = {"format": mf.FORMAT, "complete": True, "source": source_rec, "options": options,
                "versions": versions, "dims": dims.to_dict(), "files": files, "pieces": entries}
    if probe is not None:
        manifest["probe"] = probe
    if sizes is not None:
        manifest["resolutions"] = sizes
    if mf.read_manifest_json(out) != manifest:
        write_json_atomic(out / mf.MANIFEST, manifest)
    result.seconds = time.time() - t0
    return result


# ---------------------------------------------------------------------------------------------
# One piece: traced through torch, or rebound from the first block of its kind



def _weight_entry(out: Path, refs: dict) -> dict[str, Any]:
    from fluxc.export.weights import refs_sha256

    import math

    return {"weights": {n: r.key for n, r in sorted(refs.items())},
            "weight_numel": sum(math.prod(r.shape) for r in refs.values()),
            "weight_files": sorted({r.location for r in refs.values()}),
            "weights_sha256": refs_sha256(out, refs)}


def _export_one(spec: PieceSpec, dims: FluxDims, ckpt: Checkpoint, out: Path, prefixes: list[str],
                on_piece) -> dict[str, Any]:
    """Trace the piece through torch's exporter; its checkpoint tensors are referenced in place."""
    from fluxc.export.loading import materialize, release
    from fluxc.export.onnx_io import export_piece
    from fluxc.export.weights import ref_for

    comp = spec.component
    model = ckpt.model(comp)
    try:
        names = materialize(model, prefixes, ckpt.stores[comp], comp)
        module = build_piece(spec, dims, ckpt)
        try:
            by_tensor = {p.data_ptr(): full for full, p in model.named_parameters(remove_duplicate=False)
                         if p.device.type != "meta"}
            refs = {}
            for wname, p in module.named_parameters(remove_duplicate=False):
                full = by_tensor.get(p.data_ptr())
                if full is not None and full in names:
                    r = ref_for(ckpt.stores[comp], names[full], out, comp)
                    if r is not None:
                        refs[wname] = r
            # without a callback the weights are freed before the ONNX post-processing
            free = None if on_piece is not None else (lambda: _free(model, prefixes, module))
            written = export_piece(module, spec, out, release=free, weight_refs=refs)
            if on_piece is not None:
                on_piece(spec, module, out / spec.file)
        finally:
            unpatch(module)
            del module
    finally:
        release(model, prefixes)
    import onnx

    from fluxc.export.onnx_io import external_params

    used = external_params(onnx.load(str(out / spec.file), load_external_data=False))
    refs = {n: r for n, r in refs.items() if n in used}  # parameters the graph does not use are dropped
    e: dict[str, Any] = {"file": spec.file, "sha256": sha256_file(out / spec.file), **_weight_entry(out, refs)}
    if len(written) > 1:
        e["external_data"] = written[1]
        e["external_sha256"] = sha256_file(out / written[1])
    return e


def _remember_template(spec: PieceSpec, entry: dict[str, Any], templates: dict) -> None:
    kind = spec.kind
    if KINDS[kind].repeated and kind not in templates and entry.get("weights") and not entry.get("external_data"):
        templates[kind] = (spec, dict(entry["weights"]))


def _rebind(spec: PieceSpec, dims: FluxDims, ckpt: Checkpoint, out: Path, templates: dict,
            on_piece) -> dict[str, Any] | None:
    """The piece written from the first exported block of its kind (same graph, this block's
    tensors), or None when that is not possible (first of its kind, other tensor names,
    dtypes or shapes): then it is traced."""
    from fluxc.export.onnx_io import rebind_piece
    from fluxc.export.weights import ref_for

    kind = spec.kind
    if not KINDS[kind].repeated or kind not in templates:
        return None
    tspec, tkeys = templates[kind]
    if tspec.inputs != spec.inputs or tspec.outputs != spec.outputs:
        return None
    comp = spec.component
    store = ckpt.stores[comp]
    own_t, own = tspec.parts[0], spec.parts[0]
    refs = {}
    for wname, tkey in tkeys.items():
        key = tkey.replace(own_t, own, 1) if own_t in tkey else tkey
        if not store.has(key) or not store.has(tkey):
            return None
        a, b = store.info(key), store.info(tkey)
        if a["dtype"] != b["dtype"] or list(a["shape"]) != list(b["shape"]):
            return None
        r = ref_for(store, key, out, comp)
        if r is None:
            return None
        refs[wname] = r
    try:
        rebind_piece(out / tspec.file, spec, out, refs)
    except FluxcError:
        return None
    if on_piece is not None:  # tests: the rebound file against this block's torch module
        from fluxc.export.loading import materialize, release

        model = ckpt.model(comp)
        prefixes = list(spec.parts)
        try:
            materialize(model, prefixes, store, comp)
            module = build_piece(spec, dims, ckpt)
            try:
                on_piece(spec, module, out / spec.file)
            finally:
                unpatch(module)
        finally:
            release(model, prefixes)
    return {"file": spec.file, "sha256": sha256_file(out / spec.file), **_weight_entry(out, refs)}


def _piece_key(spec: PieceSpec, comp: str, prefixes: list[str], ckpt: Checkpoint, code: str, versions) -> str:
    from fluxc.export.loading import checkpoint_keys

    keys = checkpoint_keys(ckpt.model(comp), prefixes, ckpt.stores[comp], comp)
    return sha256_json({"spec": spec.to_dict(), "config": ckpt.configs[comp],
                        "weights": ckpt.stores[comp].fingerprint(keys), "code": code, "versions": versions})


# ---------------------------------------------------------------------------------------------
# Several image sizes in one export (issue 11): the first size is the export as ever (every piece
# at the top of the folder); each further size gets res/<WIDTHxHEIGHT>/ holding only the pieces
# whose spec differs at that size (transformer head, blocks and tail, VAE decoder: decided by
# comparing the specs, so no shape is written here) and its rotary table. The text encoders and
# any piece whose spec does not change are the top-level ones. The pieces reference the same
# checkpoint tensors (hard links), so a size adds graphs, not weights.

SIZES_DIR = "res"


def size_dir(height: int, width: int) -> str:
    return f"{SIZES_DIR}/{size_label(height, width)}"


def _size_specs(dims: FluxDims, height: int, width: int, base: list[PieceSpec]) -> list[PieceSpec]:
    """The pieces of the export at (height, width) whose spec differs from the first size's."""
    import dataclasses

    d = dataclasses.replace(dims, height=height, width=width)
    first = {s.name: s for s in base}
    return [s for s in piece_specs(d) if first.get(s.name) != s]


def _export_sizes(opts: ExportOptions, ckpt: Checkpoint, dims: FluxDims, extra: list, out: Path, old: dict | None,
                  code: str, versions, advance, on_piece, result: ExportResult) -> list[dict[str, Any]] | None:
    """Export every further size into res/<WxH>/; the manifest's "resolutions" list (None for a
    one-size export). Folders of sizes no longer asked for are removed."""
    import dataclasses

    from fluxc.export.weights import prune_unused

    root = out / SIZES_DIR
    want = {size_label(h, w) for h, w, _ in extra}
    if root.is_dir():
        for p in root.iterdir():
            if p.name not in want:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if not extra:
        if root.is_dir():
            shutil.rmtree(root)
        return None
    old_sizes = {} if (old is None or opts.force) else {
        r.get("size"): r for r in old.get("resolutions") or [] if isinstance(r, dict)}
    rows: list[dict[str, Any]] = [{"size": size_label(dims.height, dims.width), "height": dims.height,
                                   "width": dims.width, "dir": "", "pieces": []}]
    for h, w, specs in extra:
        d = dataclasses.replace(dims, height=h, width=w)
        sdir = size_dir(h, w)
        sout = out / sdir
        sout.mkdir(parents=True, exist_ok=True)
        old_e = {e.get("name"): e for e in (old_sizes.get(size_label(h, w)) or {}).get("pieces", [])}
        templates: dict[str, tuple[PieceSpec, dict[str, str]]] = {}  # this size's own first block per kind
        entries = []
        for spec in specs:
            comp = spec.component
            prefixes = list(spec.parts)
            key = _piece_key(spec, comp, prefixes, ckpt, code, versions)
            tag = f"{spec.name} @{size_label(h, w)}"
            if _entry_ok(sout, old_e.get(spec.name), key):
                e = {**old_e[spec.name], **spec.to_dict()}
                entries.append(e)
                _remember_template(spec, e, templates)
                result.reused.append(tag)
                advance(f"{tag} (unchanged)")
                continue
            tp = time.time()
            advance(tag, start=True)
            e = _rebind(spec, d, ckpt, sout, templates, on_piece)
            if e is None:
                e = _export_one(spec, d, ckpt, sout, prefixes, on_piece)
                result.traced.append(tag)
            e.update({**spec.to_dict(), "key": key})
            _remember_template(spec, e, templates)
            entries.append(e)
            result.exported.append(tag)
            result.piece_seconds[tag] = time.time() - tp
            advance(f"{tag} exported", done=True)
        _write_bytes_if_changed(sout / "rotary_emb.npy", _rotary_bytes(d, ckpt.configs["transformer"]))
        keep = {e["file"] for e in entries} | {e["external_data"] for e in entries if e.get("external_data")}
        for p in sout.glob("*.onnx*"):
            if p.name not in keep:
                p.unlink()
        prune_unused(sout, {loc for e in entries for loc in e.get("weight_files", [])})
        rows.append({"size": size_label(h, w), "height": h, "width": w, "dir": sdir, "rotary_emb": "rotary_emb.npy",
                     "pieces": entries})
    return rows


# ---------------------------------------------------------------------------------------------
# Probe pieces: one piece of each full-width kind at a small shape, same weights, so that the
# chip simulator can check the compiled weights and quantisation in bounded time (it needs more
# than 15 min for one full-size block). `fluxc compile` checks them when the export has them.

PROBE_DIR = "probe"
PROBE_HW = 128  # 64 image tokens
PROBE_T5 = 32
PROBE_AUTO_TOKENS = 1024  # probes by default above 512x512
PROBE_KINDS = ("t5_block", "transformer_head", "double_block", "single_block", "transformer_tail", "vae", "tiny_vae")


def probe_specs(dims: FluxDims) -> tuple[FluxDims, list[PieceSpec]]:
    """The probe dims and the first piece of each probed kind at those dims."""
    import dataclasses

    pdims = dataclasses.replace(dims, height=PROBE_HW, width=PROBE_HW, t5_len=min(PROBE_T5, dims.t5_len))
    seen, out = set(), []
    for s in piece_specs(pdims):
        k = s.kind
        if k in PROBE_KINDS and k not in seen:
            seen.add(k)
            out.append(s)
    return pdims, out


def _want_probe(opts: ExportOptions, dims: FluxDims) -> bool:
    if opts.probe is not None:
        return opts.probe
    return (dims.height // (2 * dims.vae_scale)) * (dims.width // (2 * dims.vae_scale)) > PROBE_AUTO_TOKENS


def _export_probes(opts: ExportOptions, ckpt: Checkpoint, dims: FluxDims, out: Path, old: dict | None,
                   code: str, versions, advance) -> dict[str, Any] | None:
    from fluxc.export.weights import prune_unused

    pout = out / PROBE_DIR
    if not _want_probe(opts, dims):
        if pout.exists():
            shutil.rmtree(pout)
        return None
    pdims, specs = probe_specs(dims)
    pout.mkdir(parents=True, exist_ok=True)
    old_e = {} if (old is None or opts.force) else {e.get("name"): e for e in (old.get("probe") or {}).get("pieces", [])}
    entries = []
    for spec in specs:
        comp = spec.component
        prefixes = list(spec.parts)
        key = _piece_key(spec, comp, prefixes, ckpt, code, versions)
        if _entry_ok(pout, old_e.get(spec.name), key):
            entries.append({**old_e[spec.name], **spec.to_dict()})
            advance(f"probe {spec.name} (unchanged)")
            continue
        advance(f"probe {spec.name}", start=True)
        e = _export_one(spec, pdims, ckpt, pout, prefixes, None)
        entries.append({**e, **spec.to_dict(), "key": key})
        advance(f"probe {spec.name} exported", done=True)
    keep = {e["file"] for e in entries}
    for p in pout.glob("*.onnx*"):
        if p.name not in keep:
            p.unlink()
    prune_unused(pout, {loc for e in entries for loc in e.get("weight_files", [])})
    return {"dims": pdims.to_dict(), "pieces": entries}


def _free(model, prefixes, module) -> None:
    """Drop the piece's weights: the component's (back to meta) and any the wrapper owns."""
    import torch
    from torch import nn

    from fluxc.export.loading import release

    release(model, prefixes)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


class _progress:
    """A rich progress bar over pieces (or nothing)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda *a, **k: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("{task.description}"), transient=False)
        self.p.__enter__()
        self.task = self.p.add_task("", total=self.total)

        def advance(desc: str, start: bool = False, done: bool = False):
            self.p.update(self.task, description=desc, advance=0 if start else 1)

        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False
