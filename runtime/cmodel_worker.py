"""Long-lived BM1684X simulator worker: runs bmodels with TPU-MLIR's `pyruntime_bm` on the
chip simulator (cmodel) and answers requests over stdin/stdout.

Runs under the isolated toolchain Python (3.10, numpy + tpu_mlir only); the main fluxc
process starts it with `toolchain_python() cmodel_worker.py` and talks to it through
`fluxc.runtime.cmodel_client.CmodelWorker` (used by `fluxc.runtime.cmodel_engine.CmodelEngine`
and the sail stand-in). Models are loaded once and kept for every call.

Messages are framed by runtime/wire.py (no pickle; loaded by path, see below).
Requests:  {"op": "load", "key": k, "path": p[, "chip": "BM1688"]}  -> {"ok": true, "nets": [...]}
           {"op": "run", "key": k, "net": n, "arrays": [input names]} + arrays
                                                -> {"ok": true, "arrays": [output names]} + arrays
           {"op": "run_dev", "key": k, "net": n, "inputs": [[file, offset, nbytes], ...],
            "outputs": [[file, offset, nbytes], ...]}  (the sail stand-in, runtime/sail_sim.py:
            each net input/output by index is a byte range of a file holding simulated device
            memory; bytes are copied raw, in the net's own dtype, no conversion)
                                                -> {"ok": true, "forward_s": s}
           {"op": "ping"} / {"op": "quit"}
Errors:    {"ok": false, "error": "..."}

The dynamic loader reads LD_LIBRARY_PATH only at process start, so the worker re-executes
itself once with tpu_mlir's library folders on it. If tpu_mlir/lib/third_party still holds
its bundled glibc (libc.so.6, libm.so.6, libpthread.so.0: Ubuntu 22.04's, older than the
host's), a private folder of links to everything else in it is used instead.
"""
from __future__ import annotations

import sys

# This file's folder (fluxc's runtime/) must not shadow the standard library in the worker.
if sys.path and sys.path[0] and __name__ == "__main__":
    sys.path.pop(0)

