"""Probe pieces: one piece of each full-width kind at a small shape with the same weights, so the
chip simulator can check the compiled weights and quantisation of a full-size build in bounded time."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxc.export.checkpoint import Checkpoint
from fluxc.export.keys import entry_ok, piece_key
from fluxc.export.piece_export import export_one
from fluxc.export.weights import prune_unused
from fluxc.specs import FluxDims, PieceSpec, piece_specs

if TYPE_CHECKING:  # the options and result types live with the driver, which imports this module
    from fluxc.export.driver import ExportOptions

PROBE_DIR = "probe"


PROBE_HW = 128  # 64 image tokens


PROBE_T5 = 32


PROBE_AUTO_TOKENS = 1024  # probes by default above 512x512


# what is probed: these kinds, and the VAE decoder ("vae": the full or the tiny one, whichever the export has)
PROBE_KINDS = ("t5_block", "transformer_head", "double_block", "single_block", "transformer_tail", "vae")


def probe_specs(dims: FluxDims) -> tuple[FluxDims, list[PieceSpec]]:
    """The probe dims and the first piece of each probed kind at those dims."""
    pdims = dataclasses.replace(dims, height=PROBE_HW, width=PROBE_HW, t5_len=min(PROBE_T5, dims.t5_len))
    seen, out = set(), []
    for s in piece_specs(pdims):
        k = "vae" if s.family == "vae" else s.kind
        if k in PROBE_KINDS and k not in seen:
            seen.add(k)
            out.append(s)
    return pdims, out


def want_probe(opts: ExportOptions, dims: FluxDims) -> bool:
    if opts.probe is not None:
        return opts.probe
    return (dims.height // (2 * dims.vae_scale)) * (dims.width // (2 * dims.vae_scale)) > PROBE_AUTO_TOKENS


def export_probes(opts: ExportOptions, ckpt: Checkpoint, dims: FluxDims, out: Path, old: dict | None,
                   code: str, versions, advance) -> dict[str, Any] | None:
    pout = out / PROBE_DIR
    if not want_probe(opts, dims):
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
        key = piece_key(spec, comp, prefixes, ckpt, code, versions)
        if entry_ok(pout, old_e.get(spec.name), key):
            entries.append({**old_e[spec.name], **spec.to_dict()})
            advance(f"probe {spec.name} (unchanged)")
            continue
        advance(f"probe {spec.name}", start=True)
        e = export_one(spec, pdims, ckpt, pout, prefixes, None)
        entries.append({**e, **spec.to_dict(), "key": key})
        advance(f"probe {spec.name} exported", done=True)
    keep = {e["file"] for e in entries}
    for p in pout.glob("*.onnx*"):
        if p.name not in keep:
            p.unlink()
    prune_unused(pout, {loc for e in entries for loc in e.get("weight_files", [])})
    return {"dims": pdims.to_dict(), "pieces": entries}
