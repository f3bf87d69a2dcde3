"""Run by the TPU-MLIR toolchain's own Python (it imports onnx, onnxruntime, onnxsim and numpy
only, never fluxc): model_transform's ONNX simplification, done so that the memory it needs is
about one weight tensor, not the whole model several times over.

    python fold_script.py SRC.onnx DST.onnx

model_transform simplifies an ONNX graph in three steps (OnnxConverter.model_simplify):
constant folding, onnx-simplifier's graph passes with folding and shape inference off, and
constant folding again. Its constant folding (OnnxOpt.ConstantFolding) runs the WHOLE graph
in ONNX Runtime on random inputs, with every constant node's output added to the graph's
outputs, on deep copies of the model: for a full-size FLUX double block that holds the
attention scores and several copies of the weights at once (17.6 GB peak). The result is the
same graph with every constant node (a node whose inputs are all constants: the Transpose
and Cast of a checkpoint weight, the Unsqueeze/Concat of a reshape target) replaced by a
Constant node named "node_<output>" holding its value.

This script makes that same graph without running the graph:

1. constant folding node by node, in graph order, with TPU-MLIR's rule for which nodes are
   constant (Shape nodes of tensors whose shape ONNX shape inference knows included, repeated
   while a pass folds something); each constant node is evaluated alone (numpy for Cast and
   Transpose, else a one-node ONNX Runtime session) on its inputs' values, and a value is
   dropped as soon as no constant node still needs it. A value the rest of the graph reads
   becomes a Constant node named "node_<output>" as in TPU-MLIR, or, from 64 KiB up, an
   initializer of that name written at once to DST's external data file (DST.data): the
   converter makes the same weight of either, but it writes the graph minus its initializers
   as text, and a full-size block's weights as text cost gigabytes;
2. onnx-simplifier's passes as model_transform calls them (no folding, no shape inference)
   on the graph with every large tensor replaced by a graph input of the same name, type
   and shape (the passes see the graph, never the weights), then the tensors re-attached;
3. the folding again (a pass can expose new constant nodes), and unused nodes dropped.

model_transform then reads DST with its own simplification off (`--do_onnx_sim ""`); the
rest of its work (onnx_opt fusions, conversion, the weight npz) is unchanged. fluxc checks
the result: the rebind check (tests) compares the top MLIR and weights with model_transform's
own simplification, and the compile's transform check runs DST against the original piece.

Prints one JSON line: folded node count, largest value, bytes written.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

BIG = 1 << 16  # values of this many bytes or more become initializers in the external data file
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}


def _is_dynamic(node, const: set) -> bool:
    """TPU-MLIR's ConstantFolding.is_dynamic: ops whose shape inputs are not constant."""
    i = node.input
    if node.op_type in ("NonMaxSuppression", "NonZero", "Unique") and i[0] not in const:
        return True
    if node.op_type in ("Reshape", "Expand", "Upsample", "ConstantOfShape") and len(i) > 1 and i[1] not in const:
        return True
    if node.op_type == "Resize" and ((len(i) > 2 and i[2] not in const) or (len(i) > 3 and i[3] not in const)):
        return True
    if node.op_type == "Slice" and any(len(i) > k and i[k] not in const for k in (1, 2, 3, 4)):
        return True
    return False


def _has_subgraph(node) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


class Values:
    """Constant values by name: loaded lazily (external initializers) and dropped early."""

    def __init__(self, base: str, own: tuple[str, str] | None = None):
        self.base = base  # the folder external data locations are relative to
        self.own = own  # (file name, folder) of DST's own data file, written by this script
        self.protos: dict[str, TensorProto] = {}  # name -> TensorProto (maybe not yet loaded)
        self.largest = 0

    def add(self, t: TensorProto) -> None:
        self.protos[t.name] = t

    def get(self, name: str) -> TensorProto:
        t = self.protos[name]
        if uses_external_data(t):
            t = TensorProto()
            t.CopyFrom(self.protos[name])
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            load_external_data_for_tensor(t, self.own[1] if self.own and loc == self.own[0] else self.base)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
        self.largest = max(self.largest, len(t.raw_data))
        return t

    def drop(self, name: str) -> None:
        self.protos.pop(name, None)


def _bf16_to_f32(raw: bytes, dims) -> np.ndarray:
    u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
    return u.view(np.float32).reshape(tuple(dims))


def _array(t: TensorProto) -> np.ndarray | None:
    if t.data_type == TensorProto.BFLOAT16:
        return None
    return numpy_helper.to_array(t)