import ctypes  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _load_wire():
    """runtime/wire.py, the framing fluxc uses too, loaded by path: this folder is off
    sys.path (above) and the fluxc package is not importable in the toolchain Python."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wire.py")
    spec = importlib.util.spec_from_file_location("fluxc_cmodel_wire", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_wire = _load_wire()
read_message, write_message = _wire.read_message, _wire.write_message

_GLIBC = ("libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1")
_MARK = "FLUXC_CMODEL_WORKER_READY"


def _tpu_mlir_root() -> str:
    spec = importlib.util.find_spec("tpu_mlir")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cmodel worker: tpu_mlir is not installed in this Python")
    return list(spec.submodule_search_locations)[0]


def _third_party_dir(root: str) -> str:
    tp = os.path.join(root, "lib", "third_party")
    if not any(os.path.exists(os.path.join(tp, g)) for g in _GLIBC):
        return tp
    shadow = os.path.join(tempfile.gettempdir(), f"fluxc-tpu-third-party-{os.getuid()}",
                          str(abs(hash(tp)) % 10**8))
    os.makedirs(shadow, exist_ok=True)
    for f in os.listdir(tp):
        if f in _GLIBC:
            continue
        link = os.path.join(shadow, f)
        if not os.path.lexists(link):
            try:
                os.symlink(os.path.join(tp, f), link)
            except FileExistsError:
                pass
    return shadow


def _reexec_if_needed() -> None:
    if os.environ.get(_MARK) == "1":
        return
    root = _tpu_mlir_root()
    env = dict(os.environ)
    if "libc.so.6" in env.get("LD_PRELOAD", ""):
        # fluxc.toolchain's environment already preloads the host glibc over the bundled one
        tp = os.path.join(root, "lib", "third_party")
    else:
        tp = _third_party_dir(root)
    dirs = [os.path.join(root, "lib"), os.path.join(root, "lib", "capi"), tp]
    old = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
           if p and p not in dirs and not p.rstrip("/").endswith("lib/third_party")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + old)
    env["TPUC_ROOT"] = root
    env[_MARK] = "1"
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


# ---- dtype conversion (vectorised; tpu_mlir's bf16 helper loops in Python) ---------------

def _to_device(x, dtype: str):
    if dtype == "bf16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    if dtype == "f16":
        return x.astype(np.float16)
    if dtype == "f32":
        return x.astype(np.float32)
    if dtype in ("i32", "si32"):
        return x.astype(np.int32)
    if dtype in ("u32", "ui32"):
        return x.astype(np.uint32)
    if dtype in ("i16", "si16"):
        return x.astype(np.int16)
    if dtype in ("u16", "ui16"):
        return x.astype(np.uint16)
    raise ValueError(f"unsupported input dtype {dtype}")


def _from_device(t):
    d = t.data
    if t.dtype == "bf16":
        return (np.asarray(d).astype(np.uint32) << np.uint32(16)).view(np.float32).copy()
    if t.dtype == "f16":
        return np.asarray(d).astype(np.float32)
    if d.dtype in (np.int8, np.uint8) and getattr(t, "qscale", 0):
        return ((np.asarray(d).astype(np.float32) - t.qzero_point) * np.float32(t.qscale))
    return np.array(d)


_DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "i32": "int32",
                "si32": "int32", "u32": "uint32", "i8": "int8", "si8": "int8", "u8": "uint8",
                "ui8": "uint8", "i16": "int16", "u16": "uint16"}


def _tensor_info(t) -> dict:
    return {"name": t.name, "shape": [int(s) for s in t.data.shape],
            "dtype": _DTYPE_NAMES.get(t.dtype, t.dtype)}


class Worker:
    def __init__(self) -> None:
        self.models: dict[str, object] = {}
        self.nets: dict[tuple[str, str], object] = {}
        self.staged: set[tuple[str, str]] = set()  # nets run at a stage other than their buffers' shape
        self.rt = None
        self.chip = None

    def _runtime(self, chip: str = "BM1684X"):
        # The simulator library is per chip and linked once per process (issue 11: BM1688).
        if self.rt is not None and chip != self.chip:
            raise ValueError(f"this simulator worker runs {self.chip} bmodels, not {chip}; use one worker per chip")
        self.chip = chip
        if self.rt is None:
            # tpu_mlir's modules: importable only in the re-executed environment, on first use
            from filelock import FileLock  # a tpu_mlir dependency

            sys.path.insert(0, os.path.join(os.environ["TPUC_ROOT"], "python", "tools"))
            import model_runner as mr  # noqa: E402  (tpu_mlir's own helpers)

            with FileLock("/tmp/cmodel_so.lock"):
                mr.link_cmodel_so(chip)
                mr.link_custom_so(chip)
                if hasattr(mr, "link_bmlib_so"):
                    mr.link_bmlib_so(chip)
                self.rt = importlib.import_module("pyruntime_bm")
                self._pin = ctypes.CDLL("libcmodel.so")
        return self.rt

    def load(self, key: str, path: str, chip: str = "BM1684X") -> list[dict]:
        rt = self._runtime(chip)
        if key not in self.models:
            self.models[key] = rt.Model(path, 0, "")
        m = self.models[key]
        nets = []
        for name in m.networks:
            net = self._net(key, name)
            nets.append({"name": name, "inputs": [_tensor_info(t) for t in net.inputs],
                         "outputs": [_tensor_info(t) for t in net.outputs]})
        return nets

    def _net(self, key: str, name: str):
        k = (key, name)
        if k not in self.nets:
            self.nets[k] = self.models[key].Net(name)
        return self.nets[k]

    def run(self, key: str, name: str, names: list[str], arrays: list) -> tuple[list, list]:
        net = self._net(key, name)
        given = dict(zip(names, arrays))
        shapes, other_stage = [], False
        for i, t in enumerate(net.inputs):
            x = given.get(t.name)
            if x is None:  # never by position: a renamed input must not be fed silently
                raise ValueError(f"net {name}: input {t.name!r} not given (have {names})")
            if int(x.size) > int(t.data.size):
                raise ValueError(f"net {name}: input {t.name!r} has {x.size} elements, "
                                 f"the bmodel expects shape {list(t.data.shape)}")
            # A net with several stages (one per image size, model_tool --combine of the same
            # net at several shapes) holds buffers of its largest stage; a smaller input picks
            # the stage of its shape through forward_dynamic.
            other_stage |= int(x.size) != int(t.data.size)
            shapes.append([int(v) for v in x.shape])
            t.data.reshape(-1)[:x.size] = _to_device(x, t.dtype).reshape(-1)
        t0 = time.perf_counter()
        if other_stage or (key, name) in self.staged:
            # once a net ran another stage, every call names its shapes (the stage is chosen by them)
            self.staged.add((key, name))
            out_shapes = net.forward_dynamic(shapes)
        else:
            net.forward()
            out_shapes = None
        self.last_forward_s = time.perf_counter() - t0
        outs = [_from_device(t) for t in net.outputs]
        if out_shapes is not None:
            outs = [np.ascontiguousarray(o.reshape(-1)[:int(np.prod(sh))].reshape(sh))
                    for o, sh in zip(outs, out_shapes)]
        return [t.name for t in net.outputs], outs

    def run_dev(self, key: str, name: str, ins: list, outs: list, shapes: list | None = None) -> None:
        """Run a net on byte ranges of simulated device memory (files, memory-mapped). `shapes`:
        the input shapes of the stage to run (a net merged at several image sizes holds one
        stage per size and buffers of its largest); default the net's own (largest) shapes."""
        net = self._net(key, name)
        if len(ins) != len(net.inputs) or len(outs) != len(net.outputs):
            raise ValueError(f"net {name}: {len(ins)} inputs / {len(outs)} outputs given, "
                             f"it has {len(net.inputs)} / {len(net.outputs)}")
        if shapes is None:
            shapes = [[int(v) for v in t.data.shape] for t in net.inputs]
        other_stage = False
        for t, (path, off, n), shape in zip(net.inputs, ins, shapes):
            dst = t.data.reshape(-1).view(np.uint8)
            want = int(np.prod(shape)) * t.data.dtype.itemsize
            if n != want or want > dst.nbytes:
                raise ValueError(f"net {name}: input {t.name!r} of shape {list(shape)} takes {want} bytes "
                                 f"(the net's buffer {dst.nbytes}), got {n}")
            other_stage |= list(shape) != [int(v) for v in t.data.shape]
            dst[:n] = np.memmap(path, dtype=np.uint8, mode="r", offset=off, shape=(n,))
        t0 = time.perf_counter()
        if other_stage or (key, name) in self.staged:
            # the stage of these shapes, as run() does (forward_dynamic once a net ran another stage)
            self.staged.add((key, name))
            out_shapes = net.forward_dynamic(shapes)
        else:
            net.forward()
            out_shapes = [[int(v) for v in t.data.shape] for t in net.outputs]
        self.last_forward_s = time.perf_counter() - t0
        for t, (path, off, n), sh in zip(net.outputs, outs, out_shapes):
            src = np.ascontiguousarray(t.data).reshape(-1)[:int(np.prod(sh))].view(np.uint8)
            if n != src.nbytes:
                raise ValueError(f"net {name}: output {t.name!r} of shape {list(sh)} gives {src.nbytes} bytes, "
                                 f"got room for {n}")
            mm = np.memmap(path, dtype=np.uint8, mode="r+", offset=off, shape=(n,))
            mm[:] = src
            mm.flush()
            del mm


