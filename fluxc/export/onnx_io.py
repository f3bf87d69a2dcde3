"""Writing one piece to ONNX: TorchScript exporter (opset 17), static shapes, the piece's own
input/output names, token ids as float32 (the pieces cast them); then onnx shape inference and the onnx checker (full
check on the graph).

Weights: torch's constant folding is OFF, so every initializer is a parameter of the piece
exactly as the checkpoint holds it (no transposed or pre-scaled copies; TPU-MLIR folds those
constant ops itself: same top MLIR and cost estimate, checked on a double block). That lets
the checkpoint tensors be referenced in place (`weight_refs`, fluxc.export.weights): the
piece file is then the graph alone, whatever the model size, and a block of a repeated kind
is written by `rebind_piece` from another block's file without tracing again. Other
initializers (buffers, baked constants) are written inline, or to `<piece>.onnx.data` above
2 GB, one tensor at a time (see _write_with_weights).

Files land under temporary names and are renamed into place only once checked.
"""
from __future__ import annotations

import gc
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fluxc.errors import FluxcError
from fluxc.specs import PieceSpec

OPSET = 17
TWO_GB = 2 * 1024**3
# Leave headroom below protobuf's hard 2 GiB limit for the graph itself.
EXTERNAL_THRESHOLD = TWO_GB - 64 * 1024**2
# Inline files up to this size are parsed again by the onnx checker after writing.
RECHECK_MAX_BYTES = 512 * 1024**2


def torch_inputs(spec: PieceSpec, seed: int = 0):
    import torch

    return tuple(torch.from_numpy(a) for a in spec.sample_inputs(seed).values())


def _elem_type_name(elem_type: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def _initializer_bytes(model) -> int:
    import onnx

    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def check_io(model, spec: PieceSpec, where: str) -> None:
    """The ONNX graph's inputs/outputs are exactly the spec's (names, order, dtype, shape)."""
    for kind, got, want in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        got_l = [(v.name, _elem_type_name(v.type.tensor_type.elem_type),
                  tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in got]
        want_l = [(t.name, t.dtype, tuple(t.shape)) for t in want]
        if got_l != want_l:
            raise FluxcError(f"{where}: ONNX {kind}s {got_l} differ from the spec {want_l} "
                             f"(a bug in the piece wrapper)")


def _torch_export(module, spec: PieceSpec, path: Path, args) -> dict | None:
    """torch.onnx.export (TorchScript, opset 17, constant folding) writing the graph WITHOUT
    its weights; returns the exporter's own (constant-folded) parameters by graph name.

    The exporter serialises weights through several full copies (proto, string, bytes); by
    taking the folded parameters from its `_model_to_graph` step and adding them to the
    graph ourselves, one tensor at a time, the peak stays near two copies of the piece.
    If that private step is not there (another torch), the weights are exported normally
    and None is returned."""
    import torch

    try:
        from torch.onnx._internal.torchscript_exporter import utils as tsu

        orig = tsu._model_to_graph
    except (ImportError, AttributeError):
        tsu = orig = None
    captured: dict = {}

    def capture(*a, **k):
        graph, params, out = orig(*a, **k)
        captured.update(params)
        return graph, params, out

    if tsu is not None:
        tsu._model_to_graph = capture
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(path),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                opset_version=OPSET, do_constant_folding=False, dynamo=False,
                export_params=tsu is None, keep_initializers_as_inputs=False,
            )
    finally:
        if tsu is not None:
            tsu._model_to_graph = orig
    return captured if tsu is not None else None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer


def _write_with_weights(model, params: dict, names: list[str], path: Path, data_name: str | None) -> None:
    """Write `model` (a graph without weights) plus the tensors `names` from `params` as its
    initializers, one tensor at a time (each is popped from `params` and freed once written).

    Inline: protobuf merges repeated occurrences of an embedded message field, so the file is
    the weightless ModelProto followed by one `graph { initializer { ... } }` chunk per tensor,
    which onnx.load reads as a single graph. External (data_name given): raw bytes go to
    `data_name` next to `path`, the ModelProto carries external_data references."""
    import onnx
    from onnx import numpy_helper

    if data_name is None:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            for name in names:
                arr = np.ascontiguousarray(params.pop(name).detach().cpu().numpy())
                chunk = numpy_helper.from_array(arr, name).SerializeToString()
                del arr
                f.write(_len_field(_GRAPH_FIELD, _len_field(_INITIALIZER_FIELD, chunk)))
                del chunk
        return
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for name in names:
            arr = np.ascontiguousarray(params.pop(name).detach().cpu().numpy())
            t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype),
                                 dims=list(arr.shape), data_location=onnx.TensorProto.EXTERNAL)
            pad = (-offset) % 4096  # 4 KiB alignment lets readers memory-map tensors
            f.write(b"\0" * pad)
            offset += pad
            data = arr.tobytes()
            del arr
            f.write(data)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(data)
            del data
            model.graph.initializer.append(t)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


