"""One trace and one model_transform per block kind: the rebinding paths against the direct ones.

- export: a block written from the first block of its kind (graph reused, references pointed
  at its own tensors) is byte-identical to the same block traced through torch on its own;
- compile: a block whose MLIR and weights were rebound from the template of its graph gives the
  same MLIR, the same weights (bit for bit) and the same bmodel (but for the build time that
  TPU-MLIR writes into the header) as a direct model_transform of that block.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fluxc.export.manifest import load_manifest

HELD_OUT = {"double_block": "dev_trans_block_2", "single_block": "dev_single_trans_block_2", "t5_block": "t5_block_1"}


def test_export_traces_each_block_kind_once(export_dev):
    m = load_manifest(export_dev)

    kinds = {}
    for s in m.specs:
        kinds.setdefault(s.kind, []).append(s.name)
    for kind, held in HELD_OUT.items():
        assert held in kinds[kind][1:]
    # every piece references the checkpoint's tensors in place: no weight copies in the folder
    for s in m.specs:
        e = m.entries[s.name]
        assert e["weight_files"] and e["weights_sha256"], s.name
        assert (export_dev / s.file).stat().st_size < 2_000_000, s.name
    src = Path(m.source["path"])
    linked = export_dev / "weights" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert linked.stat().st_ino == (src / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_ino


@pytest.mark.parametrize("kind", sorted(HELD_OUT))
def test_rebound_piece_equals_direct_export(export_dev, tmp_path, kind):
    """Trace the held-out block alone (no template) and compare the files byte for byte."""
    from fluxc.export.driver import ExportOptions, resolve_inputs
    from fluxc.export.piece_export import export_one

    m = load_manifest(export_dev)
    spec = m.spec(HELD_OUT[kind])
    out = tmp_path / "onnx"
    opts = ExportOptions(model=m.source["path"], out=out, height=m.options["height"], width=m.options["width"],
                         t5_len=m.options["t5_seq_len"])
    ckpt, _, dims, _ = resolve_inputs(opts)
    out.mkdir()
    e = export_one(spec, dims, ckpt, out, list(spec.parts), None)
    # The same graph, the same references; the only freedom is the exporter's counter for
    # anonymous tensors ("onnx::Unsqueeze_25"), which block 0 of T5 shifts by one (its module
    # has one more, unused, parameter): compare with those names renumbered in order.
    assert _canonical(out / spec.file) == _canonical(export_dev / spec.file)
    assert e["weights_sha256"] == m.entries[spec.name]["weights_sha256"]
    assert e["weights"] == m.entries[spec.name]["weights"]


def _canonical(path: Path) -> bytes:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    names: dict[str, str] = {}

    def ren(n: str) -> str:
        if not n.startswith("onnx::"):
            return n
        return names.setdefault(n, f"onnx::anon_{len(names)}")

    for node in m.graph.node:
        node.input[:] = [ren(i) for i in node.input]
        node.output[:] = [ren(o) for o in node.output]
    for vi in m.graph.value_info:
        vi.name = ren(vi.name)
    for t in m.graph.initializer:
        t.name = ren(t.name)
    return m.SerializeToString(deterministic=True)


def test_rebind_refuses_a_piece_with_other_tensors(export_dev, tmp_path):
    from fluxc.errors import FluxcError
    from fluxc.export.onnx_io import rebind_piece

    m = load_manifest(export_dev)
    with pytest.raises(FluxcError):
        rebind_piece(export_dev / "dev_trans_block_0.onnx", m.spec("dev_single_trans_block_1"), tmp_path, {})


def _differing_spans(a: bytes, b: bytes) -> list[tuple[int, int]]:
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    idx = np.flatnonzero(x != y)
    spans: list[list[int]] = []
    for i in idx.tolist():
        if spans and i <= spans[-1][1] + 8:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return [(s, e + 1) for s, e in spans]


def assert_same_bmodel_but_time(a: Path, b: Path) -> None:
    """Equal files, except for the build time TPU-MLIR writes into the header (one short span
    that reads as a date-time in both)."""
    x, y = a.read_bytes(), b.read_bytes()
    assert len(x) == len(y)
    spans = _differing_spans(x, y)
    assert len(spans) <= 1, spans[:5]
    for s, e in spans:
        assert e - s <= 19, (s, e)
        for buf in (x, y):
            window = buf[max(0, s - 19):e + 19].decode("latin-1")
            assert re.search(r"\d{4}-\d{2}-\d{2}.\d{2}:\d{2}:\d{2}|\d{2}:\d{2}:\d{2}", window), window


def test_rebound_transform_equals_direct_transform(compiled_dev_bf16, compile_build_dir, tmp_path):
    """The held-out double block of the BF16 fixture build was rebound from the template of its
    graph (itself transformed from the folded graph, fluxc.compile.fold); a direct
    model_transform of the same exported ONNX, with model_transform's own simplification, gives
    the same MLIR and weights, and both deploy to the same bmodel."""
    from fluxc.compile import rebind
    from fluxc.compile.recipe import load_recipe, piece_plan, transform_args
    from fluxc.compile.tools import Tools

    m = load_manifest(compiled_dev_bf16 / "onnx")
    spec = m.spec(HELD_OUT["double_block"])
    onnx_path = m.path(spec.name).resolve()
    rep = json.loads((compiled_dev_bf16 / "BM1684X" / "compile_report.json").read_text())
    piece_dir = Path(rep["pieces"][spec.name]["build_dir"])
    assert json.loads((piece_dir / "transform.done").read_text())["how"] == "rebound"
    plan = piece_plan(load_recipe(None, "bm1684x"), spec, "BF16")
    # the template of this piece's graph (the shared cache also holds other builds' double-block
    # templates, e.g. the Kontext build's at its token count)
    io = {"inputs": [x.to_dict() for x in spec.inputs], "outputs": [x.to_dict() for x in spec.outputs]}
    gkey = rebind.graph_key(onnx_path, io, transform_args(spec, plan), rep["toolchain"])
    t = rebind.load_template(rebind.template_dir(compile_build_dir, spec.kind, gkey))
    assert t is not None, "no template of the held-out block's graph in the compile cache"
    assert t.rebindable and t.net != spec.name, t.reason

    tools = Tools()
    direct, bound = tmp_path / "direct", tmp_path / "bound"
    direct.mkdir()
    tools.run("model_transform", ["--model_name", spec.name, "--model_def", str(onnx_path),
                                  *transform_args(spec, plan, folded=False), "--mlir", f"{spec.name}.mlir"],
              direct, tmp_path / "transform.log")
    rebind.apply(t, spec.name, bound, onnx_path)
    assert (bound / f"{spec.name}.mlir").read_text() == (direct / f"{spec.name}.mlir").read_text()
    wd, wb = np.load(direct / rebind.weight_npz_name(spec.name)), np.load(bound / rebind.weight_npz_name(spec.name))
    assert sorted(wd.files) == sorted(wb.files)
    for k in wd.files:
        assert wd[k].dtype == wb[k].dtype and np.array_equal(wd[k], wb[k]), k
    for d in (direct, bound):
        tools.run("model_deploy", ["--mlir", f"{spec.name}.mlir", "--quantize", "BF16", "--chip", "bm1684x",
                                   "--model", f"{spec.name}.bmodel"], d, d / "deploy.log")
    assert_same_bmodel_but_time(direct / f"{spec.name}.bmodel", bound / f"{spec.name}.bmodel")


def test_second_quantisation_runs_no_model_transform(compiled_dev_bf16, compile_build_dir, tmp_path):
    """Templates are keyed without the quantisation: a W4BF16 build of the export the BF16
    fixture compiled rebinds every piece whose graph has a rebindable template."""
    from tests.fixtures_compile import compile_into, make_workspace

    ws = make_workspace(tmp_path / "ws", compiled_dev_bf16 / "onnx")
    rep = compile_into(ws, compile_build_dir, ["--quantize", "W4BF16", "--no-check"])
    tools = [c.split()[0] for c in rep["tool_commands"]]
    n_transform = tools.count("model_transform")
    from fluxc.compile import rebind

    not_rebindable = [p for p in (compile_build_dir / "templates").iterdir()
                      if (t := rebind.load_template(p)) is not None and not t.rebindable]
    # the text encoders, head, tail and VAE have the same quantisation in both builds (cached);
    # the blocks are deployed again, from rebound MLIRs: not one model_transform
    blocks = [n for n in rep["pieces"] if "_trans_block_" in n]
    assert n_transform == 0 and tools.count("model_deploy") == len(blocks)
    for name in HELD_OUT.values():
        done = json.loads((Path(rep["pieces"][name]["build_dir"]) / "transform.done").read_text())
        assert done["how"] == "rebound", name
    print(f"W4BF16 after BF16: {n_transform} model_transform runs for {len(rep['pieces'])} pieces; "
          f"graphs not rebindable: {[p.name for p in not_rebindable]}")


def test_probe_pieces_are_checked_in_place_of_full_pieces(compiled_dev_bf16, compile_build_dir, tmp_path):
    """An export with probe pieces (as a full-size export has by default): compile checks the
    probes on the simulator and compiles the full pieces without the simulator run. At the
    tiny fixture's own shape the probes equal the fixture's first blocks, so they come from the
    cache; at full size they are separate small pieces."""
    from fluxc.export.driver import ExportOptions, run_export
    from fluxc.export.probes import PROBE_KINDS
    from tests.fixtures_compile import compile_into, make_workspace

    src = compiled_dev_bf16 / "onnx"
    exp = shutil.copytree(src, tmp_path / "onnx", symlinks=False)
    m = load_manifest(exp)
    run_export(ExportOptions(model=m.source["path"], out=exp, height=m.options["height"], width=m.options["width"],
                             t5_len=m.options["t5_seq_len"], probe=True), show_progress=False)
    m2 = load_manifest(exp)
    assert len(m2.probe["pieces"]) == len(PROBE_KINDS)
    ws = make_workspace(tmp_path / "ws", exp)
    rep = compile_into(ws, compile_build_dir, ["--quantize", "BF16", "--num-devices", "3"])
    assert rep["checked"].startswith("probe pieces")
    assert len(rep["probe_checks"]) == len(PROBE_KINDS)
    for name, p in rep["probe_checks"].items():
        assert p["similarity"]["quantized"]["cosine"] >= p["tolerance"][0], name
    assert all(not p["cache_hit"] or p["checked"] for p in rep["pieces"].values())


def test_estimate_only_gives_the_split_of_the_real_build(compiled_dev_bf16, compile_build_dir, tmp_path):
    """--estimate-only (for a build that does not fit the disk) models device memory as the
    real build measures it: the transformer parts equal the real BF16 split, and no bmodel is
    written or combined (cached pieces keep theirs)."""
    from tests.fixtures_compile import run_fluxc_compile

    out = tmp_path / "est"
    r = run_fluxc_compile([compiled_dev_bf16 / "onnx", "--quantize", "BF16", "--num-devices", "3", "--estimate-only",
                           "--out", out, "--build-dir", compile_build_dir])
    assert r.returncode == 0, r.stderr[-2000:]
    est = json.loads((out / "estimate_report.json").read_text())
    real = json.loads((compiled_dev_bf16 / "BM1684X" / "compile_report.json").read_text())
    assert not list(out.glob("*.bmodel"))
    assert est["estimate_only"] and len(est["device_memory"]) == 3
    parts = [set(d["pieces"]) for d in est["device_memory"]]
    for dev in real["device_split"]["split"]:
        assert set(dev["pieces"]) <= parts[dev["device"]]
    assert est["estimate_ms"]["denoising_step_ms"] == real["estimate_ms"]["denoising_step_ms"]
    for name, p in real["pieces"].items():
        assert Path(p["build_dir"], f"{name}.bmodel").is_file(), name


def test_piece_without_weights_compiles(tiny_schnell, tmp_path):
    """A checkpoint whose CLIP final_layer_norm has weight 1 and bias 0 (a freshly initialised
    text encoder): TPU-MLIR drops the trivial affine and writes no weight npz for clip_tail.
    The piece compiles (and is checked on the simulator) through a real model_transform, and a
    second quantisation rebinds it from its weightless template."""
    from safetensors.numpy import load_file, save_file

    from fluxc.compile import rebind
    from fluxc.compile import tools as toolmod
    from fluxc.compile.build import compile_piece
    from fluxc.compile.recipe import PiecePlan, load_recipe, piece_plan
    from fluxc.compile.tools import Tools
    from fluxc.export.driver import ExportOptions, resolve_inputs
    from fluxc.export.piece_export import export_one
    from fluxc.specs import piece_specs

    model = shutil.copytree(tiny_schnell, tmp_path / "model", symlinks=False)
    st = model / "text_encoder" / "model.safetensors"
    w = load_file(str(st))
    keys = [k for k in w if k.endswith("final_layer_norm.weight") or k.endswith("final_layer_norm.bias")]
    assert len(keys) == 2, sorted(w)[:5]
    for k in keys:
        w[k] = (np.ones_like if k.endswith("weight") else np.zeros_like)(w[k])
    save_file(w, str(st), metadata={"format": "pt"})

    out = tmp_path / "onnx"
    out.mkdir()
    opts = ExportOptions(model=str(model), out=out, height=128, width=128, t5_len=32)
    ckpt, _, dims, _ = resolve_inputs(opts)
    spec = next(s for s in piece_specs(dims) if s.kind == "clip_tail")
    export_one(spec, dims, ckpt, out, list(spec.parts), None)

    build, tools = tmp_path / "build", Tools()
    plan = piece_plan(load_recipe(None, "bm1684x"), spec, "W4BF16")
    r = compile_piece(spec, out / spec.file, "sha-of-this-test", plan, "bm1684x", toolmod.version(), build, tools, True)
    assert r.bmodel.is_file() and not r.cache_hit
    assert json.loads((r.folder / "transform.done").read_text()) == {
        "key": r.data["key"], "check": True, "how": "transformed", "weights": False}
    assert r.data["similarity"]["simulator"]["cosine"] >= 0.99
    [tdir] = (build / "templates").glob("clip_tail-*")
    t = rebind.load_template(tdir)
    assert t.rebindable and not t.weights and not t.npz.exists()

    # another quantisation: same graph, so the weightless template is rebound (no transform)
    other = PiecePlan("BF16" if plan.quantize != "BF16" else "F16", plan.options, plan.tolerance)
    n = len(tools.runs)
    r2 = compile_piece(spec, out / spec.file, "sha-of-this-test", other, "bm1684x", toolmod.version(), build, tools, True)
    assert r2.bmodel.is_file() and r2.folder != r.folder
    assert json.loads((r2.folder / "transform.done").read_text())["how"] == "rebound"
    assert not any(c.startswith("model_transform") for c in tools.runs[n:]), tools.runs[n:]
    assert r2.data["similarity"]["simulator"]["cosine"] >= 0.99
