"""The engine interface, shaped like sophon.sail's EngineLLM: open a model file, list its nets
with their input/output names, shapes and dtypes, and `process(net, inputs) -> outputs`,
keeping the model loaded across calls.

Backends (runtime/backends.py opens one by name):
- OnnxEngine (runtime/onnx_engine.py): ONNX Runtime on the exported pieces (the float reference).
- CmodelEngine (runtime/cmodel_engine.py): a bmodel on TPU-MLIR's chip simulator, hosted by one
  long-lived worker process of the toolchain Python (runtime/cmodel_client.py starts and talks
  to runtime/cmodel_worker.py over runtime/wire.py).
- SailEngine (runtime/sail_engine.py): a bmodel on a BM1684X through sophon.sail (one engine
  per device id), or through its stand-in on the chip simulator (runtime/sail_sim.py, backend
  `sail-sim`).

Dependencies: numpy only (onnxruntime / sophon.sail imported when their backend is used).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class NetInfo:
    name: str
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


class Engine:
    """One opened model (a combined bmodel, or one ONNX piece)."""

    path: Path
    nets: dict[str, NetInfo]

    def net_names(self) -> list[str]:
        return list(self.nets)

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _check_net(self, net: str) -> NetInfo:
        if net not in self.nets:
            raise FluxcError(f"{self.path}: no net named {net!r} (has {', '.join(self.nets) or 'none'}); "
                             "rebuild it with fluxc compile")
        return self.nets[net]
