"""Writing one piece to ONNX: TorchScript exporter (opset 17), static shapes, constant
folding, the piece's own input/output names, token ids as int32; then onnx shape inference
and the onnx checker. Pieces over 2 GB keep their weights in `<piece>.onnx.data`.

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


def _attach_weights(model, params: dict, spec: PieceSpec) -> None:
    """Graph inputs that are parameters become initializers (popped from `params`)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    want = {t.name for t in spec.inputs}
    extra = [i.name for i in model.graph.input if i.name not in want]
    missing = [n for n in extra if n not in params]
    if missing:
        raise FluxcError(f"{spec.name}: exporter left inputs {missing[:3]} without weights (unexpected torch version?)")
    keep = [i for i in model.graph.input if i.name in want]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name in extra:
        t = params.pop(name)
        arr = np.ascontiguousarray(t.detach().cpu().numpy())
        del t
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
        del arr
    params.clear()


def export_piece(module, spec: PieceSpec, out_dir: Path, *, release=None) -> list[str]:
    """Export `module` as `<out_dir>/<spec.file>`; return the file names written.

    `release()`, if given, is called right after the torch export to free the piece's own
    weights (the exporter's folded copies are freed as they are written)."""
    import gc

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
        _trim_heap()
        model = onnx.load(str(raw), load_external_data=True)
        if params is not None:
            _attach_weights(model, params, spec)
            del params
        check_io(model, spec, spec.name)
        onnx_name, data_name = spec.file, f"{spec.file}.data"
        staged = tmp / "staged"
        staged.mkdir()
        external = _initializer_bytes(model) > EXTERNAL_THRESHOLD
        if external:
            onnx.save_model(model, str(staged / onnx_name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged / onnx_name))
        del model
        gc.collect()
        _trim_heap()
        # shape inference file to file, in onnx's C++ (no Python copy of the weights)
        try:
            onnx.shape_inference.infer_shapes_path(str(staged / onnx_name), str(staged / onnx_name),
                                                   strict_mode=False, data_prop=True)
        except Exception:  # shape inference is a nicety, not a requirement
            pass
        onnx.checker.check_model(str(staged / onnx_name), full_check=not external)
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
