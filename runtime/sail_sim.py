"""A stand-in for the part of sophon.sail that fluxc's runtime uses, run on TPU-MLIR's chip
simulator. Selected only by `--backend sail-sim` (never in place of a real sophon.sail).

What it models (names and call shapes as in sophon.sail's documented Python API):
- `Handle(dev_id)`: one simulated chip; an id at or above `get_available_tpu_num()` fails.
- `Tensor(handle, shape, dtype, own_sys_data, own_dev_data)`: device memory is a file in
  /dev/shm (memory-mapped by the simulator workers), host memory a numpy array.
  `update_data` writes host memory, or device memory when there is none (as sail does) and
  demands the tensor's own dtype; `sync_s2d`, `sync_d2s`, `sync_d2d(src, off_src, off_dst, n)`
  (element offsets; works across chips, like sail's) move bytes and are counted.
- `EngineLLM(bmodel, [dev_id])`: one bmodel on one chip, hosted by one simulator worker
  process (runtime/cmodel_worker.py; one per file, see cmodel_client.new_worker). Graph names,
  input/output names, shapes and dtypes come from the bmodel; `process(graph, {i: Tensor},
  {i: Tensor})` runs the net on the tensors' device memory: the bytes never pass through
  this process.
- Stages (a net merged at several input shapes, `model_tool --combine`): `get_stage_num`,
  `get_input_shape(g, i, stage)`, `get_output_shape`, `get_input_max_shape`, and the addrmode0
  getters per stage, from the stages `model_tool --info` lists (stage 0 first). `process` runs
  the stage whose input shapes are the input tensors' shapes, as bmruntime chooses it for a
  static net (no such stage: refused), and wants that stage's output shapes (the board takes
  any large-enough output buffer; the stand-in is stricter).
- `get_addr_mode` is 0 (TPU-MLIR's `auto` is `basic` on BM1684X), so, as in sail,
  `get_input_tensors`/`get_output_tensors` return {} and the addrmode0 getters return tensors
  describing the net's own I/O memory (shape and dtype; their bytes live inside the file's
  shared runtime memory and are not addressable here).
- Accounting per chip: allocations, bytes in use and peak, loaded model memory (weight +
  instruct + runtime from `model_tool --info` of the file, as bmruntime allocates at load),
  host<->device and device<->device bytes. A load or allocation past the chip's memory
  limit raises, like an out-of-memory on the board.

Configuration: `configure(chips=3, memory_mb=...)`, or the environment variables
FLUXC_SAIL_SIM_CHIPS (default 3) and FLUXC_SAIL_SIM_MEMORY_MB (default: the SE7-32 TPU
budget, runtime.device_memory.BUDGET_MB["SE7-32"]).
"""
from __future__ import annotations

import enum
import itertools
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError
from fluxc.runtime.cmodel_client import _live_workers, new_worker
from fluxc.toolchain import run_tool


class SailSimError(FluxcError):
    """A call the real sophon.sail would refuse (bad device, dtype, size, out of memory)."""


class Dtype(enum.Enum):
    BM_FLOAT32 = "float32"
    BM_FLOAT16 = "float16"
    BM_BFLOAT16 = "bfloat16"
    BM_INT8 = "int8"
    BM_UINT8 = "uint8"
    BM_INT16 = "int16"
    BM_UINT16 = "uint16"
    BM_INT32 = "int32"
    BM_UINT32 = "uint32"


# numpy storage of each dtype (bfloat16 is carried as its raw 16 bits)
_STORAGE = {Dtype.BM_FLOAT32: np.float32, Dtype.BM_FLOAT16: np.float16, Dtype.BM_BFLOAT16: np.uint16,
            Dtype.BM_INT8: np.int8, Dtype.BM_UINT8: np.uint8, Dtype.BM_INT16: np.int16,
            Dtype.BM_UINT16: np.uint16, Dtype.BM_INT32: np.int32, Dtype.BM_UINT32: np.uint32}
