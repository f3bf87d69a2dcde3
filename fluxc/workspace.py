"""Where fluxc keeps things. Every command defaults to one workspace folder, laid out like
the sophon-demo models/ folder, so bare `fluxc export`, `fluxc compile ...`, `fluxc verify`
and `fluxc run` find each other's outputs.

    models/                    (FLUXC_MODELS or --models; default ./models)
      onnx/                    fluxc export: <piece>.onnx, manifest.json, rotary_emb.npy,
                               tokenizer/, tokenizer_2/
      BM1684X/                 fluxc compile: combined bmodels + <bmodel>.info.txt,
                               compile_report.json, device_split.json
      build/                   compile cache: one folder per piece and content key
                               (an export outside a workspace: $FLUXC_CACHE/build)

Each command also takes what another command wrote as it is (`locate`): a workspace (the
layout above), an export folder (manifest.json: what `fluxc export --out X` writes) or a
bmodel folder (fluxc_build.json: what `fluxc compile --out X` writes; its record names the
export it was built from).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODELS = "models"
MANIFEST = "manifest.json"  # written by fluxc export (fluxc/export/manifest.py)
RECORD = "fluxc_build.json"  # written by fluxc compile (fluxc/build_record.py)


def models_dir(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("FLUXC_MODELS", DEFAULT_MODELS))


def export_dir(models: Path) -> Path:
    return models / "onnx"


def chip_dir(models: Path, chip: str = "bm1684x") -> Path:
    return models / chip.upper()


@dataclass(frozen=True)
class Located:
    """What a folder given to a command holds: its kind, the export and the chip folder to use."""

    kind: str  # "workspace", "export" or "bmodels"
    export: Path  # the export folder (may not exist yet in a fresh workspace)
    chip: Path  # the folder of the compiled bmodels (may not exist)


def locate(folder: Path, chip: str = "bm1684x") -> Located:
    """Recognise a folder written by a fluxc command: a bmodel folder (fluxc_build.json), an
    export folder (manifest.json) or a workspace (onnx/ and <CHIP>/ inside)."""
    folder = Path(folder)
    if (folder / RECORD).is_file():
        try:
            exp = Path(json.loads((folder / RECORD).read_text())["export"]["dir"])
        except (OSError, ValueError, KeyError, TypeError):
            exp = folder / "onnx"  # a broken record: read_build names the problem
        return Located("bmodels", exp, folder)
    if (folder / MANIFEST).is_file():
        return Located("export", folder, chip_dir(folder.parent, chip) if folder.name == "onnx" else folder)
    return Located("workspace", export_dir(folder), chip_dir(folder, chip))


def build_dir(models: Path) -> Path:
    return models / "build"


def default_build_dir(export: Path) -> Path:
    """The compile cache of an export, next to what it caches: <workspace>/build when the export
    is a workspace's onnx/ folder, else <cache_root()>/build ($FLUXC_CACHE/build): never a
    folder of the current directory that neither the export nor the output is in."""
    export = Path(export).absolute()
    if export.name == "onnx":
        return build_dir(export.parent)
    return cache_root() / "build"


def cache_root() -> Path:
    """Caches that live outside the repo (toolchain venv, ...)."""
    env = os.environ.get("FLUXC_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fluxc"
