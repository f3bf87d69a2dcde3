"""Several image sizes in one export (issue 11): the first size is the export as ever; each further
size gets res/<WIDTHxHEIGHT>/ with only the pieces whose spec differs at that size."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxc.export.checkpoint import Checkpoint
from fluxc.export.dims import size_label
from fluxc.export.keys import piece_key
from fluxc.export.piece_export import export_pieces
from fluxc.export.side_files import rotary_bytes, write_bytes_if_changed
from fluxc.export.weights import prune_unused
from fluxc.specs import FluxDims, PieceSpec, piece_specs

if TYPE_CHECKING:  # the options and result types live with the driver, which imports this module
    from fluxc.export.driver import ExportOptions, ExportResult

SIZES_DIR = "res"


def size_dir(height: int, width: int) -> str:
    return f"{SIZES_DIR}/{size_label(height, width)}"


def size_specs(dims: FluxDims, height: int, width: int, base: list[PieceSpec]) -> list[PieceSpec]:
    """The pieces of the export at (height, width) whose spec differs from the first size's."""
    d = dataclasses.replace(dims, height=height, width=width)
    first = {s.name: s for s in base}
    return [s for s in piece_specs(d) if first.get(s.name) != s]


def export_sizes(opts: ExportOptions, ckpt: Checkpoint, dims: FluxDims, extra: list, out: Path, old: dict | None,
                  code: str, versions, advance, on_piece, result: ExportResult) -> list[dict[str, Any]] | None:
    """Export every further size into res/<WxH>/; the manifest's "resolutions" list (None for a
    one-size export). Folders of sizes no longer asked for are removed."""
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
        plan = [(spec, piece_key(spec, spec.component, list(spec.parts), ckpt, code, versions)) for spec in specs]
        entries = export_pieces(plan, d, ckpt, sout, old_e, advance, on_piece, result,
                                tag=lambda name: f"{name} @{size_label(h, w)}")
        write_bytes_if_changed(sout / "rotary_emb.npy", rotary_bytes(d, ckpt.configs["transformer"]))
        keep = {e["file"] for e in entries} | {e["external_data"] for e in entries if e.get("external_data")}
        for p in sout.glob("*.onnx*"):
            if p.name not in keep:
                p.unlink()
        prune_unused(sout, {loc for e in entries for loc in e.get("weight_files", [])})
        rows.append({"size": size_label(h, w), "height": h, "width": w, "dir": sdir, "rotary_emb": "rotary_emb.npy",
                     "pieces": entries})
    return rows
