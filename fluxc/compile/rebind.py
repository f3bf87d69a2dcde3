"""model_transform once per graph, then every other piece with that graph gets its own weights.

model_transform is the slow, memory-hungry step of a full-size compile (10 min and 14 GB for a
double block: ONNX simplification and constant folding over the weights). Every block of a
kind has the same graph (the export writes it once and points it at each block's tensors), so
its top MLIR is the same but for the net name, and its weight file holds the same tensors
computed from other weights. So the first piece of a graph is transformed for real and kept
as a template: its MLIR, its weight npz and a *mapping* that says, for every tensor of that
npz, how it is computed from the piece's checkpoint tensors:

- "const": a tensor that does not depend on any weight (rotary pair-swap matrices, baked
  masks): copied from the template;
- "param"/"replay": a weight, or a constant expression of weights (a transposed Linear
  weight, a norm weight times the attention scale), recomputed for the piece by running that
  part of its ONNX graph in ONNX Runtime, then laid out as TPU-MLIR stored it (identity,
  transpose or reshape: whichever reproduces the template's own tensor exactly).

A piece with no weights at all is a template too: TPU-MLIR writes no weight npz when the
graph keeps no tensor (a LayerNorm with weight 1 and bias 0, as in a freshly initialised
CLIP text encoder, loses its affine in the transform and leaves `clip_tail` with none);
its template holds the MLIR only (`weights: false`) and rebinding just renames the net.

The mapping is accepted only if it reproduces every tensor of the template's npz bit for bit
from the template's own weights; otherwise the graph is marked not rebindable and each piece
is transformed for real. Tests compare a rebound piece with a direct transform of the same
piece: same MLIR, same weights, same bmodel but for its build time.

Templates live in <build>/templates/<kind>-<graph key>/ and are keyed by the weightless graph,
the piece's I/O and transform options and the toolchain: not by quantisation, so a BF16 build
after a W4BF16 one runs no model_transform at all.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluxc.errors import FluxcError
from fluxc.export.onnx_io import external_params
from fluxc.export.weights import read_ref_f32
from fluxc.fsutil import COMPLETE, read_complete_json, sha256_json, write_json_atomic, write_text_atomic

FORMAT = 1


def weight_npz_name(net: str) -> str:
    return f"{net}_top_f32_all_weight.npz"


def graph_key(onnx_path: Path, io: dict, transform_args: list[str], toolchain: str) -> str:
    """Content key of a piece's graph without its weights (references into weights/ blanked)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for t in external_params(model).values():
        for e in t.external_data:
            if e.key in ("location", "offset", "length"):
                e.value = ""
    g = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    return sha256_json({"format": FORMAT, "graph": g, "io": io, "transform_args": transform_args,
                        "toolchain": toolchain})


@dataclass
class Template:
    folder: Path
    net: str  # net name of the piece it was made from
    rebindable: bool
    reason: str
    mapping: dict[str, dict[str, Any]]
    weights: bool = True  # False: the transform wrote no weight npz (a graph without tensors)

    @property
    def mlir(self) -> Path:
        return self.folder / f"{self.net}.mlir"

    @property
    def npz(self) -> Path:
        return self.folder / weight_npz_name(self.net)

    @property
    def replay(self) -> Path:
        return self.folder / "replay.onnx"


def template_dir(build_root: Path, kind: str, gkey: str) -> Path:
    return Path(build_root) / "templates" / f"{kind}-{gkey[:16]}"


def load_template(folder: Path) -> Template | None:
    d = read_complete_json(folder, "template.json")
    if d is None:
        return None
    t = Template(folder, d["net"], bool(d["rebindable"]), d.get("reason", ""), d.get("mapping", {}),
                 bool(d.get("weights", True)))
    if t.rebindable and not t.mlir.is_file():
        return None
    if t.rebindable and t.weights and not (t.npz.is_file() and t.replay.is_file()):
        return None
    return t


# ---------------------------------------------------------------------------------------------
# Reading a piece's graph

def _graph_parts(onnx_path: Path):
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    params = external_params(model)  # param name -> external TensorProto (stored dtype)
    stored = {t.name for t in params.values()}
    producer = {o: n for n in model.graph.node for o in n.output}
    inline = {t.name: t for t in model.graph.initializer if t.name not in stored}
    return model, params, producer, inline


