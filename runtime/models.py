"""Which file holds which net, and a set of opened engines answering `process(net, ...)`.

What was compiled (files, nets, quantisation, device of each file) comes only from the build
record BM1684X/fluxc_build.json (fluxc/build_record.py). The file names follow sophon-demo:
    clip.bmodel                         clip_head, clip_block_*, clip_tail
    w4bf16_t5.bmodel                    t5_head, t5_block_*, t5_tail
    {type}_w4bf16_transformer.bmodel    {type}_head, all blocks, {type}_tail (one chip)
    {type}_bf16_transformer_on_device{i}.bmodel   the same split over N chips (device_split.json)
    vae_decoder_bf16.bmodel / tiny_vae_decoder_bf16.bmodel   net `vae_decoder`
    vae_encoder_bf16.bmodel / tiny_vae_encoder_bf16.bmodel   net `vae_encoder` (image-input and Kontext builds;
                                        fluxc's names: the reference has no encoder)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxc.build_record import RECOMPILE, load_record
from fluxc.errors import FluxcError
from fluxc.runtime.backends import open_engine
from fluxc.runtime.engine import Engine
from fluxc.runtime.onnx_engine import OnnxEngine
from fluxc.specs import FAMILIES, piece_specs

QUANTIZE = ("W4BF16", "BF16")
BACKENDS = ("cmodel", "onnx", "sail")


def read_build(chip_dir: Path, dims=None, quantize: str | None = None, check_files: bool = True):
    """The build record of chip_dir (fluxc/build_record.py), checked against the export's
    dims and the quantisation asked for. One-line FluxcError otherwise."""
    try:
        rec = load_record(Path(chip_dir), check_files=check_files)
    except FluxcError as e:
        if quantize and "fluxc_build.json" in str(e) and "older fluxc" in str(e):
            raise FluxcError(f"{e} (--quantize {quantize.upper()})") from None
        raise
    if dims is not None:
        if rec.flux_type != dims.flux_type or rec.tiny_vae != dims.tiny_vae:
            raise FluxcError(f"{rec.path} is a {rec.flux_type} build{' (tiny VAE)' if rec.tiny_vae else ''}, the "
                             f"export is {dims.flux_type}{' (tiny VAE)' if dims.tiny_vae else ''}; {RECOMPILE}")
        want = {s.name: s.to_dict() for s in _piece_specs(dims)}
        got = {p.spec.name: p.spec.to_dict() for p in rec.pieces}
        if want != got:
            diff = sorted(set(want) ^ set(got)) or sorted(n for n in want if want[n] != got[n])
            raise FluxcError(f"{rec.path} does not describe the pieces of this export (differs at "
                             f"{', '.join(diff[:3])}); {RECOMPILE}")
    if quantize:
        q = quantize.upper()
        if q not in QUANTIZE:
            raise FluxcError(f"unknown --quantize {quantize}; use one of {', '.join(QUANTIZE)}")
        if q != rec.quantize:
            raise FluxcError(f"{rec.chip_dir} holds a {rec.quantize} {rec.flux_type} transformer, not {q}; run "
                             f"fluxc compile --quantize {q} --flux-type {rec.flux_type}, or drop --quantize")
    return rec


def bmodel_files(chip_dir: Path, flux_type: str | None = None, quantize: str | None = None,
                 tiny_vae: bool | None = None) -> dict[str, list[Path]]:
    """family -> the build's files, in device order, from its record (no globbing); for callers
    of the former helper of the same name (runtime/device_memory.py)."""
    rec = read_build(Path(chip_dir), None, quantize, check_files=False)
    if (flux_type and flux_type != rec.flux_type) or (tiny_vae is not None and bool(tiny_vae) != rec.tiny_vae):
        raise FluxcError(f"{rec.path} is a {rec.flux_type} build{' (tiny VAE)' if rec.tiny_vae else ''}, not "
                         f"{flux_type}; {RECOMPILE}")
    return {fam: [f.path for f in sorted(rec.files_of(fam), key=lambda f: f.device)]
            for fam in FAMILIES}


def _piece_specs(dims):
    return piece_specs(dims)


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
                 progress=None, record=None, chip: str = "BM1684X") -> tuple[ModelSet, str]:
    """Open the bmodels that the build record of chip_dir lists, each on the chip id its
    logical device maps to (`devices[i]` for device i; default 0..N-1)."""
    rec = record or read_build(Path(chip_dir), dims, quantize)
    n = rec.devices
    devices = list(devices) if devices else list(range(n))
    if backend == "sail" and len(devices) < n:
        raise FluxcError(f"this build is split over {n} chips; give --devices with {n} ids")
    t0 = time.perf_counter()
    ms = ModelSet(backend)
    for f in rec.files:
        ms.add(open_engine(backend, f.path, devices[min(f.device, len(devices) - 1)], chip=chip))
        if progress:
            progress(f.path.name)
    ms.load_seconds = time.perf_counter() - t0
    return ms, rec.quantize