def main() -> None:
    _reexec_if_needed()
    # Keep the protocol channel private: whatever the runtime prints goes to stderr.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto_in = os.fdopen(os.dup(0), "rb")
    w = Worker()
    write_message(proto_out, {"ok": True, "ready": True, "pid": os.getpid()})
    while True:
        try:
            header, arrays = read_message(proto_in)
        except EOFError:
            return
        op = header.get("op")
        try:
            if op == "quit":
                write_message(proto_out, {"ok": True})
                return
            if op == "ping":
                write_message(proto_out, {"ok": True})
            elif op == "load":
                write_message(proto_out, {"ok": True, "nets": w.load(header["key"], header["path"],
                                                                  header.get("chip", "BM1684X"))})
            elif op == "run":
                names, outs = w.run(header["key"], header["net"], header.get("arrays", []), arrays)
                write_message(proto_out, {"ok": True, "arrays": names,
                                          "forward_s": round(w.last_forward_s, 4)}, outs)
            elif op == "run_dev":
                w.run_dev(header["key"], header["net"], header["inputs"], header["outputs"], header.get("shapes"))
                write_message(proto_out, {"ok": True, "forward_s": round(w.last_forward_s, 4)})
            else:
                write_message(proto_out, {"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # reported to the caller, the worker stays up
            write_message(proto_out, {"ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
