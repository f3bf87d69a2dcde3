"""The framing between fluxc and its chip simulator worker (runtime/cmodel_worker.py), used
by both ends. No pickle: every message is
    4-byte big-endian length + UTF-8 JSON header
    then, for each array the header announces ("arrays": [names]), 8-byte big-endian
    length + .npy bytes.
A reply with "ok": false carries no arrays.

Stdlib + numpy only: the worker loads this file by path under TPU-MLIR's own Python 3.10,
where the fluxc package is not importable.
"""
from __future__ import annotations

import io
import json
import struct

import numpy as np


def write_message(f, header: dict, arrays=()) -> None:
    h = json.dumps(header).encode()
    parts = [struct.pack(">I", len(h)), h]
    for a in arrays:
        b = io.BytesIO()
        np.save(b, np.ascontiguousarray(a), allow_pickle=False)
        data = b.getvalue()
        parts += [struct.pack(">Q", len(data)), data]
    f.write(b"".join(parts))
    f.flush()


def _read_exact(f, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def read_message(f) -> tuple[dict, list]:
    """(header, arrays); EOFError when the other end closed the stream."""
    (hlen,) = struct.unpack(">I", _read_exact(f, 4))
    header = json.loads(_read_exact(f, hlen).decode())
    arrays = []
    for _ in header.get("arrays", []) if header.get("ok", True) else []:
        (alen,) = struct.unpack(">Q", _read_exact(f, 8))
        arrays.append(np.load(io.BytesIO(_read_exact(f, alen)), allow_pickle=False))
    return header, arrays