def _evaluate(node, values: Values, model) -> list[TensorProto] | None:
    """The node's outputs from its (constant) inputs; None if it cannot be folded here."""
    ins = [values.get(n) if n else None for n in node.input]
    if node.op_type == "Cast" and ins[0] is not None:
        to = next(a.i for a in node.attribute if a.name == "to")
        if ins[0].data_type == TensorProto.BFLOAT16 and to == TensorProto.FLOAT:
            raw = ins[0].raw_data if ins[0].raw_data else np.asarray(ins[0].int32_data, np.uint16).tobytes()
            out = _bf16_to_f32(raw, ins[0].dims)
            return [numpy_helper.from_array(out, node.output[0])]
    if node.op_type == "Transpose" and ins[0] is not None:
        a = _array(ins[0])
        if a is not None:
            perm = next((list(x.ints) for x in node.attribute if x.name == "perm"), None)
            return [numpy_helper.from_array(np.ascontiguousarray(np.transpose(a, perm)), node.output[0])]
    import onnxruntime as rt

    inits = []
    for n, t in zip(node.input, ins):
        if t is not None:
            c = TensorProto()
            c.CopyFrom(t)
            c.name = n
            inits.append(c)
    g = helper.make_graph([node], "fold", [], [onnx.ValueInfoProto(name=o) for o in node.output if o], inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    opts = rt.SessionOptions()
    opts.graph_optimization_level = rt.GraphOptimizationLevel(0)
    opts.log_severity_level = 3
    try:
        sess = rt.InferenceSession(m.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        res = sess.run(None, {})
    except Exception:  # noqa: BLE001 - an op ONNX Runtime cannot run alone: leave it in the graph
        return None
    outs = []
    for o, r in zip([o for o in node.output if o], res):
        if not isinstance(r, np.ndarray) or r.dtype == object:
            return None
        outs.append(numpy_helper.from_array(np.asarray(r), o))
    return outs


def _static_shapes(model) -> dict[str, list[int]]:
    """Fully static tensor shapes by ONNX shape inference (graph only, no weights read)."""
    if not any(n.op_type == "Shape" for n in model.graph.node):
        return {}
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    for t in shell.graph.initializer:
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.ClearField("raw_data")
    inferred = onnx.shape_inference.infer_shapes(shell, data_prop=True).graph
    out = {}
    for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[v.name] = [d.dim_value for d in dims]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def fold(model, base: str, sink, own: tuple[str, str] | None = None) -> tuple[int, int]:
    """Step 1 / 3: replace constant nodes by Constant nodes (TPU-MLIR's get_constant_nodes rule)."""
    g = model.graph
    values = Values(base, own)
    for t in g.initializer:
        values.add(t)
    const = {t.name for t in g.initializer} | {""}
    for n in g.node:
        if n.op_type == "Constant":
            const.update(n.output)
    shapes = _static_shapes(model)
    const_nodes = []
    for n in g.node:
        if n.op_type == "Shape":
            if n.input[0] in shapes and len(n.attribute) == 0:  # a static shape: its value is known
                values.add(numpy_helper.from_array(np.asarray(shapes[n.input[0]], np.int64), n.output[0]))
                const_nodes.append(n)
                const.update(n.output)
            continue
        if _is_dynamic(n, const) or n.op_type in ("DequantizeLinear", "QuantizeLinear") or _has_subgraph(n):
            continue
        if n.op_type not in RANDOM_OPS and len(n.input) > 0 and all(x in const for x in n.input):
            const_nodes.append(n)
            const.update(n.output)
    if not const_nodes:
        return 0, 0
    const_ids = {id(n) for n in const_nodes}
    # who still needs a value: constant nodes yet to run, plus everything else (forever)
    pending: dict[str, int] = {}
    keep: set[str] = {o.name for o in g.output}
    for n in g.node:
        for x in n.input:
            if id(n) in const_ids:
                pending[x] = pending.get(x, 0) + 1
            else:
                keep.add(x)
    for n in g.node:  # Constant nodes' values, as inputs of the folding
        if n.op_type == "Constant":
            a = next((a for a in n.attribute if a.name == "value"), None)
            if a is not None:
                t = TensorProto()
                t.CopyFrom(a.t)
                t.name = n.output[0]
                values.add(t)
    folded = 0
    made: set[str] = set()  # values made by folding (no node or initializer holds them yet)
    new_nodes = []
    for n in list(g.node):
        if id(n) not in const_ids:
            new_nodes.append(n)
            continue
        if n.op_type == "Shape":
            outs = [values.get(n.output[0])]
            values.drop(n.output[0])
        elif not all(x == "" or x in values.protos for x in n.input):
            outs = None  # an input that could not be folded
        else:
            outs = _evaluate(n, values, model)
        if outs is None:
            for x in n.input:  # it stays a node: the values it reads must exist in the graph
                if x in made and x not in keep:
                    node = sink(values.get(x))
                    if node is not None:
                        new_nodes.append(node)
                keep.add(x)
            new_nodes.append(n)
            continue
        folded += 1
        for x in n.input:
            pending[x] -= 1
            if pending[x] == 0 and x not in keep:
                values.drop(x)
        for t in outs:
            made.add(t.name)
            if pending.get(t.name, 0) > 0:
                values.add(t)
            if t.name in keep:
                node = sink(t)
                if node is not None:
                    new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return folded, values.largest


def prune(model) -> None:
    """Drop nodes and initializers nothing reads (TPU-MLIR's remove_unused_nodes)."""
    g = model.graph
    used = {o.name for o in g.output}
    kept = []
    for n in reversed(list(g.node)):
        if any(o in used for o in n.output) or not n.output:
            kept.append(n)
            used.update(n.input)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def graph_passes(model):
    """Step 2: onnx-simplifier's passes as model_transform runs them, weights held out. Every
    large value is an initializer by now (step 1's sink), so holding out the initializers holds
    out the weights."""
    import onnxsim.onnx_simplifier as onnxsim

    held = {t.name: t for t in model.graph.initializer}
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    del shell.graph.initializer[:]
    for name, t in held.items():
        shell.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    out, _ = onnxsim.simplify(shell, skip_fuse_bn=False, skip_constant_folding=True, skip_shape_inference=True)
    og = out.graph
    inputs = [i for i in og.input if i.name not in held]
    del og.input[:]
    og.input.extend(inputs)
    og.initializer.extend(held.values())
    return out


def main(src: str, dst: str) -> None:
    base = os.path.dirname(os.path.abspath(src))
    data_name = os.path.basename(dst) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(dst)), data_name)
    model = onnx.load(src, load_external_data=False)
    written = [0]
    # DST is renamed into place last: a data file without its DST is never read
    fh = open(data_path, "wb")

    def to_file(t: TensorProto) -> None:
        raw = t.raw_data
        off = fh.tell()
        pad = (-off) % 64
        fh.write(b"\0" * pad)
        off += pad
        fh.write(raw)
        written[0] += len(raw)
        t.ClearField("raw_data")
        del t.external_data[:]
        for k, v in (("location", data_name), ("offset", str(off)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL

    def sink(t: TensorProto):
        """A folded value the graph reads: a Constant node as TPU-MLIR makes it (from a copy:
        the value itself may still be read by later constant nodes)."""
        c = TensorProto()
        c.CopyFrom(t)
        t = c
        if not t.raw_data and t.ByteSize() > BIG:
            t = numpy_helper.from_array(numpy_helper.to_array(t), t.name)
        if len(t.raw_data) >= BIG:
            # a large value becomes an initializer in DST's data file, not a Constant node:
            # model_transform converts both into the same weight (named after the tensor), but
            # it writes the graph without its initializers as text (<net>_opt.onnx.prototxt),
            # and with every weight as text a full-size block needs gigabytes for that string
            to_file(t)
            model.graph.initializer.append(t)
            return None
        return helper.make_node("Constant", [], [t.name], name="node_" + t.name, value=t)

    own = (data_name, os.path.dirname(data_path))
    f1, largest = fold(model, base, sink, own)
    while True:  # a folded reshape target can make another tensor's shape (and a Shape node) static
        fh.flush()
        more, big = fold(model, base, sink, own)
        if not more:
            break
        f1, largest = f1 + more, max(largest, big)
    prune(model)
    # the piece's own initializers (weights referenced into the export's folder) are moved into
    # DST's data file, so that DST is whole in its own folder
    for t in model.graph.initializer:
        if uses_external_data(t) and next(e.value for e in t.external_data if e.key == "location") != data_name:
            c = TensorProto()
            c.CopyFrom(t)
            load_external_data_for_tensor(c, base)
            del c.external_data[:]
            c.data_location = TensorProto.DEFAULT
            largest = max(largest, len(c.raw_data))
            to_file(c)
            t.CopyFrom(c)
            del c
    fh.flush()
    model = graph_passes(model)
    f2, largest2 = 0, 0
    while True:
        fh.flush()
        more, big = fold(model, os.path.dirname(data_path), sink)
        if not more:
            break
        f2, largest2 = f2 + more, max(largest2, big)
    prune(model)
    fh.close()
    onnx.save(model, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    print(json.dumps({"folded": f1 + f2, "largest_value_bytes": max(largest, largest2),
                      "data_bytes": written[0], "nodes": len(model.graph.node)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
