"""Broken variants of an export, to prove that fluxc verify catches them (mutation testing).

Each mutant is a copy of a (read-only) export folder with one thing broken the way a buggy
exporter or a hand edit would break it. The source checkpoint named by the manifest stays
the original, so the independent reference still holds the right model. Pieces whose ONNX
changed get their manifest sha256 updated, so `fluxc compile` with the same build cache
recompiles exactly those pieces (and the combined file holding them), nothing else.

    dst = copy_export(src_export, tmp / "onnx")
    scale_block_weights(dst, "schnell_trans_block_1", 1.25)
    scale_block_weights(dst, "schnell_trans_block_1", 1.25, size="128x64")  # that size's piece only
    # then: fluxc compile --models <ws with onnx/ = dst> --build-dir <shared cache> ...
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fluxc.fsutil import sha256_file, write_json_atomic


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(Path(src).resolve(), dst)
    return dst


def _entries(man: dict, size: str | None) -> tuple[list, str]:
    """(manifest entries, their folder) of the first size (size None) or of a further size
    "WxH" of a several-size export (only the pieces that size has of its own)."""
    if size is None:
        return man["pieces"], ""
    for r in man.get("resolutions") or []:
        if r["size"] == size and r.get("dir"):
            return r["pieces"], r["dir"] + "/"
    raise ValueError(f"the export has no further size {size}")


def _rehash(export: Path, piece: str, size: str | None = None) -> None:
    mp = export / "manifest.json"
    man = json.loads(mp.read_text())
    entries, d = _entries(man, size)
    for e in entries:
        if e["name"] == piece:
            e["sha256"] = sha256_file(export / d / e["file"])
            if e.get("external_data"):
                e["external_sha256"] = sha256_file(export / d / e["external_data"])
    write_json_atomic(mp, man)


def _edit_onnx(export: Path, piece: str, fn, size: str | None = None) -> None:
    import onnx

    entries, d = _entries(json.loads((export / "manifest.json").read_text()), size)
    if not any(e["name"] == piece for e in entries):
        raise ValueError(f"{piece} is not a piece of its own at {size or 'the first size'}")
    path = export / d / f"{piece}.onnx"
    m = onnx.load(str(path))
    fn(m)
    onnx.save(m, str(path))
    _rehash(export, piece, size)


def map_weights(export: Path, piece: str, fn, min_ndim: int = 2, size: str | None = None) -> int:
    """Apply fn(array) -> array to every float initializer of a piece with ndim >= min_ndim
    (the weight matrices; biases and norm scales are left alone). Returns how many. `size`: the
    piece of that further image size ("WxH") of a several-size export, not the first size's."""
    from onnx import numpy_helper

    count = [0]

    def edit(m):
        for i, init in enumerate(m.graph.initializer):
            a = numpy_helper.to_array(init)  # external data (weights/ links) was loaded by onnx.load
            if "float" in a.dtype.name and a.ndim >= min_ndim:  # float32/16 and ml_dtypes' bfloat16
                b = np.asarray(fn(a.astype(np.float32)), dtype=np.float32).astype(a.dtype)
                new = numpy_helper.from_array(b, init.name)  # saved inline: the linked files stay untouched
                m.graph.initializer[i].CopyFrom(new)
                count[0] += 1

    _edit_onnx(export, piece, edit, size)
    if not count[0]:
        raise ValueError(f"{piece} has no weight matrices to mutate")
    return count[0]


def zero_block_weights(export: Path, piece: str) -> int:
    return map_weights(export, piece, np.zeros_like)


def scale_block_weights(export: Path, piece: str, scale: float, size: str | None = None) -> int:
    return map_weights(export, piece, lambda a: a * np.float32(scale), size=size)


def identity_block(export: Path, piece: str) -> int:
    """Make a block compute out = in exactly: every tensor of it zeroed (biases and AdaLN
    included), so its gates are 0 and out = in + 0 * (...). A graph of bare Identity nodes
    would be the same function but does not pass TPU-MLIR's canonicalizer (measured: tpuc-opt
    fails on it), so the block keeps its own graph."""
    return map_weights(export, piece, np.zeros_like, min_ndim=0)


def swap_inputs(export: Path, piece: str, a: str, b: str) -> None:
    """Swap what two same-shaped graph inputs feed (e.g. timestep and guidance): the names and
    order of the inputs stay, their uses inside the graph are exchanged."""

    def edit(m):
        tmp = "__fluxc_swap__"
        for n in m.graph.node:
            for i, x in enumerate(n.input):
                n.input[i] = {a: tmp, b: a}.get(x, x)
            for i, x in enumerate(n.input):
                if x == tmp:
                    n.input[i] = b

    _edit_onnx(export, piece, edit)


def swap_rotary_axes(export: Path, axes_dims: tuple[int, ...], i: int = 1, j: int = 2) -> None:
    """Exchange the frequency segments of rotary axes i and j in rotary_emb.npy (for FLUX,
    the image row and column axes: the table then rotates by the transposed grid)."""
    p = export / "rotary_emb.npy"
    t = np.load(p)
    starts = np.cumsum([0] + [d // 2 for d in axes_dims])
    si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
    if si.stop - si.start != sj.stop - sj.start:
        raise ValueError("axes of different sizes cannot be swapped")
    out = t.copy()
    out[:, :, :, si], out[:, :, :, sj] = t[:, :, :, sj], t[:, :, :, si]
    np.save(p, out)


def set_scheduler(export: Path, **changes) -> None:
    p = export / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg, indent=2))
