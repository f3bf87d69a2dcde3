"""Which file holds which net, and a set of opened engines answering `process(net, ...)`.

Layout of models/BM1684X (as sophon-demo's runtime expects it):
    clip.bmodel                         clip_head, clip_block_*, clip_tail
    w4bf16_t5.bmodel                    t5_head, t5_block_*, t5_tail
    {type}_w4bf16_transformer.bmodel    {type}_head, all blocks, {type}_tail (one chip)
    {type}_bf16_transformer_on_device{i}.bmodel   the same split over N chips (device_split.json)
    vae_decoder_bf16.bmodel / tiny_vae_decoder_bf16.bmodel   net `vae_decoder`
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError
from fluxc.runtime.engines import Engine, OnnxEngine, open_engine

QUANTIZE = ("W4BF16", "BF16")
BACKENDS = ("cmodel", "onnx", "sail")


def transformer_files(chip_dir: Path, flux_type: str, quantize: str) -> list[Path]:
    if quantize == "W4BF16":
        return [chip_dir / f"{flux_type}_w4bf16_transformer.bmodel"]
    files = sorted(chip_dir.glob(f"{flux_type}_bf16_transformer_on_device*.bmodel"),
                   key=lambda p: int(p.stem.rsplit("device", 1)[-1]) if p.stem.rsplit("device", 1)[-1].isdigit() else 99)
    return files


def vae_file(chip_dir: Path, tiny_vae: bool) -> Path:
    return chip_dir / ("tiny_vae_decoder_bf16.bmodel" if tiny_vae else "vae_decoder_bf16.bmodel")


def detect_quantize(chip_dir: Path, flux_type: str, wanted: str | None) -> str:
    """The transformer quantisation present in chip_dir (or check the one asked for)."""
    have = [q for q in QUANTIZE if transformer_files(chip_dir, flux_type, q) and
            all(p.is_file() for p in transformer_files(chip_dir, flux_type, q))]
    if wanted:
        wanted = wanted.upper()
        if wanted not in QUANTIZE:
            raise FluxcError(f"unknown --quantize {wanted}; use one of {', '.join(QUANTIZE)}")
        if wanted not in have:
            raise FluxcError(f"no {wanted} {flux_type} transformer in {chip_dir} (found: "
                             f"{', '.join(have) or 'none'}); run fluxc compile --quantize {wanted} "
                             f"--flux-type {flux_type}, or pick --quantize {have[0] if have else '...'}")
        return wanted
    if not have:
        raise FluxcError(f"no compiled {flux_type} transformer in {chip_dir}; run fluxc compile "
                         f"--flux-type {flux_type} (or use --backend onnx)")
    return have[0]


def bmodel_files(chip_dir: Path, flux_type: str, quantize: str, tiny_vae: bool) -> dict[str, list[Path]]:
    """family -> files, for one configuration."""
    return {
        "clip": [chip_dir / "clip.bmodel"],
        "t5": [chip_dir / "w4bf16_t5.bmodel"],
        "transformer": transformer_files(chip_dir, flux_type, quantize),
        "vae": [vae_file(chip_dir, tiny_vae)],
    }


def read_device_split(chip_dir: Path) -> dict | None:
    p = chip_dir / "device_split.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


@dataclass
class ModelSet:
    """Every net the pipeline needs, each mapped to the engine that holds it."""

    backend: str
    engines: list[Engine] = field(default_factory=list)
    where: dict[str, Engine] = field(default_factory=dict)
    load_seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            eng = self.where[net]
        except KeyError:
            raise FluxcError(f"no loaded model holds the net {net!r}; the {self.backend} files do not fit "
                             "this export (re-run fluxc compile)") from None
        return eng.process(net, inputs)

    def add(self, eng: Engine) -> None:
        self.engines.append(eng)
        self.files.append(eng.path)
        for n in eng.nets:
            self.where.setdefault(n, eng)

    def close(self) -> None:
        for e in self.engines:
            e.close()


def open_onnx(manifest, progress=None) -> ModelSet:
    t0 = time.perf_counter()
    ms = ModelSet("onnx")
    for s in manifest.specs:
        ms.add(OnnxEngine(manifest.path(s.name), net_name=s.net_name))
        if progress:
            progress(s.name)
    ms.load_seconds = time.perf_counter() - t0
    return ms


def open_bmodels(backend: str, chip_dir: Path, dims, quantize: str | None, devices: list[int] | None = None,
                 progress=None, chip: str = "BM1684X") -> tuple[ModelSet, str]:
    """Open the bmodels of one configuration on `backend` (cmodel or sail)."""
    chip_dir = Path(chip_dir)
    if not chip_dir.is_dir():
        raise FluxcError(f"no compiled models in {chip_dir}; run fluxc compile (or use --backend onnx)")
    q = detect_quantize(chip_dir, dims.flux_type, quantize)
    files = bmodel_files(chip_dir, dims.flux_type, q, dims.tiny_vae)
    missing = [p.name for fs in files.values() for p in fs if not p.is_file()]
    if missing:
        raise FluxcError(f"{chip_dir} lacks {', '.join(missing)}; run fluxc compile "
                         f"--flux-type {dims.flux_type} --quantize {q}" + (" --tiny-vae" if dims.tiny_vae else ""))
    n_tr = len(files["transformer"])
    devices = list(devices) if devices else list(range(max(1, n_tr)))
    if backend == "sail" and q == "BF16" and len(devices) < n_tr:
        raise FluxcError(f"the BF16 transformer is split over {n_tr} chips; give --devices with {n_tr} ids")
    t0 = time.perf_counter()
    ms = ModelSet(backend)
    # Placement like the reference: CLIP and VAE on the first device, T5 on the last one,
    # transformer part i on device i.
    plan = [(files["clip"][0], devices[0]), (files["t5"][0], devices[-1])]
    plan += [(p, devices[min(i, len(devices) - 1)]) for i, p in enumerate(files["transformer"])]
    plan += [(files["vae"][0], devices[0])]
    for path, dev in plan:
        ms.add(open_engine(backend, path, dev, chip=chip))
        if progress:
            progress(path.name)
    ms.load_seconds = time.perf_counter() - t0
    return ms, q
