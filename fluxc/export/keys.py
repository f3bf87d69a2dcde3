"""Content keys of the export: a piece is exported again only when its key changes (its spec,
its component's config, the identity of the tensors it reads, the export code, library versions)."""
from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fluxc.export as ex
from fluxc.export.checkpoint import Checkpoint
from fluxc.export.loading import checkpoint_keys
from fluxc.fsutil import sha256_file, sha256_json
from fluxc.specs import PieceSpec


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("fluxc", "torch", "diffusers", "transformers", "onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def code_hash() -> str:
    """Hash of the code that shapes the exported graphs (wrappers, patches, ONNX writer)."""
    import fluxc.patches as pa  # the patches load torch: only an export needs them

    h = hashlib.sha256()
    files = [Path(ex.__file__).parent / n for n in ("pieces.py", "onnx_io.py", "loading.py", "weights.py")]
    files += sorted(Path(pa.__file__).parent.glob("*.py"))
    for p in files:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def entry_ok(out: Path, entry: dict[str, Any] | None, key: str) -> bool:
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


def piece_key(spec: PieceSpec, comp: str, prefixes: list[str], ckpt: Checkpoint, code: str, versions) -> str:
    keys = checkpoint_keys(ckpt.model(comp), prefixes, ckpt.stores[comp], comp)
    return sha256_json({"spec": spec.to_dict(), "config": ckpt.configs[comp],
                        "weights": ckpt.stores[comp].fingerprint(keys), "code": code, "versions": versions})
