"""Session fixtures for the export area.

`export_schnell_tinyvae` and `export_dev` each run `fluxc export` once per test session on the
tiny models (the `tiny_schnell` / `tiny_dev` fixtures of tests/fixtures_tiny.py) at the same
small resolution and T5 length, and return the export folder (with manifest.json). Compile,
verify and runtime tests reuse them; treat the folders as read-only (copy before changing).
Both carry the VAE encoder (`--image-input`, issue 19: the tiny one / the full one), so the
session's compiled builds take input images for one extra small piece each; the other pieces
are exactly those of a text-to-image export (the encoder is the last piece).
"""
from __future__ import annotations

from pathlib import Path

import pytest

EXPORT_HEIGHT = 128
EXPORT_WIDTH = 128
EXPORT_T5_LEN = 32
EXPORT_ARGS = ["--height", str(EXPORT_HEIGHT), "--width", str(EXPORT_WIDTH), "--t5-seq-len", str(EXPORT_T5_LEN)]


def _export(model: Path, out: Path, tiny_vae: Path | None = None) -> Path:
    from fluxc.export.driver import ExportOptions, run_export

    run_export(ExportOptions(model=str(model), out=out, height=EXPORT_HEIGHT, width=EXPORT_WIDTH,
                             t5_len=EXPORT_T5_LEN, tiny_vae=str(tiny_vae) if tiny_vae else None,
                             image_input=True),
               show_progress=False)
    return out


@pytest.fixture(scope="session")
def export_schnell_tinyvae(tiny_schnell, tmp_path_factory) -> Path:
    model = Path(tiny_schnell)
    return _export(model, tmp_path_factory.mktemp("export_schnell_tinyvae") / "onnx", model / "tiny_vae")


@pytest.fixture(scope="session")
def export_dev(tiny_dev, tmp_path_factory) -> Path:
    model = Path(tiny_dev)
    return _export(model, tmp_path_factory.mktemp("export_dev") / "onnx")
