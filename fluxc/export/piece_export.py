"""One piece to ONNX: traced through torch's exporter (its checkpoint tensors referenced in place),
or rebound from the first exported block of its kind (same graph, this block's tensors)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fluxc.errors import FluxcError
from fluxc.export.checkpoint import Checkpoint
from fluxc.export.keys import entry_ok
from fluxc.export.loading import materialize, release
from fluxc.export.onnx_io import export_piece, external_params, rebind_piece
from fluxc.export.weights import ref_for, refs_sha256
from fluxc.fsutil import sha256_file
from fluxc.specs import KINDS, FluxDims, PieceSpec

if TYPE_CHECKING:  # the result type lives with the driver, which imports this module
    from fluxc.export.driver import ExportResult

# torch and the piece wrappers (fluxc.export.pieces, which load torch) are imported where a piece is built

def build_piece(spec: PieceSpec, dims: FluxDims, ckpt: "Checkpoint"):
    """The wrapper module; its in-memory patches are undone by `unpatch` after export."""
    from fluxc.export import pieces

    return pieces.build_piece_module(spec, dims, ckpt.model(spec.component))


def unpatch(module) -> None:
    p = getattr(module, "fluxc_patcher", None)
    if p is not None:
        p.restore()


def weight_entry(out: Path, refs: dict) -> dict[str, Any]:
    return {"weights": {n: r.key for n, r in sorted(refs.items())},
            "weight_numel": sum(math.prod(r.shape) for r in refs.values()),
            "weight_files": sorted({r.location for r in refs.values()}),
            "weights_sha256": refs_sha256(out, refs)}


def export_one(spec: PieceSpec, dims: FluxDims, ckpt: Checkpoint, out: Path, prefixes: list[str],
                on_piece) -> dict[str, Any]:
    """Trace the piece through torch's exporter; its checkpoint tensors are referenced in place."""
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
            free = None if on_piece is not None else (lambda: free_piece(model, prefixes, module))
            written = export_piece(module, spec, out, release=free, weight_refs=refs)
            if on_piece is not None:
                on_piece(spec, module, out / spec.file)
        finally:
            unpatch(module)
            del module
    finally:
        release(model, prefixes)
    import onnx

    used = external_params(onnx.load(str(out / spec.file), load_external_data=False))
    refs = {n: r for n, r in refs.items() if n in used}  # parameters the graph does not use are dropped
    e: dict[str, Any] = {"file": spec.file, "sha256": sha256_file(out / spec.file), **weight_entry(out, refs)}
    if len(written) > 1:
        e["external_data"] = written[1]
        e["external_sha256"] = sha256_file(out / written[1])
    return e


def remember_template(spec: PieceSpec, entry: dict[str, Any], templates: dict) -> None:
    kind = spec.kind
    if KINDS[kind].repeated and kind not in templates and entry.get("weights") and not entry.get("external_data"):
        templates[kind] = (spec, dict(entry["weights"]))


def rebind(spec: PieceSpec, dims: FluxDims, ckpt: Checkpoint, out: Path, templates: dict,
            on_piece) -> dict[str, Any] | None:
    """The piece written from the first exported block of its kind (same graph, this block's
    tensors), or None when that is not possible (first of its kind, other tensor names,
    dtypes or shapes): then it is traced."""
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
    return {"file": spec.file, "sha256": sha256_file(out / spec.file), **weight_entry(out, refs)}


def free_piece(model, prefixes, module) -> None:
    """Drop the piece's weights: the component's (back to meta) and any the wrapper owns."""
    import torch
    from torch import nn

    release(model, prefixes)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def export_pieces(plan: list[tuple[PieceSpec, str]], dims: FluxDims, ckpt: Checkpoint, out: Path,
                  old_entries: dict[str, dict[str, Any]], advance, on_piece, result: "ExportResult",
                  tag: Callable[[str], str] = str) -> list[dict[str, Any]]:
    """Each planned (spec, content key) into `out`: kept when its old entry and files are intact,
    else rebound from the first block of its kind exported here, else traced. The manifest
    entries, in plan order; what was done is added to `result` (under `tag(name)`)."""
    templates: dict[str, tuple[PieceSpec, dict[str, str]]] = {}  # repeated kind -> first block here
    entries = []
    for spec, key in plan:
        label = tag(spec.name)
        old = old_entries.get(spec.name)
        if entry_ok(out, old, key):
            e = {**old, **spec.to_dict()}
            entries.append(e)
            remember_template(spec, e, templates)
            result.reused.append(label)
            advance(f"{label} (unchanged)")
            continue
        tp = time.time()
        advance(label, start=True)
        e = rebind(spec, dims, ckpt, out, templates, on_piece)
        if e is None:
            e = export_one(spec, dims, ckpt, out, list(spec.parts), on_piece)
            result.traced.append(label)
        e.update({**spec.to_dict(), "key": key})
        remember_template(spec, e, templates)
        entries.append(e)
        result.exported.append(label)
        result.piece_seconds[label] = time.time() - tp
        advance(f"{label} exported", done=True)
    return entries