_BY_NAME = {d.value: d for d in Dtype}


def dtype_of(name: str) -> Dtype:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise SailSimError(f"dtype {name!r} is not supported by the sail stand-in") from None


# ---- simulated chips ---------------------------------------------------------------------

@dataclass
class ChipStats:
    """What one simulated chip has seen (bytes)."""

    dev_id: int
    limit: int
    allocations: int = 0  # device tensors created, ever
    live_tensors: int = 0
    tensor_bytes: int = 0  # in use now
    model_bytes: int = 0  # loaded bmodels: weight + instruct + runtime
    peak_bytes: int = 0  # max of tensor_bytes + model_bytes
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    d2d_bytes: int = 0  # within this chip
    c2c_in_bytes: int = 0  # copied into this chip from another one
    models: list[str] = field(default_factory=list)
    tensor_log: list[tuple[tuple[int, ...], str, int]] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return self.tensor_bytes + self.model_bytes

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("dev_id", "limit", "allocations", "live_tensors", "tensor_bytes",
                                            "model_bytes", "peak_bytes", "h2d_bytes", "d2h_bytes", "d2d_bytes",
                                            "c2c_in_bytes")}
        d["models"] = list(self.models)
        d["used_bytes"] = self.used_bytes
        return d


_lock = threading.Lock()
_config: dict = {}
_chips: dict[int, ChipStats] = {}
_root: Path | None = None
_ids = itertools.count()


def configure(chips: int | None = None, memory_mb: float | None = None) -> None:
    """Number of simulated chips and device memory per chip. Resets all counters."""
    reset()
    if chips is not None:
        _config["chips"] = int(chips)
    if memory_mb is not None:
        _config["memory_mb"] = float(memory_mb)


def get_available_tpu_num() -> int:
    if "chips" in _config:
        return _config["chips"]
    try:
        return int(os.environ.get("FLUXC_SAIL_SIM_CHIPS", "3"))
    except ValueError:
        raise SailSimError("FLUXC_SAIL_SIM_CHIPS must be a whole number of chips") from None


def memory_limit_bytes() -> int:
    from fluxc.runtime.device_memory import (  # deferred: device_memory reaches this module (models -> backends -> sail_engine)
        BUDGET_MB, MB)

    mb = _config.get("memory_mb")
    if mb is None:
        mb = float(os.environ.get("FLUXC_SAIL_SIM_MEMORY_MB", BUDGET_MB["SE7-32"]))
    return int(mb * MB)


def chip(dev_id: int) -> ChipStats:
    n = get_available_tpu_num()
    if not isinstance(dev_id, int) or dev_id < 0 or dev_id >= n:
        raise SailSimError(f"device {dev_id} does not exist (the sail stand-in has {n} chip(s): "
                           f"ids 0..{n - 1}; FLUXC_SAIL_SIM_CHIPS sets how many)")
    with _lock:
        if dev_id not in _chips:
            _chips[dev_id] = ChipStats(dev_id, memory_limit_bytes())
        return _chips[dev_id]


def stats() -> dict[int, ChipStats]:
    return dict(_chips)


def reset() -> None:
    """Forget every chip's counters (tensors still alive keep their files)."""
    with _lock:
        _chips.clear()
        _config.clear()


def _charge(c: ChipStats, nbytes: int, what: str) -> None:
    with _lock:
        if c.used_bytes + nbytes > c.limit:
            raise SailSimError(f"device {c.dev_id}: out of device memory for {what} ({nbytes / 2**20:.1f} MiB; "
                               f"{c.used_bytes / 2**20:.1f} of {c.limit / 2**20:.0f} MiB in use)")


def _device_root() -> Path:
    global _root
    if _root is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _root = Path(tempfile.mkdtemp(prefix=f"fluxc-sailsim-{os.getpid()}-", dir=base))
        import atexit

        atexit.register(shutil.rmtree, str(_root), True)
    return _root


