"""The export's side files (tokenizers, rotary table, VAE and scheduler configs): written only
when their content changes, each atomically."""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fluxc.errors import FluxcError
from fluxc.export.checkpoint import Checkpoint
from fluxc.export.manifest import SIDE_FILES
from fluxc.fsutil import atomic_path
from fluxc.specs import FluxDims


def write_bytes_if_changed(dst: Path, data: bytes) -> bool:
    if dst.is_file() and dst.read_bytes() == data:
        return False
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
    return True


def sync_tree(src: Path, dst: Path) -> bool:
    def listing(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    want = listing(src)
    if dst.is_dir() and listing(dst) == want:
        return False
    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp)
    return True


def rotary_bytes(dims: FluxDims, transformer_cfg: dict[str, Any]) -> bytes:
    from fluxc.patches.rotary import rotary_table  # fluxc.patches loads torch: only an export needs it

    axes = transformer_cfg.get("axes_dims_rope", (16, 56, 56))
    table = np.ascontiguousarray(rotary_table(dims, axes_dims=tuple(int(a) for a in axes)), dtype=np.float32)
    if table.shape != dims.rotary_shape:
        raise FluxcError(f"rotary table shape {table.shape} differs from {dims.rotary_shape} (bug)")
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    return buf.getvalue()


def sync_side_files(ckpt: Checkpoint, dims: FluxDims, out: Path) -> dict[str, str]:
    folder = ckpt.folder
    files = {k: v for k, v in SIDE_FILES.items() if k != "tiny_vae_config"}
    for tok in ("tokenizer", "tokenizer_2"):
        sync_tree(folder / tok, out / tok)
    write_bytes_if_changed(out / files["rotary_emb"], rotary_bytes(dims, ckpt.configs["transformer"]))
    write_bytes_if_changed(out / files["vae_config"], (folder / "vae" / "config.json").read_bytes())
    if "tiny_vae" in ckpt.configs:
        files["tiny_vae_config"] = SIDE_FILES["tiny_vae_config"]
        write_bytes_if_changed(out / files["tiny_vae_config"],
                                (ckpt.component_folders["tiny_vae"] / "config.json").read_bytes())
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise FluxcError(f"{folder} is not a complete FLUX.1 checkpoint (scheduler/scheduler_config.json is missing)")
    write_bytes_if_changed(out / files["scheduler_config"], sched.read_bytes())
    return files
