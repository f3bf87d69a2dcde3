"""Writing one piece to ONNX: TorchScript exporter (opset 17), static shapes, constant
folding, the piece's own input/output names, token ids as int32; then onnx shape inference
and the onnx checker (full check on the graph). Pieces over 2 GB keep their weights in
`<piece>.onnx.data`. Weights are written one tensor at a time (see _write_with_weights), so
a piece costs about one copy of its weights plus the exporter's working memory.

Files land under temporary names and are renamed into place only once checked.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

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
    import numpy as np
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
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
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
    import numpy as np
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


def export_piece(module, spec: PieceSpec, out_dir: Path, *, release=None) -> list[str]:
    """Export `module` as `<out_dir>/<spec.file>`; return the file names written.

    `release()`, if given, is called right after the torch export to free the piece's own
    weights. Memory: the weights exist once (the exporter's folded parameters) plus one
    tensor being written; shape inference and the structural check run on the weightless
    graph, the final file is checked again by path."""
    import gc

    import numpy as np
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
            total = sum(int(np.prod(params[n].shape)) * params[n].element_size() for n in names)
            external = total > EXTERNAL_THRESHOLD
            _write_with_weights(model, params, names, staged / onnx_name, data_name if external else None)
            params.clear()
            del model, params
        gc.collect()
        _trim_heap()
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


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