class Handle:
    def __init__(self, dev_id: int = 0):
        self._chip = chip(dev_id)
        self.dev_id = dev_id

    def get_device_id(self) -> int:
        return self.dev_id


class Tensor:
    """Host memory (numpy) and/or device memory (a file in /dev/shm) of one tensor."""

    def __init__(self, handle: Handle, shape, dtype: Dtype | None = None, own_sys_data: bool = True,
                 own_dev_data: bool = True, *, _net_io: str | None = None):
        if isinstance(shape, np.ndarray):  # Tensor(handle, array, own_sys_data=True)
            arr = shape
            own_sys_data = True if dtype is None else bool(dtype)
            dtype = _BY_NAME.get(str(arr.dtype))
            if dtype is None:
                raise SailSimError(f"numpy dtype {arr.dtype} has no sail Dtype")
            self.__init__(handle, list(arr.shape), dtype, own_sys_data, True)
            self.update_data(arr)
            if own_sys_data:
                self.sync_s2d()
            return
        if not isinstance(dtype, Dtype):
            raise SailSimError(f"Tensor dtype must be a sail Dtype, got {dtype!r}")
        self.handle = handle
        self._chip = handle._chip
        self._shape = [int(x) for x in shape]
        self._dtype = dtype
        self._np = _STORAGE[dtype]
        self.size = int(np.prod(self._shape)) if self._shape else 1
        self.nbytes = self.size * np.dtype(self._np).itemsize
        self._sys = np.zeros(self._shape, self._np) if own_sys_data else None
        self._path: Path | None = None
        self._net_io = _net_io
        if own_dev_data:
            c = self._chip
            _charge(c, self.nbytes, f"a {self._shape} {dtype.value} tensor")
            self._path = _device_root() / f"d{c.dev_id}_t{next(_ids)}.bin"
            with open(self._path, "wb") as f:
                f.truncate(self.nbytes)
            with _lock:
                c.allocations += 1
                c.live_tensors += 1
                c.tensor_bytes += self.nbytes
                c.peak_bytes = max(c.peak_bytes, c.used_bytes)
                c.tensor_log.append((tuple(self._shape), dtype.value, self.nbytes))

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass

    def free(self) -> None:
        if self._path is not None:
            with _lock:
                self._chip.live_tensors -= 1
                self._chip.tensor_bytes -= self.nbytes
            try:
                self._path.unlink()
            except OSError:
                pass
            self._path = None

    # -- info
    def shape(self) -> list[int]:
        return list(self._shape)

    def dtype(self) -> Dtype:
        return self._dtype

    def own_sys_data(self) -> bool:
        return self._sys is not None

    def own_dev_data(self) -> bool:
        return self._path is not None

    def device_file(self) -> tuple[str, int, int]:
        """(file, byte offset, bytes) of the device memory (the worker protocol)."""
        if self._path is None:
            if self._net_io:
                raise SailSimError(f"{self._net_io}: a net's own I/O memory (addr_mode 0) lives inside the "
                                   "bmodel's shared runtime memory; create your own tensors with its shape and dtype")
            raise SailSimError("this tensor has no device memory (own_dev_data=False)")
        return str(self._path), 0, self.nbytes

    def _dev(self, mode: str = "r+") -> np.memmap:
        path, off, n = self.device_file()
        return np.memmap(path, dtype=self._np, mode=mode, offset=off, shape=(self.size,))

    # -- host side
    def asnumpy(self, shape=None) -> np.ndarray:
        if self._sys is None:
            raise SailSimError("asnumpy() on a tensor without system memory (own_sys_data=False)")
        return self._sys.reshape(shape) if shape is not None else self._sys

    def update_data(self, data: np.ndarray) -> None:
        data = np.asarray(data)
        if data.dtype != np.dtype(self._np):
            raise SailSimError(f"update_data: {data.dtype} data into a {self._dtype.name} tensor (sail needs "
                               "the tensor's own dtype)")
        if data.size > self.size:
            raise SailSimError(f"update_data: {data.size} elements into a tensor of {self.size}")
        flat = np.ascontiguousarray(data).reshape(-1)
        if self._sys is not None:
            self._sys.reshape(-1)[:flat.size] = flat
        else:
            mm = self._dev()
            mm[:flat.size] = flat
            mm.flush()
            with _lock:
                self._chip.h2d_bytes += flat.nbytes

    # -- transfers
    def sync_s2d(self, size: int | None = None) -> None:
        if self._sys is None:
            raise SailSimError("sync_s2d() on a tensor without system memory")
        n = self.size if size is None else size // np.dtype(self._np).itemsize
        mm = self._dev()
        mm[:n] = self._sys.reshape(-1)[:n]
        mm.flush()
        with _lock:
            self._chip.h2d_bytes += n * np.dtype(self._np).itemsize

    def sync_d2s(self, size: int | None = None) -> None:
        if self._sys is None:
            raise SailSimError("sync_d2s() on a tensor without system memory")
        n = self.size if size is None else size // np.dtype(self._np).itemsize
        self._sys.reshape(-1)[:n] = self._dev("r")[:n]
        with _lock:
            self._chip.d2h_bytes += n * np.dtype(self._np).itemsize

    def sync_d2d(self, src: "Tensor", offset_src: int, offset_dst: int, length: int) -> None:
        if src._dtype != self._dtype:
            raise SailSimError(f"sync_d2d: {src._dtype.name} source into a {self._dtype.name} tensor")
        if offset_src + length > src.size or offset_dst + length > self.size or min(offset_src, offset_dst, length) < 0:
            raise SailSimError(f"sync_d2d: range out of bounds (src {offset_src}+{length} of {src.size}, "
                               f"dst {offset_dst}+{length} of {self.size})")
        dst = self._dev()
        dst[offset_dst:offset_dst + length] = src._dev("r")[offset_src:offset_src + length]
        dst.flush()
        n = length * np.dtype(self._np).itemsize
        with _lock:
            if src._chip is self._chip:
                self._chip.d2d_bytes += n
            else:
                self._chip.c2c_in_bytes += n

    def zeros(self) -> None:
        if self._sys is not None:
            self._sys[...] = 0
        if self._path is not None:
            mm = self._dev()
            mm[:] = 0
            mm.flush()


