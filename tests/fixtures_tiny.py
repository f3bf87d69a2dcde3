"""Session fixtures for the tiny area: the built-in tiny FLUX models, built once per session.

- ``tiny_schnell`` / ``tiny_dev``: Path to a tiny model (seed 0, default sizes) in diffusers
  layout (plus ``tiny_vae/``). Treat them as read-only: other tests share them.
- ``tiny_schnell_sharded``: the same model as ``tiny_schnell`` (same seed, same tensors) in the
  Hub's sharded layout (transformer in 3, text_encoder_2 in 2 safetensors files + index.json).
- ``make_tiny(tmp_path_factory, name, flux_type, seed=0, **overrides)``: build another one
  (e.g. other sizes) under the session's temp root.
- ``load_tiny_pipeline(path)``: ``diffusers.FluxPipeline`` loaded offline on CPU, float32.
- ``TINY_PROMPT``: a prompt both tiny tokenizers split into real tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

TINY_PROMPT = "a photo of an astronaut riding a horse on the moon"


def make_tiny(tmp_path_factory: pytest.TempPathFactory, name: str, flux_type: str, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny model into a fresh session temp folder and return its path."""
    from fluxc.tiny import build_tiny

    root = tmp_path_factory.mktemp(f"tiny-{name}")
    return build_tiny(root / "model", flux_type=flux_type, seed=seed, **overrides)


def load_tiny_pipeline(path: Path):
    """FluxPipeline.from_pretrained(path), offline, CPU float32."""
    import torch
    from diffusers import FluxPipeline

    try:  # diffusers >= 0.42 renamed torch_dtype to dtype
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        key = "dtype"
    except ImportError:
        key = "torch_dtype"
    return FluxPipeline.from_pretrained(str(path), local_files_only=True, **{key: torch.float32})


@pytest.fixture(scope="session")
def tiny_schnell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory, "schnell", "schnell", seed=0)


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory, "dev", "dev", seed=0)


@pytest.fixture(scope="session")
def tiny_schnell_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory, "schnell-sharded", "schnell", seed=0, sharded=True)
