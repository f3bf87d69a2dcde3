"""SailEngine: a bmodel on a BM1684X through sophon.sail, or through its stand-in on the chip
simulator (runtime/sail_sim.py); which sail module a backend uses, and the device id check."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError
from fluxc.runtime import sail_sim
from fluxc.runtime.engine import Engine, NetInfo, TensorInfo

# sail.Dtype member name -> numpy dtype name
SAIL_DTYPES = {"BM_FLOAT32": "float32", "BM_FLOAT16": "float16", "BM_BFLOAT16": "bfloat16", "BM_INT8": "int8",
               "BM_UINT8": "uint8", "BM_INT16": "int16", "BM_UINT16": "uint16", "BM_INT32": "int32",
               "BM_UINT32": "uint32"}


def import_sail(backend: str):
    """The sail module of a backend: `sail` = Sophgo's sophon.sail, `sail-sim` = the
    stand-in on the chip simulator. Never one in place of the other."""
    if backend == "sail-sim":
        return sail_sim
    try:
        import sophon.sail as sail  # type: ignore  # Sophgo's SDK: only on a host with the chip driver
    except ImportError:
        raise FluxcError("the sail backend needs sophon.sail (Sophgo's SDK Python package, installed on "
                         "the board/host with the BM1684X driver); use --backend sail-sim, cmodel or onnx here") from None
    return sail


def check_devices(sail, devices: list[int]) -> None:
    """Every device id exists (before anything is loaded)."""
    n = sail.get_available_tpu_num() if hasattr(sail, "get_available_tpu_num") else None
    if n is None:
        return
    bad = [d for d in devices if d < 0 or d >= n]
    if bad:
        raise FluxcError(f"device {bad[0]} does not exist: {n} chip(s) here, ids 0..{n - 1}; fix --devices")


def _dtype_name(d) -> str:
    name = getattr(d, "name", None) or str(d).rsplit(".", 1)[-1]
    return SAIL_DTYPES.get(name, name)


class SailEngine(Engine):
    """One bmodel on one chip through sail.EngineLLM (sophon.sail, or the stand-in).
    Names, shapes and dtypes come from the net. `process` is the host-in/host-out path
    (one net alone, tensors made per call); the FLUX pipeline uses runtime/sail_flux.py,
    which keeps activations on the chips."""

    def __init__(self, path: Path, device_id: int = 0, sail=None):
        self.sail = sail if sail is not None else import_sail("sail")
        self.path = Path(path)
        if not self.path.is_file():
            raise FluxcError(f"missing bmodel {self.path}; run fluxc compile")
        self.device_id = device_id
        self.engine = self.sail.EngineLLM(str(self.path), [device_id])
        self.nets = {}
        e = self.engine
        for g in e.get_graph_names():
            ins = [TensorInfo(e.get_input_name(g, i), tuple(e.get_input_shape(g, i)), _dtype_name(e.get_input_dtype(g, i)))
                   for i in range(e.get_input_num(g))]
            outs = [TensorInfo(e.get_output_name(g, i), tuple(e.get_output_shape(g, i)),
                               _dtype_name(e.get_output_dtype(g, i))) for i in range(e.get_output_num(g))]
            self.nets[g] = NetInfo(g, ins, outs)

    def sail_dtype(self, name: str):
        for k, v in SAIL_DTYPES.items():
            if v == name:
                return getattr(self.sail.Dtype, k)
        raise FluxcError(f"dtype {name} has no sail Dtype")

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ni = self._check_net(net)
        h = self.sail.Handle(self.device_id)
        ins, outs = {}, {}
        for i, t in enumerate(ni.inputs):
            if t.name not in inputs:  # never by position
                raise FluxcError(f"net {net}: input {t.name!r} not given (have {', '.join(inputs)})")
            if t.dtype == "bfloat16":
                raise FluxcError(f"net {net}: input {t.name} is bfloat16; feed it through runtime/sail_flux.py")
            x = np.ascontiguousarray(inputs[t.name], dtype=t.dtype).reshape(t.shape)
            ins[i] = self.sail.Tensor(h, list(t.shape), self.sail_dtype(t.dtype), True, True)
            ins[i].update_data(x)
            ins[i].sync_s2d()
        for i, t in enumerate(ni.outputs):
            outs[i] = self.sail.Tensor(h, list(t.shape), self.sail_dtype(t.dtype), True, True)
        if self.engine.process(net, ins, outs) not in (0, None):
            raise FluxcError(f"sophon.sail failed to run {net} on device {self.device_id}")
        res = {}
        for i, t in enumerate(ni.outputs):
            outs[i].sync_d2s()
            res[t.name] = np.array(outs[i].asnumpy(), dtype=np.float32).reshape(t.shape)
        return res

    def close(self) -> None:
        c = getattr(self.engine, "close", None)
        if c:
            c()