# ---- engine ------------------------------------------------------------------------------

def _model_info(path: Path) -> tuple[dict, dict[str, list[tuple[list, list]]]]:
    """(weight / instruct / runtime bytes, net -> [(input shapes, output shapes) per stage]) of a
    bmodel, from `model_tool --info` (what bmruntime allocates when it loads the file, and the
    stages it holds: one per image size for a net merged at several sizes)."""
    from fluxc.compile.parse import parse_info  # deferred: the same cycle as below
    from fluxc.runtime.device_memory import bmodel_memory_from_info  # deferred: the same cycle

    with tempfile.TemporaryDirectory(prefix="fluxc-sailsim-info-") as td:
        log = Path(td) / "info.log"
        run_tool("model_tool", ["--info", str(Path(path).resolve())], cwd=Path(td), log=log, timeout=300)
        text = log.read_text(errors="replace")
    stages = {n.name: [([list(t.shape) for t in st["inputs"]], [list(t.shape) for t in st["outputs"]])
                       for st in n.stages] for n in parse_info(text).nets}
    return bmodel_memory_from_info(text), stages


class EngineLLM:
    """One bmodel on one simulated chip (sail.EngineLLM's calls fluxc uses)."""

    def __init__(self, bmodel_path: str, dev_ids: list[int]):
        if len(dev_ids) != 1:
            raise SailSimError("the sail stand-in runs a bmodel on exactly one chip; give one device id")
        self.path = Path(bmodel_path)
        self.dev_id = int(dev_ids[0])
        self._chip = chip(self.dev_id)
        if not self.path.is_file():
            raise SailSimError(f"bmodel {self.path} not found")
        self.memory, stages = _model_info(self.path)
        _charge(self._chip, self.memory["total"], f"loading {self.path.name}")
        self.worker = new_worker()
        self.key = self.worker.new_key()
        try:
            h, _ = self.worker.request({"op": "load", "key": self.key, "path": str(self.path.resolve())})
        except FluxcError as e:
            self.close()
            raise SailSimError(f"cannot load {self.path} ({str(e).splitlines()[0]})") from None
        with _lock:
            self._chip.model_bytes += self.memory["total"]
            self._chip.peak_bytes = max(self._chip.peak_bytes, self._chip.used_bytes)
            self._chip.models.append(self.path.name)
        self._loaded = True
        self._nets = {n["name"]: n for n in h["nets"]}
        # per net, its stages' input/output shapes (stage 0 first, as in the file); a net of one
        # stage (or one model_tool did not list) has the shapes the simulator loaded
        for name, n in self._nets.items():
            st = [(i, o) for i, o in stages.get(name, []) if len(i) == len(n["inputs"]) and len(o) == len(n["outputs"])]
            n["stages"] = st or [([t["shape"] for t in n["inputs"]], [t["shape"] for t in n["outputs"]])]
        self.last_forward_s = 0.0

    def close(self) -> None:
        if getattr(self, "_loaded", False):
            with _lock:
                self._chip.model_bytes -= self.memory["total"]
                if self.path.name in self._chip.models:
                    self._chip.models.remove(self.path.name)
            self._loaded = False
        w = getattr(self, "worker", None)
        if w is not None:
            w.close()
            if w in _live_workers:
                _live_workers.remove(w)
            self.worker = None

    def _net(self, g: str) -> dict:
        try:
            return self._nets[g]
        except KeyError:
            raise SailSimError(f"{self.path.name}: no graph named {g!r}") from None

    # -- info
    def get_device_ids(self) -> list[int]:
        return [self.dev_id]

    def get_graph_names(self) -> list[str]:
        return list(self._nets)

    def get_addr_mode(self, g: str) -> int:
        self._net(g)
        return 0

    def get_stage_num(self, g: str) -> int:
        return len(self._net(g)["stages"])

    def get_is_dynamic(self, g: str) -> bool:
        self._net(g)
        return False

    def get_input_num(self, g: str) -> int:
        return len(self._net(g)["inputs"])

    def get_output_num(self, g: str) -> int:
        return len(self._net(g)["outputs"])

    def get_input_name(self, g: str, i: int) -> str:
        return self._net(g)["inputs"][i]["name"]

    def get_output_name(self, g: str, i: int) -> str:
        return self._net(g)["outputs"][i]["name"]

    def _stage(self, g: str, stage: int) -> tuple[list, list]:
        st = self._net(g)["stages"]
        if not 0 <= int(stage) < len(st):
            raise SailSimError(f"{g}: no stage {stage} (the net has {len(st)})")
        return st[int(stage)]

    def get_input_shape(self, g: str, i: int, stage: int = 0) -> list[int]:
        return list(self._stage(g, stage)[0][i])

    def get_output_shape(self, g: str, i: int, stage: int = 0) -> list[int]:
        return list(self._stage(g, stage)[1][i])

    def get_input_max_shape(self, g: str, i: int) -> list[int]:
        return list(self._net(g)["inputs"][i]["shape"])  # the simulator's buffers: the largest stage

    def get_output_max_shape(self, g: str, i: int) -> list[int]:
        return list(self._net(g)["outputs"][i]["shape"])

    def get_input_dtype(self, g: str, i: int) -> Dtype:
        return dtype_of(self._net(g)["inputs"][i]["dtype"])

    def get_output_dtype(self, g: str, i: int) -> Dtype:
        return dtype_of(self._net(g)["outputs"][i]["dtype"])

    # -- tensors
    def get_input_tensors(self, g: str, stage: int = 0) -> dict:
        self._net(g)
        return {}  # addr_mode 0: sail gives these only for addr_mode 1

    def get_output_tensors(self, g: str, stage: int = 0) -> dict:
        self._net(g)
        return {}

    def _net_io(self, g: str, kind: str, stage: int) -> dict:
        h = Handle(self.dev_id)
        shapes = self._stage(g, stage)[0 if kind == "inputs" else 1]
        return {i: Tensor(h, shapes[i], dtype_of(t["dtype"]), False, False, _net_io=f"{g} stage {stage} {kind} {i}")
                for i, t in enumerate(self._net(g)[kind])}

    def get_input_tensors_addrmode0(self, g: str, stage: int = 0) -> dict:
        return self._net_io(g, "inputs", stage)

    def get_output_tensors_addrmode0(self, g: str, stage: int = 0) -> dict:
        return self._net_io(g, "outputs", stage)

    def create_max_input_tensors(self, g: str) -> dict:
        h = Handle(self.dev_id)
        return {i: Tensor(h, t["shape"], dtype_of(t["dtype"]), True, True) for i, t in enumerate(self._net(g)["inputs"])}

    def create_max_output_tensors(self, g: str) -> dict:
        h = Handle(self.dev_id)
        return {i: Tensor(h, t["shape"], dtype_of(t["dtype"]), True, True) for i, t in enumerate(self._net(g)["outputs"])}

    # -- run
    def process(self, g: str, inputs: dict, outputs: dict) -> int:
        """Run net g on the tensors' device memory. As bmruntime does for a static net, the
        stage is the one whose input shapes are the input tensors' shapes (none: refused); the
        output tensors must have that stage's output shapes (stricter than the board, which
        takes any large-enough buffer)."""
        net = self._net(g)
        for kind, given in (("inputs", inputs), ("outputs", outputs)):
            want = net[kind]
            if sorted(given) != list(range(len(want))):
                raise SailSimError(f"{g}: {kind} map has indices {sorted(given)}, the net has {len(want)}")
            for i, t in enumerate(want):
                x = given[i]
                if x._chip is not self._chip:
                    raise SailSimError(f"{g}: {kind[:-1]} {i} is on device {x._chip.dev_id}, the net runs on "
                                       f"device {self.dev_id}")
                if x._dtype.value != t["dtype"]:
                    raise SailSimError(f"{g}: {kind[:-1]} {t['name']!r} is {t['dtype']}, the tensor is {x._dtype.value}")
        got = [list(inputs[i]._shape) for i in range(len(net["inputs"]))]
        stage = next((k for k, (ins, _) in enumerate(net["stages"]) if [list(x) for x in ins] == got), None)
        if stage is None:
            have = "; ".join(" ".join(str(list(x)) for x in ins) for ins, _ in net["stages"])
            raise SailSimError(f"{g}: input shapes {' '.join(str(x) for x in got)} match no stage of the net "
                               f"(its stages take {have})")
        ins_shapes, outs_shapes = net["stages"][stage]
        for i, t in enumerate(net["outputs"]):
            x = outputs[i]
            if list(x._shape) != list(outs_shapes[i]):
                raise SailSimError(f"{g}: output {t['name']!r} of stage {stage} is {t['dtype']} {list(outs_shapes[i])}, "
                                   f"the tensor is {x._dtype.value} {x._shape}")
        spans = {"inputs": [list(inputs[i].device_file()) for i in range(len(net["inputs"]))],
                 "outputs": [list(outputs[i].device_file()) for i in range(len(net["outputs"]))]}
        h, _ = self.worker.request({"op": "run_dev", "key": self.key, "net": g, "inputs": spans["inputs"],
                                    "outputs": spans["outputs"], "shapes": [list(x) for x in ins_shapes]})
        self.last_forward_s = h.get("forward_s", 0.0)
        self.last_stage = stage
        return 0
