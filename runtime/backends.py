"""Open a model file on a backend by name: onnx, cmodel, sail or sail-sim."""
from __future__ import annotations

from pathlib import Path

from fluxc.errors import FluxcError
from fluxc.runtime.cmodel_engine import CmodelEngine
from fluxc.runtime.engine import Engine
from fluxc.runtime.onnx_engine import OnnxEngine
from fluxc.runtime.sail_engine import SailEngine, import_sail


def open_engine(backend: str, path: Path, device_id: int = 0, chip: str = "BM1684X") -> Engine:
    if backend == "onnx":
        return OnnxEngine(path)
    if backend == "cmodel":
        return CmodelEngine(path, chip=chip)
    if backend in ("sail", "sail-sim"):
        return SailEngine(path, device_id, import_sail(backend))
    raise FluxcError(f"unknown backend {backend!r}; use cmodel, onnx, sail or sail-sim")