STORED_SUFFIX = "__stored"  # external initializer name when the graph casts it to float32


def _attach_refs(model, params: dict, names: list[str], refs: dict) -> list[str]:
    """Turn the initializers in `refs` into external references to the checkpoint (with a Cast
    node where the stored dtype is not float32); returns the names still to be written."""
    import onnx
    from onnx import helper

    casts, rest = [], []
    for name in names:
        r = refs.get(name)
        if r is None:
            rest.append(name)
            continue
        got = tuple(params[name].shape)
        if got != tuple(r.shape):
            raise FluxcError(f"initializer {name}: shape {got} differs from checkpoint tensor {r.key} {r.shape} (bug)")
        stored = name if r.elem_type == onnx.TensorProto.FLOAT else name + STORED_SUFFIX
        t = onnx.TensorProto(name=stored, data_type=r.elem_type, dims=list(r.shape),
                             data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", r.location), ("offset", str(r.offset)), ("length", str(r.length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        model.graph.initializer.append(t)
        if stored != name:
            casts.append(helper.make_node("Cast", [stored], [name], to=onnx.TensorProto.FLOAT, name=f"{name}/cast"))
        params.pop(name)
    if casts:
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(casts + nodes)
    return rest


def external_params(model) -> dict[str, Any]:
    """{graph parameter name: external initializer} of a piece (references into weights/)."""
    import onnx

    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc.startswith("weights/"):
                out[t.name[:-len(STORED_SUFFIX)] if t.name.endswith(STORED_SUFFIX) else t.name] = t
    return out


def check_written(path: Path, spec: PieceSpec) -> None:
    """The written piece file, read back: the onnx checker on its graph, its I/O against the
    spec, and every reference into weights/ inside its file. (onnx's own by-path check is not
    used: recent onnx refuses hard-linked external data, which ONNX Runtime and TPU-MLIR read.)"""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ext = external_params(model)
    if not ext:
        onnx.checker.check_model(model, full_check=False)
    # (with references, the graph had its full check before they were attached)
    check_io(model, spec, spec.name)
    base = Path(path).parent
    for t in ext.values():
        kv = {e.key: e.value for e in t.external_data}
        f = base / kv["location"]
        if ".." in Path(kv["location"]).parts or not f.is_file():
            raise FluxcError(f"{spec.name}: weight file {kv['location']} is missing; re-run `fluxc export`")
        if int(kv["offset"]) + int(kv["length"]) > f.stat().st_size:
            raise FluxcError(f"{spec.name}: {kv['location']} is shorter than the tensor {t.name} it holds; "
                             f"re-run `fluxc export`")


def rebind_piece(template: Path, spec: PieceSpec, out_dir: Path, refs: dict) -> list[str]:
    """Write `<out_dir>/<spec.file>` as the template piece's graph with its checkpoint
    references pointed at another block's tensors (`refs`: parameter name -> WeightRef).
    Valid for pieces of one kind, whose graphs depend only on shapes and config, never on
    weight values (tests compare this against a direct export). Raises FluxcError when the
    template does not reference exactly these parameters with these dtypes and shapes."""
    import onnx

    model = onnx.load(str(template), load_external_data=False)
    if (Path(template).parent / f"{Path(template).name}.data").exists():
        raise FluxcError(f"{template}: pieces with inline weights above 2 GB cannot be rebound")
    ext = external_params(model)
    if set(ext) != set(refs):
        raise FluxcError(f"{spec.name}: parameters differ from template {template.name}")
    for name, t in ext.items():
        r = refs[name]
        if t.data_type != r.elem_type or tuple(t.dims) != tuple(r.shape):
            raise FluxcError(f"{spec.name}: {r.key} has another dtype or shape than in {template.name}")
        vals = {"location": r.location, "offset": str(r.offset), "length": str(r.length)}
        for e in t.external_data:
            if e.key in vals:
                e.value = vals.pop(e.key)
    check_io(model, spec, spec.name)
    out_dir = Path(out_dir)
    tmp = out_dir / f".{spec.name}.rebind-{os.getpid()}.onnx"
    try:
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        check_written(tmp, spec)
        os.replace(tmp, out_dir / spec.file)
    finally:
        tmp.unlink(missing_ok=True)
    data = out_dir / f"{spec.file}.data"
    if data.exists():
        data.unlink()
    return [spec.file]


def export_piece(module, spec: PieceSpec, out_dir: Path, *, release=None, weight_refs: dict | None = None) -> list[str]:
    """Export `module` as `<out_dir>/<spec.file>`; return the file names written.

    `release()`, if given, is called right after the torch export to free the piece's own
    weights. Memory: the weights exist once (the exporter's folded parameters) plus one
    tensor being written; shape inference and the structural check run on the weightless
    graph, the final file is checked again by path. `weight_refs` (initializer name -> WeightRef)
    makes those initializers references into the checkpoint instead of copies."""
    import onnx

    out_dir = Path(out_dir)
    tmp = out_dir / f".{spec.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        raw = tmp / "raw.onnx"
        args = torch_inputs(spec)
        params = _torch_export(module, spec, raw, args)
        del args
        if release is not None:
            release()
        gc.collect()
        onnx_name, data_name = spec.file, f"{spec.file}.data"
        staged = tmp / "staged"
        staged.mkdir()
        if params is None:  # fallback: torch wrote the weights itself
            model = onnx.load(str(raw), load_external_data=True)
            check_io(model, spec, spec.name)
            external = _initializer_bytes(model) > EXTERNAL_THRESHOLD
            onnx.save_model(model, str(staged / onnx_name), save_as_external_data=external,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            del model
        else:
            model = onnx.load(str(raw))  # the graph only: parameters are still graph inputs
            want = {t.name for t in spec.inputs}
            names = [i.name for i in model.graph.input if i.name not in want]
            missing = [n for n in names if n not in params]
            if missing:
                raise FluxcError(f"{spec.name}: the exporter left inputs {missing[:3]} without weights "
                                 f"(unexpected torch version?)")
            try:
                model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
            except Exception:  # shape inference is a nicety, not a requirement
                pass
            onnx.checker.check_model(model, full_check=True)
            keep = [i for i in model.graph.input if i.name in want]
            del model.graph.input[:]
            model.graph.input.extend(keep)
            check_io(model, spec, spec.name)
            if weight_refs:
                names = _attach_refs(model, params, names, weight_refs)
            total = sum(int(np.prod(params[n].shape)) * params[n].element_size() for n in names)
            external = total > EXTERNAL_THRESHOLD
            _write_with_weights(model, params, names, staged / onnx_name, data_name if external else None)
            params.clear()
            del model, params
        gc.collect()
        _trim_heap()
        if weight_refs and not external:
            # checked where its references into weights/ resolve, under a temporary name
            here = out_dir / f".{onnx_name}.staged-{os.getpid()}"
            os.replace(staged / onnx_name, here)
            try:
                check_written(here, spec)
                os.replace(here, out_dir / onnx_name)
            finally:
                here.unlink(missing_ok=True)
            if (out_dir / data_name).exists():
                (out_dir / data_name).unlink()
            return [onnx_name]
        if external or (staged / onnx_name).stat().st_size <= RECHECK_MAX_BYTES:
            # the written file, by path (parsing it costs two copies of an inline file, so big
            # inline files rely on the full check of their graph above and on construction)
            onnx.checker.check_model(str(staged / onnx_name), full_check=False)
        written = [onnx_name] + ([data_name] if external else [])
        # data first, the .onnx last: a present .onnx implies complete data
        for name in reversed(written):
            os.replace(staged / name, out_dir / name)
        if not external and (out_dir / data_name).exists():
            (out_dir / data_name).unlink()
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TEMP_PATTERNS = (".*.export-*", ".*.staged-*", ".*.rebind-*")


def clean_stale_temps(out_dir: Path) -> list[Path]:
    """Remove temporaries of an export that died (kill -9, power loss) in `out_dir`: names
    carry the writer's PID; those of a live process are left alone."""
    removed = []
    for pat in TEMP_PATTERNS:
        for p in Path(out_dir).glob(pat):
            pid = p.name.rsplit("-", 1)[-1].split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
