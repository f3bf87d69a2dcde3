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


def export_piece(module, spec: PieceSpec, out_dir: Path, *, release=None) -> list[str]:
    """Export `module` as `<out_dir>/<spec.file>`; return the file names written.

    `release()`, if given, is called right after the torch export to free the piece's
    weights before the ONNX post-processing (which then needs about two copies of the
    piece at most: the loaded graph and its serialisation)."""
    import gc

    import onnx
    import torch

    out_dir = Path(out_dir)
    tmp = out_dir / f".{spec.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        raw = tmp / "raw.onnx"
        args = torch_inputs(spec)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
                export_params=True, keep_initializers_as_inputs=False,
            )
        del args
        if release is not None:
            release()
        gc.collect()
        _trim_heap()
        onnx_name, data_name = spec.file, f"{spec.file}.data"
        staged = tmp / "staged"
        staged.mkdir()
        # A big piece is written by torch as one file per tensor: gather them into one.
        external = raw.stat().st_size > EXTERNAL_THRESHOLD or any(p.name != raw.name for p in tmp.iterdir()
                                                                   if p.is_file())
        if not external:
            # shape inference file to file, in onnx's C++ (no Python copy of the weights)
            try:
                onnx.shape_inference.infer_shapes_path(str(raw), str(staged / onnx_name), strict_mode=False,
                                                       data_prop=True)
            except Exception:  # shape inference is a nicety, not a requirement
                shutil.copyfile(raw, staged / onnx_name)
            raw.unlink()
            model = onnx.load(str(staged / onnx_name))
            check_io(model, spec, spec.name)
            external = _initializer_bytes(model) > EXTERNAL_THRESHOLD
            del model
        if external:
            model = onnx.load(str(raw if raw.exists() else staged / onnx_name), load_external_data=True)
            check_io(model, spec, spec.name)
            onnx.save_model(model, str(staged / onnx_name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            del model
            gc.collect()
            try:
                onnx.shape_inference.infer_shapes_path(str(staged / onnx_name), str(staged / onnx_name),
                                                       strict_mode=False, data_prop=True)
            except Exception:
                pass
        _trim_heap()
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
