"""fluxc.compile.fold: the graph model_transform reads is simplified by fold_script.py (node by
node, weights held out) instead of model_transform's own whole-graph simplification (issue 18,
item 3: the memory of a full-size compile). Checked against model_transform's own path on the
same exported pieces, with weights stored as the published checkpoints store them (bf16, so
the exported graph casts them), and shown to fail when the folded graph is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fluxc.export.manifest import load_manifest
from tests.fixtures_export import _export

# the double block (the bf16 weights' Casts and Transposes, the reshape targets), T5's block (its
# own graph family) and the VAE decoder (Shape nodes that only fold once a reshape target has);
# every other piece of the tiny build is checked against the exported piece whenever it compiles
# (fold.check, test_compile_transforms_the_folded_graph below)
PIECES = ["dev_trans_block_0", "t5_block_0", "vae_decoder"]


@pytest.fixture(scope="module")
def export_bf16(tmp_path_factory) -> Path:
    """A tiny dev model saved in bfloat16 (as FLUX.1 is published), exported as fluxc does."""
    from fluxc.tiny import build_tiny

    root = tmp_path_factory.mktemp("fold")
    model = build_tiny(root / "model", flux_type="dev", seed=3, dtype="bfloat16")
    return _export(model, root / "onnx")


def _transform(onnx: Path, spec, wd: Path, folded: bool) -> Path:
    from fluxc.compile import fold
    from fluxc.compile.recipe import load_recipe, piece_plan, transform_args
    from fluxc.compile.tools import Tools

    tools = Tools()
    plan = piece_plan(load_recipe(None, "bm1684x"), spec, "BF16")
    wd.mkdir(parents=True)
    src = str(onnx)
    if folded:
        src = fold.fold(onnx, wd, tools, wd / "fold.log", spec.name)[0].name
    tools.run("model_transform", ["--model_name", spec.net_name, "--model_def", src,
                                  *transform_args(spec, plan, folded=folded), "--mlir", f"{spec.net_name}.mlir"],
              wd, wd / "transform.log")
    return wd


@pytest.mark.parametrize("piece", PIECES)
def test_folded_transform_equals_model_transforms_own(export_bf16, tmp_path, piece):
    m = load_manifest(export_bf16)
    spec = m.spec(piece)
    onnx = m.path(piece).resolve()
    own = _transform(onnx, spec, tmp_path / "own", folded=False)
    ours = _transform(onnx, spec, tmp_path / "folded", folded=True)
    net = spec.net_name
    assert (ours / f"{net}.mlir").read_text() == (own / f"{net}.mlir").read_text()
    a, b = np.load(own / f"{net}_top_f32_all_weight.npz"), np.load(ours / f"{net}_top_f32_all_weight.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    figures = json.loads([ln for ln in (ours / "fold.log").read_text().splitlines() if ln.startswith("{")][-1])
    assert figures["folded"] > 0  # the bf16 weights' Casts at least


def test_fold_check_catches_a_changed_weight(export_bf16, tmp_path):
    """fold.check (run by every checked compile) compares the folded graph with the exported
    piece in ONNX Runtime: one folded weight changed by 1% fails it, naming the piece."""
    import onnx
    from onnx import numpy_helper

    from fluxc.compile import fold
    from fluxc.compile.tools import Tools
    from fluxc.errors import FluxcError

    m = load_manifest(export_bf16)
    spec = m.spec("dev_single_trans_block_0")
    onnx_path = m.path(spec.name).resolve()
    samples = spec.sample_inputs(0)
    folded, _ = fold.fold(onnx_path, tmp_path, Tools(), tmp_path / "fold.log", spec.name)
    assert fold.check(onnx_path, folded, samples, spec.name) <= 1e-5

    model = onnx.load(str(folded))  # with its data file: the folded weights are initializers there
    weights = [t for t in model.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT]
    assert weights, "no folded 2-D weight in the graph"
    t = weights[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(FluxcError, match=f"{spec.name}: the folded graph differs from the exported piece"):
        fold.check(onnx_path, broken, samples, spec.name)


def test_compile_transforms_the_folded_graph(compiled_dev_bf16):
    """The session's compiled build went through the fold: every piece transformed for real has
    its figures (and, the build being checked, the ONNX Runtime comparison), and no folded copy
    of the weights is left behind."""
    rep = json.loads((compiled_dev_bf16 / "BM1684X" / "compile_report.json").read_text())
    transformed = 0
    for name, p in rep["pieces"].items():
        d = Path(p["build_dir"])
        how = json.loads((d / "transform.done").read_text())["how"]
        assert not list((d / "work").glob("folded.onnx*")), name
        if how == "transformed":
            transformed += 1
            f = json.loads((d / "fold.json").read_text())
            assert f["max_rel_diff_vs_piece"] <= 1e-5, name
    assert transformed > 0
