"""Where fluxc keeps things. Every command defaults to one workspace folder, laid out like
the sophon-demo models/ folder, so bare `fluxc export`, `fluxc compile ...`, `fluxc verify`
and `fluxc run` find each other's outputs.

    models/                    (FLUXC_MODELS or --models; default ./models)
      onnx/                    fluxc export: <piece>.onnx, manifest.json, rotary_emb.npy,
                               tokenizer/, tokenizer_2/
      BM1684X/                 fluxc compile: combined bmodels + <bmodel>.info.txt,
                               compile_report.json, device_split.json
      build/                   compile cache: one folder per piece and content key
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODELS = "models"


def models_dir(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("FLUXC_MODELS", DEFAULT_MODELS))


def export_dir(models: Path) -> Path:
    return models / "onnx"


def chip_dir(models: Path, chip: str = "bm1684x") -> Path:
    return models / chip.upper()


def build_dir(models: Path) -> Path:
    return models / "build"


def cache_root() -> Path:
    """Caches that live outside the repo (toolchain venv, ...)."""
    env = os.environ.get("FLUXC_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fluxc"