def _depends_on_params(name: str, params, producer, memo: dict) -> bool:
    if name in memo:
        return memo[name]
    if name in params:
        memo[name] = True
        return True
    node = producer.get(name)
    if node is None:
        memo[name] = False
        return False
    memo[name] = False  # cycle guard
    memo[name] = any(_depends_on_params(i, params, producer, memo) for i in node.input if i)
    return memo[name]


def _resolve(key: str, names: set[str]) -> tuple[str, str] | None:
    """The ONNX tensor a weight-npz name comes from, and the suffix TPU-MLIR added to it."""
    if key in names:
        return key, ""
    i = len(key)
    while True:
        i = key.rfind("_", 0, i)
        if i <= 0:
            return None
        if key[:i] in names:
            return key[:i], key[i:]


def read_params(onnx_path: Path, names) -> dict[str, Any]:
    """Float32 values of the piece's checkpoint tensors (read straight from weights/)."""
    _, params, _, _ = _graph_parts(onnx_path)
    base = Path(onnx_path).parent
    out = {}
    for n in names:
        t = params[n]
        kv = {e.key: e.value for e in t.external_data}
        out[n] = read_ref_f32(base, kv["location"], int(kv["offset"]), int(kv["length"]), t.data_type, tuple(t.dims))
    return out


