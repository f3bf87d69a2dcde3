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
    Names, shapes and dtypes come from the net; `nets` has each net's first stage (a net
    merged at several image sizes holds one stage per size, the largest first) and
    `stage_shapes` every stage's input and output shapes, read as sophon-demo's runtime reads
    them: from `get_input_tensors_addrmode0(net, stage)` / `get_output_tensors_addrmode0`
    (tensors over the net's own I/O memory; nothing is allocated). `process` is the
    host-in/host-out path (one net alone, tensors made per call, the stage chosen by the
    inputs' shapes); the FLUX pipeline uses runtime/sail_flux.py, which keeps activations on
    the chips."""

    def __init__(self, path: Path, device_id: int = 0, sail=None):
        self.sail = sail if sail is not None else import_sail("sail")
        self.path = Path(path)
        if not self.path.is_file():
            raise FluxcError(f"missing bmodel {self.path}; run fluxc compile")
        self.device_id = device_id
        self.engine = self.sail.EngineLLM(str(self.path), [device_id])
        self.nets = {}
        self.stage_shapes: dict[str, list[tuple[list, list]]] = {}
        e = self.engine
        for g in e.get_graph_names():
            ins = [TensorInfo(e.get_input_name(g, i), tuple(e.get_input_shape(g, i)), _dtype_name(e.get_input_dtype(g, i)))
                   for i in range(e.get_input_num(g))]
            outs = [TensorInfo(e.get_output_name(g, i), tuple(e.get_output_shape(g, i)),
                               _dtype_name(e.get_output_dtype(g, i))) for i in range(e.get_output_num(g))]
            self.nets[g] = NetInfo(g, ins, outs)
            stages = []
            for st in range(int(e.get_stage_num(g))):
                ti, to = e.get_input_tensors_addrmode0(g, st), e.get_output_tensors_addrmode0(g, st)
                stages.append(([tuple(ti[i].shape()) for i in range(len(ins))],
                               [tuple(to[i].shape()) for i in range(len(outs))]))
            self.stage_shapes[g] = stages

    def sail_dtype(self, name: str):
        for k, v in SAIL_DTYPES.items():
            if v == name:
                return getattr(self.sail.Dtype, k)
        raise FluxcError(f"dtype {name} has no sail Dtype")

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ni = self._check_net(net)
        h = self.sail.Handle(self.device_id)
        for t in ni.inputs:
            if t.name not in inputs:  # never by position
                raise FluxcError(f"net {net}: input {t.name!r} not given (have {', '.join(inputs)})")
        # the stage whose input shapes hold the given arrays (bmruntime picks the stage by shape)
        sizes = [int(np.asarray(inputs[t.name]).size) for t in ni.inputs]
        stages = self.stage_shapes.get(net) or [([t.shape for t in ni.inputs], [t.shape for t in ni.outputs])]
        stage = next((st for st in stages if [int(np.prod(x)) for x in st[0]] == sizes), stages[0])
        ins, outs = {}, {}
        for i, (t, shape) in enumerate(zip(ni.inputs, stage[0])):
            if t.dtype == "bfloat16":
                raise FluxcError(f"net {net}: input {t.name} is bfloat16; feed it through runtime/sail_flux.py")
            x = np.ascontiguousarray(inputs[t.name], dtype=t.dtype).reshape(shape)
            ins[i] = self.sail.Tensor(h, list(shape), self.sail_dtype(t.dtype), True, True)
            ins[i].update_data(x)
            ins[i].sync_s2d()
        for i, (t, shape) in enumerate(zip(ni.outputs, stage[1])):
            outs[i] = self.sail.Tensor(h, list(shape), self.sail_dtype(t.dtype), True, True)
        if self.engine.process(net, ins, outs) not in (0, None):
            raise FluxcError(f"sophon.sail failed to run {net} on device {self.device_id}")
        res = {}
        for i, (t, shape) in enumerate(zip(ni.outputs, stage[1])):
            outs[i].sync_d2s()
            res[t.name] = np.array(outs[i].asnumpy(), dtype=np.float32).reshape(shape)
        return res

    def close(self) -> None:
        c = getattr(self.engine, "close", None)
        if c:
            c()
