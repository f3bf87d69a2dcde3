"""Minimal engines, shaped like sophon.sail's EngineLLM: open a model file, list its nets
with their input/output names, shapes and dtypes, and `process(net, inputs) -> outputs`,
keeping the model loaded across calls.

Backends:
- OnnxEngine: ONNX Runtime on the exported pieces (the float reference).
- CmodelEngine: a bmodel on TPU-MLIR's chip simulator, hosted by one long-lived worker
  process of the toolchain Python (runtime/cmodel_worker.py).
- SailEngine: a bmodel on a BM1684X through sophon.sail (one engine per device id), or
  through its stand-in on the chip simulator (runtime/sail_sim.py, backend `sail-sim`).

Dependencies: numpy only (onnxruntime / sophon.sail imported when their backend is used).
"""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
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


# ---- ONNX Runtime ------------------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": "float32", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxEngine(Engine):
    """One exported ONNX piece; its single net is named after the file (the piece name)."""

    def __init__(self, path: Path, net_name: str | None = None, threads: int | None = None):
        import onnxruntime as ort

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


# ---- chip simulator worker ---------------------------------------------------------------

def _write_msg(f, header: dict, arrays=()) -> None:
    h = json.dumps(header).encode()
    parts = [struct.pack(">I", len(h)), h]
    for a in arrays:
        b = io.BytesIO()
        np.save(b, np.ascontiguousarray(a), allow_pickle=False)
        d = b.getvalue()
        parts += [struct.pack(">Q", len(d)), d]
    f.write(b"".join(parts))
    f.flush()