def _replay_model(model, params, producer, inline, targets: list[str]):
    """The part of the graph computing `targets` from the parameters (graph inputs, float32)."""
    import onnx
    from onnx import helper

    needed, stack, seen_inputs = [], list(targets), set()
    visited = set()
    while stack:
        n = stack.pop()
        if n in visited:
            continue
        visited.add(n)
        if n in params:
            seen_inputs.add(n)
            continue
        node = producer.get(n)
        if node is None:
            continue
        needed.append(node)
        stack.extend(i for i in node.input if i)
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    nodes = sorted({id(n): n for n in needed}.values(), key=lambda n: order[id(n)])
    inits = [inline[n] for n in visited if n in inline]
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(params[n].dims)) for n in sorted(seen_inputs)]
    outputs = [helper.make_empty_tensor_value_info(t) for t in targets]
    graph = helper.make_graph(nodes, "replay", inputs, outputs, initializer=inits)
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _values(replay_path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Every tensor a mapping may name: the parameters themselves, and the replayed ones."""
    import onnx

    m = onnx.load(str(replay_path))
    out = dict(params)
    if len(m.graph.output):
        out.update(_run_replay(replay_path, params))
    return out


def _run_replay(replay_path: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own ops, as written
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(replay_path), so, providers=["CPUExecutionProvider"])
    want = {i.name for i in sess.get_inputs()}
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in want})
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


_LAYOUTS = ("id", "T", "reshape", "T+reshape")


def _layout(v, layout: str, shape):
    if layout == "id":
        return v
    if layout == "T":
        return np.ascontiguousarray(v.T)
    if layout == "reshape":
        return v.reshape(shape)
    return np.ascontiguousarray(v.T).reshape(shape)


def _find_layout(v, want) -> str | None:
    for lay in _LAYOUTS:
        if lay == "id" and v.shape != want.shape:
            continue
        if lay.startswith("T") and v.ndim != 2:
            continue
        if lay == "T" and v.T.shape != want.shape:
            continue
        if lay.endswith("reshape") and v.size != want.size:
            continue
        got = _layout(v, lay, want.shape)
        if got.dtype == want.dtype and np.array_equal(got, want):
            return lay
    return None


# ---------------------------------------------------------------------------------------------

def make_template(folder: Path, net: str, work: Path, onnx_path: Path) -> Template:
    """Keep a real transform's MLIR and weights as the template of its graph, with the mapping
    (or the reason there is none). Written under a temporary name, renamed into place."""
    import onnx

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mapping: dict[str, dict[str, Any]] = {}
    reason = ""
    try:
        shutil.copyfile(work / f"{net}.mlir", tmp / f"{net}.mlir")
        npz_src = work / weight_npz_name(net)
        if not npz_src.is_file():  # a graph without tensors: nothing to map
            write_json_atomic(tmp / "template.json", {"format": FORMAT, "net": net, "rebindable": True,
                                                      "reason": "", "mapping": {}, "weights": False})
            write_text_atomic(tmp / COMPLETE, net + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            t = load_template(folder)
            assert t is not None
            return t
        try:
            os.link(npz_src, tmp / weight_npz_name(net))  # the piece deletes its own copy later
        except OSError:
            shutil.copyfile(npz_src, tmp / weight_npz_name(net))
        model, params, producer, inline = _graph_parts(onnx_path)
        names = set(producer) | set(inline) | set(params)
        memo: dict[str, bool] = {}
        memo_in: dict[str, bool] = {}
        inputs = {i.name for i in model.graph.input}
        npz = np.load(tmp / weight_npz_name(net))
        targets: dict[str, tuple[str, str]] = {}
        for key in npz.files:
            r = _resolve(key, names)
            if r is None:
                reason = f"weight {key} of the MLIR has no source tensor in the ONNX graph"
                break
            tensor, suffix = r
            if _depends_on_params(tensor, inputs, producer, memo_in):
                reason = f"weight {key} is {tensor} with a constant merged in by TPU-MLIR ({suffix})"
                break
            if not _depends_on_params(tensor, params, producer, memo):
                mapping[key] = {"how": "const"}
            elif suffix not in ("", "_fix"):
                reason = f"weight {key} is a part ({suffix}) of weight-derived tensor {tensor}"
                break
            else:
                targets[key] = (tensor, suffix)
        if not reason:
            replay = _replay_model(model, params, producer, inline,
                                   sorted({t for t, _ in targets.values() if t not in params}))
            onnx.save(replay, str(tmp / "replay.onnx"))
            values = _values(tmp / "replay.onnx", read_params(onnx_path, params))
            for key, (tensor, _) in targets.items():
                lay = _find_layout(values[tensor], npz[key])
                if lay is None:
                    reason = f"weight {key} is not reproduced exactly from {tensor}"
                    break
                mapping[key] = {"how": "replay", "tensor": tensor, "layout": lay}
            del values
        npz.close()
        rebindable = not reason
        write_json_atomic(tmp / "template.json", {"format": FORMAT, "net": net, "rebindable": rebindable,
                                                  "reason": reason, "mapping": mapping if rebindable else {}})
        write_text_atomic(tmp / COMPLETE, net + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = load_template(folder)
    assert t is not None
    return t


def apply(t: Template, net: str, work: Path, onnx_path: Path) -> None:
    """Write <work>/<net>.mlir and its weight npz for this piece from the template."""
    if not t.rebindable:
        raise FluxcError(f"template {t.folder} cannot be rebound: {t.reason}")
    text = t.mlir.read_text()
    old_mod, new_mod = f"module @{t.net} ", f"module @{net} "
    old_w, new_w = f'module.weight_file = "{weight_npz_name(t.net)}"', f'module.weight_file = "{weight_npz_name(net)}"'
    if text.count(old_mod) != 1 or text.count(old_w) > 1 or (t.weights and text.count(old_w) != 1):
        raise FluxcError(f"template MLIR {t.mlir} does not name its module as expected (TPU-MLIR version?)")
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(work / f"{net}.mlir", text.replace(old_mod, new_mod, 1).replace(old_w, new_w, 1))
    if not t.weights:
        return
    _, params, _, _ = _graph_parts(onnx_path)
    values = _values(t.replay, read_params(onnx_path, params))
    tmpl = np.load(t.npz)
    arrays = {}
    for key in tmpl.files:
        m = t.mapping[key]
        if m["how"] == "const":
            arrays[key] = tmpl[key]
        else:
            want = tmpl[key]
            a = _layout(values[m["tensor"]], m["layout"], want.shape).astype(want.dtype, copy=False)
            if a.shape != want.shape:
                raise FluxcError(f"{net}: weight {key} has shape {a.shape}, the template {want.shape}")
            arrays[key] = a
    tmpl.close()
    del values
    dst = work / weight_npz_name(net)
    tmp = dst.with_name(f".{dst.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, dst)
