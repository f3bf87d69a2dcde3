"""Weights referenced in place: the exported ONNX pieces hold no copies of the checkpoint.

Every initializer of a piece that is a checkpoint tensor becomes an ONNX external-data
reference into the checkpoint's own safetensors file (its dtype as stored: bf16 for the
published FLUX.1, with a Cast to float32 in the graph). The safetensors files are hard-linked
into `<export>/weights/<component>/` (ONNX readers only follow relative locations below the
model's folder), so an export of the 12B model costs no extra disk; where a hard link is not
possible (another filesystem) the file is copied once, in its stored dtype.

A piece's weights are identified by content: `weights_sha256` hashes the bytes of every tensor
it references (with names, dtypes and shapes), so the compile cache never trusts a path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError

WEIGHTS_DIR = "weights"
# safetensors dtype -> (ONNX TensorProto elem type, itemsize)
_ST_TO_ONNX = {"F32": (1, 4), "F16": (10, 2), "BF16": (16, 2)}
_READ_CHUNK = 64 << 20


@dataclass(frozen=True)
class WeightRef:
    """One checkpoint tensor as an ONNX initializer can point at it."""

    location: str  # relative to the export folder, e.g. weights/transformer/x.safetensors
    offset: int
    length: int
    elem_type: int  # ONNX TensorProto data type as stored
    shape: tuple[int, ...]
    key: str  # checkpoint tensor name

    def to_dict(self) -> dict:
        return {"location": self.location, "offset": self.offset, "length": self.length,
                "elem_type": self.elem_type, "shape": list(self.shape), "key": self.key}


def data_start(path: Path) -> int:
    """Byte offset of a safetensors file's data section (8-byte length + JSON header)."""
    with open(path, "rb") as f:
        raw = f.read(8)
    if len(raw) != 8:
        raise FluxcError(f"{path} is not a safetensors file (truncated); re-download the model")
    return 8 + struct.unpack("<Q", raw)[0]


def referencable(info: dict) -> bool:
    return info.get("dtype") in _ST_TO_ONNX


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def link_into(out: Path, component: str, src: Path) -> str:
    """Make `src` available as <out>/weights/<component>/<name> (hard link, else a copy);
    returns the location relative to `out`. A stale link (the checkpoint file was replaced)
    is replaced atomically."""
    rel = f"{WEIGHTS_DIR}/{component}/{src.name}"
    dst = out / rel
    if _same_file(dst, src):
        return rel
    if dst.is_file():
        s, d = src.stat(), dst.stat()
        if s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime):  # an earlier copy
            return rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            # realpath: Hub cache snapshots hold symlinks into blobs/, and link() would
            # hard-link the (relative, then dangling) symlink itself
            os.link(os.path.realpath(src), tmp)
        except OSError:
            shutil.copy2(src, tmp)  # another filesystem: one copy in the stored dtype
        os.replace(tmp, dst)
    except BaseException:  # e.g. disk full during the copy: leave no temp name behind
        tmp.unlink(missing_ok=True)
        raise
    return rel


def ref_for(store, key: str, out: Path, component: str) -> WeightRef | None:
    """The external-data reference of checkpoint tensor `key` (None if its dtype cannot be
    referenced as stored, e.g. an integer tensor: such tensors are written inline)."""
    info = store.info(key)
    if not referencable(info):
        return None
    path = Path(store.files[key])
    elem, _ = _ST_TO_ONNX[info["dtype"]]
    b, e = info["data_offsets"]
    rel = link_into(out, component, path)
    return WeightRef(rel, data_start(path) + int(b), int(e) - int(b), elem, tuple(int(d) for d in info["shape"]), key)


def refs_sha256(out: Path, refs: dict[str, WeightRef]) -> str:
    """Content hash of the referenced tensors (bytes, names, dtypes, shapes), read in chunks."""
    h = hashlib.sha256()
    for name in sorted(refs):
        r = refs[name]
        h.update(json.dumps([name, r.elem_type, list(r.shape), r.length]).encode())
        with open(out / r.location, "rb") as f:
            f.seek(r.offset)
            left = r.length
            while left:
                chunk = f.read(min(left, _READ_CHUNK))
                if not chunk:
                    raise FluxcError(f"{out / r.location} is shorter than its header says; re-download the model")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def read_ref_f32(base: Path, location: str, offset: int, length: int, elem_type: int, shape) -> "np.ndarray":
    """An external-data tensor as float32 (bf16/f16 widened exactly)."""
    with open(Path(base) / location, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise FluxcError(f"{Path(base) / location} is truncated; re-run `fluxc export`")
    if elem_type == 1:
        a = np.frombuffer(raw, dtype="<f4")
    elif elem_type == 10:
        a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif elem_type == 16:
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise FluxcError(f"unsupported external tensor type {elem_type} in {location}")
    return a.reshape(tuple(shape))


def prune_unused(out: Path, used: set[str]) -> None:
    """Remove linked weight files no piece references any more."""
    root = out / WEIGHTS_DIR
    if not root.is_dir():
        return
    for p in root.rglob("*"):
        if p.is_file() and str(p.relative_to(out)) not in used:
            p.unlink()
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