def _read_exact(f, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _read_msg(f):
    (hlen,) = struct.unpack(">I", _read_exact(f, 4))
    header = json.loads(_read_exact(f, hlen).decode())
    arrays = []
    for _ in header.get("arrays", []) if header.get("ok") else []:
        (alen,) = struct.unpack(">Q", _read_exact(f, 8))
        arrays.append(np.load(io.BytesIO(_read_exact(f, alen)), allow_pickle=False))
    return header, arrays


WORKER_SCRIPT = Path(__file__).with_name("cmodel_worker.py")


class CmodelWorker:
    """The long-lived simulator process (Python 3.10 toolchain env). One per runtime; it can
    hold any number of loaded bmodels."""

    def __init__(self, python: Path | None = None, env: dict | None = None):
        if python is None or env is None:
            from fluxc import toolchain

            toolchain.require_toolchain()
            python = python or Path(toolchain.toolchain_python())
            if env is None:
                env = dict(toolchain.toolchain_env()) if hasattr(toolchain, "toolchain_env") else dict(os.environ)
        env = dict(env)
        env.pop("FLUXC_CMODEL_WORKER_READY", None)
        # The simulator's OpenMP threads spin; on a busy machine more threads than free
        # cores made every call many times slower. One thread unless asked otherwise.
        env["OMP_NUM_THREADS"] = os.environ.get("FLUXC_CMODEL_THREADS", "1")
        self._stderr_tail: deque[str] = deque(maxlen=40)
        # Own session: if fluxc dies while this worker is parked (stopped, see _park), the
        # kernel sends the orphaned, stopped process group SIGHUP + SIGCONT and it exits.
        self.proc = subprocess.Popen([str(python), "-u", str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        self._parking = os.environ.get("FLUXC_CMODEL_PARK", "1") != "0" and hasattr(signal, "SIGSTOP")
        self._parked = False
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        self._lock = threading.Lock()
        self._keys = 0
        h, _ = self._recv()
        if not h.get("ready"):
            raise FluxcError(f"chip simulator worker did not start: {self.stderr_tail()}")
        self._park()

    # The simulator's engine threads (TPU_GDE, TPU_SORT, CORE_MAIN) poll even while the
    # process waits for work, and a run keeps one worker per bmodel file: on 2 cores, idle
    # workers spinning made every simulator call several times slower. A worker is
    # therefore stopped (SIGSTOP) between requests and continued (SIGCONT) for each one.
    # FLUXC_CMODEL_PARK=0 turns this off.
    def _park(self) -> None:
        if self._parking and not self._parked and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self._parked = True

    def _unpark(self) -> None:
        if self._parked:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self._parked = False

    def _drain(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            s = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(s)
            if os.environ.get("FLUXC_WORKER_DEBUG"):
                print(f"[cmodel] {s}", file=sys.stderr)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def _recv(self):
        try:
            return _read_msg(self.proc.stdout)
        except (EOFError, struct.error):
            self.proc.wait(timeout=10)
            raise FluxcError(f"chip simulator worker exited (code {self.proc.returncode}); "
                             f"its last output:\n{self.stderr_tail()}") from None

    def request(self, header: dict, arrays=()):
        with self._lock:
            if self.proc.poll() is not None:
                raise FluxcError(f"chip simulator worker is not running (exit {self.proc.returncode}); "
                                 f"last output:\n{self.stderr_tail()}")
            self._unpark()
            try:
                _write_msg(self.proc.stdin, header, arrays)
            except BrokenPipeError:
                pass  # _recv reports the exit
            h, outs = self._recv()
            self._park()
        if not h.get("ok"):
            raise FluxcError(f"chip simulator: {h.get('error')}")
        return h, outs

    def new_key(self) -> str:
        self._keys += 1
        return f"m{self._keys}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                with self._lock:
                    self._unpark()
                    _write_msg(self.proc.stdin, {"op": "quit"})
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


_live_workers: list["CmodelWorker"] = []


def _close_all_workers() -> None:
    for w in list(_live_workers):
        w.close()


def new_worker() -> CmodelWorker:
    """A fresh simulator process. One per bmodel file: TPU-MLIR's pyruntime_bm runs a
    second Model of the same process on a shared simulated device, and running a net of a
    model loaded after another one crashed the simulator here ("NO SUCH SHORT CMD TYPE");
    separate processes are isolated like separate chips."""
    import atexit

    w = CmodelWorker()
    if not _live_workers:
        atexit.register(_close_all_workers)
    _live_workers.append(w)
    return w


class CmodelEngine(Engine):
    """A (combined) bmodel on the BM1684X simulator."""

    def __init__(self, path: Path, worker: CmodelWorker | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FluxcError(f"missing bmodel {self.path}; run fluxc compile")
        self._own = worker is None
        self.worker = worker or new_worker()
        self.key = self.worker.new_key()
        try:
            h, _ = self.worker.request({"op": "load", "key": self.key, "path": str(self.path.resolve())})
        except FluxcError as e:
            self.close()
            raise FluxcError(f"cannot load {self.path} on the chip simulator ({str(e).splitlines()[0]}); "
                             "the file is damaged or not a BM1684X bmodel: rebuild it with fluxc compile") from None
        self.nets = {n["name"]: NetInfo(n["name"],
                                        [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in n["inputs"]],
                                        [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in n["outputs"]])
                     for n in h["nets"]}

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_net(net)
        names = list(inputs)
        h, outs = self.worker.request({"op": "run", "key": self.key, "net": net, "arrays": names},
                                      [np.asarray(inputs[n]) for n in names])
        self.last_forward_s = h.get("forward_s")
        return dict(zip(h["arrays"], outs))

    def close(self) -> None:
        if self._own:
            self.worker.close()
            if self.worker in _live_workers:
                _live_workers.remove(self.worker)


# ---- sophon.sail (the chip) or its stand-in (runtime/sail_sim.py) ---------------------------

# sail.Dtype member name -> numpy dtype name
SAIL_DTYPES = {"BM_FLOAT32": "float32", "BM_FLOAT16": "float16", "BM_BFLOAT16": "bfloat16", "BM_INT8": "int8",
               "BM_UINT8": "uint8", "BM_INT16": "int16", "BM_UINT16": "uint16", "BM_INT32": "int32",
               "BM_UINT32": "uint32"}


def import_sail(backend: str):
    """The sail module of a backend: `sail` = Sophgo's sophon.sail, `sail-sim` = the
    stand-in on the chip simulator. Never one in place of the other."""
    if backend == "sail-sim":
        from fluxc.runtime import sail_sim

        return sail_sim
    try:
        import sophon.sail as sail  # type: ignore
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


def open_engine(backend: str, path: Path, device_id: int = 0) -> Engine:
    if backend == "onnx":
        return OnnxEngine(path)
    if backend == "cmodel":
        return CmodelEngine(path)
    if backend in ("sail", "sail-sim"):
        return SailEngine(path, device_id, import_sail(backend))
    raise FluxcError(f"unknown backend {backend!r}; use cmodel, onnx, sail or sail-sim")
