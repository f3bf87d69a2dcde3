"""OnnxEngine: one exported ONNX piece on ONNX Runtime (CPU), the float reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError
from fluxc.runtime.engine import Engine, NetInfo, TensorInfo

_ORT_TYPES = {"tensor(float)": "float32", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxEngine(Engine):
    """One exported ONNX piece; its single net is named after the file (the piece name)."""

    def __init__(self, path: Path, net_name: str | None = None, threads: int | None = None):
        import onnxruntime as ort  # heavy, and only the onnx backend needs it

        self.path = Path(path)
        if not self.path.is_file():
            raise FluxcError(f"missing ONNX piece {self.path}; run fluxc export")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        name = net_name or self.path.stem

        def info(x):
            return TensorInfo(x.name, tuple(int(d) if isinstance(d, int) else -1 for d in x.shape),
                              _ORT_TYPES.get(x.type, x.type))

        self.nets = {name: NetInfo(name, [info(x) for x in self.sess.get_inputs()],
                                   [info(x) for x in self.sess.get_outputs()])}

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ni = self._check_net(net)
        feed = {}
        for t in ni.inputs:
            if t.name not in inputs:
                raise FluxcError(f"net {net}: input {t.name!r} not given")
            feed[t.name] = np.ascontiguousarray(inputs[t.name], dtype=t.dtype)
        outs = self.sess.run(None, feed)
        return {t.name: o for t, o in zip(ni.outputs, outs)}
