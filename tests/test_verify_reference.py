"""The pieces of verify that need no compiler: metrics that cannot be fooled, and the
independent reference (original diffusers/transformers models, whole or streamed block by
block) against the exported ONNX pieces and diffusers' own rotary embedding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fluxc.metrics import cosine, rel_err
from fluxc.validation.metrics import compare


def test_metrics_fail_dead_and_noop_outputs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 64)).astype(np.float32)
    inp = ref - 0.1 * rng.standard_normal((4, 64)).astype(np.float32)
    assert cosine(np.zeros(8), np.zeros(8)) == 1.0 and cosine(ref, np.zeros_like(ref)) == 0.0
    assert "all zeros" in compare(ref, np.zeros_like(ref))["flags"]
    assert "constant output" in compare(ref, np.full_like(ref, 0.5))["flags"]
    noop = compare(ref, inp.copy(), inp)
    assert any(f.startswith("no-op") for f in noop["flags"])
    # a no-op piece keeps a high plain cosine: only the flag and the update figures show it
    assert noop["cosine"] > 0.99 and noop["delta_cosine"] < 0.1
    good = compare(ref, ref + 1e-3 * rng.standard_normal(ref.shape), inp)
    assert good["flags"] == [] and good["delta_cosine"] > 0.99 and good["rel_err"] < 1e-2
    assert "non-finite values" in compare(ref, np.full_like(ref, np.nan))["flags"]
    assert rel_err(ref, 2 * ref) == pytest.approx(1.0)


def _onnx_chain(man):
    from fluxc.runtime.models import open_onnx
    from fluxc.validation.verify import piece_chain

    ms = open_onnx(man)
    try:
        return piece_chain(ms, man, "a photo of an astronaut riding a horse on the moon", 0, 3.5)
    finally:
        ms.close()


@pytest.mark.parametrize("streamed", [False, True])
def test_reference_matches_the_onnx_pieces(streamed, export_schnell_tinyvae):
    """Teacher-forced on the ONNX chain's own activations, the original models reproduce every
    exported piece to float32 rounding; streamed block by block (meta model, tensors read per
    block) they give the same numbers as from_pretrained."""
    from fluxc.export.manifest import load_manifest
    from fluxc.validation.reference import Reference, ReferenceModels, find_source
    from fluxc.validation.verify import torch_reference

    man = load_manifest(export_schnell_tinyvae)
    src, why = find_source(man)
    assert src is not None, why
    chip = _onnx_chain(man)
    models = ReferenceModels(src, load_limit=0 if streamed else None)
    hop, clean = torch_reference(Reference(models, man.dims), man, chip, 3.5)
    if streamed:
        assert set(models.streamed) == {"transformer", "text_encoder", "text_encoder_2"}
        # after a call every streamed block is back on the meta device
        tr = models.model("transformer")
        assert all(p.device.type == "meta" for p in tr.transformer_blocks.parameters())
    for name, (_, outs) in chip["calls"].items():
        for k, v in outs.items():
            r = compare(hop[name][k], v)
            assert r["rel_err"] < 1e-4 and not r["flags"], (name, k, r)
            # the ONNX chain is also the clean chain here (same tokens, same latents)
            assert compare(clean[name][k], v)["rel_err"] < 1e-3, (name, k)


def test_rotary_table_against_fluxposembed(export_schnell_tinyvae, tmp_path):
    from fluxc.export.manifest import load_manifest
    from fluxc.validation import mutants as mu
    from fluxc.validation.reference import Reference, ReferenceModels, find_source, rotary_from_table

    man = load_manifest(export_schnell_tinyvae)
    src, _ = find_source(man)
    cos, sin = Reference(ReferenceModels(src), man.dims).rotary()
    c, s = rotary_from_table(np.load(man.rotary_path))
    assert np.abs(c - cos).max() < 1e-6 and np.abs(s - sin).max() < 1e-6
    exp = mu.copy_export(export_schnell_tinyvae, tmp_path / "onnx")
    mu.swap_rotary_axes(exp, (16, 24, 24))
    c2, s2 = rotary_from_table(np.load(exp / "rotary_emb.npy"))
    assert max(np.abs(c2 - cos).max(), np.abs(s2 - sin).max()) > 0.1


def test_missing_source_is_reported(export_schnell_tinyvae, tmp_path):
    import json

    from fluxc.export.manifest import load_manifest
    from fluxc.validation import mutants as mu
    from fluxc.validation.reference import find_source

    exp = mu.copy_export(export_schnell_tinyvae, tmp_path / "onnx")
    m = json.loads((exp / "manifest.json").read_text())
    m["source"]["path"] = str(tmp_path / "nowhere")
    (exp / "manifest.json").write_text(json.dumps(m))
    src, why = find_source(load_manifest(Path(exp)))
    assert src is None and "nowhere" in why


def test_mutants_change_the_piece_and_never_the_checkpoint(export_schnell_tinyvae, tiny_schnell, tmp_path):
    """A mutated piece computes something else in ONNX Runtime, its manifest hash follows (so
    compile rebuilds it), and no file of the source checkpoint (hard-linked into weights/ by the
    export) changes."""
    import json

    from fluxc.export.manifest import load_manifest
    from fluxc.fsutil import sha256_file
    from fluxc.runtime.onnx_engine import OnnxEngine
    from fluxc.validation import mutants as mu

    ckpt = {p: sha256_file(p) for p in Path(tiny_schnell).rglob("*.safetensors")}
    exp = mu.copy_export(export_schnell_tinyvae, tmp_path / "onnx")
    man0 = load_manifest(Path(export_schnell_tinyvae))
    name = "schnell_trans_block_1"
    before = json.loads((exp / "manifest.json").read_text())
    assert mu.scale_block_weights(exp, name, 1.25) > 0
    mu.identity_block(exp, "schnell_single_trans_block_0")
    after = json.loads((exp / "manifest.json").read_text())
    sha = {e["name"]: e["sha256"] for e in before["pieces"]}
    changed = {e["name"] for e in after["pieces"] if e["sha256"] != sha[e["name"]]}
    assert changed == {name, "schnell_single_trans_block_0"}
    spec = man0.spec(name)
    x = spec.sample_inputs(0)
    a = OnnxEngine(man0.path(name)).process(name, x)
    b = OnnxEngine(exp / f"{name}.onnx").process(name, x)
    assert max(rel_err(a[k], b[k]) for k in a) > 0.1
    s = man0.spec("schnell_single_trans_block_0")
    xi = s.sample_inputs(0)
    out = OnnxEngine(exp / "schnell_single_trans_block_0.onnx").process(s.net_name, xi)
    assert np.array_equal(list(out.values())[0], xi["hidden_states"])  # identity, exactly
    assert ckpt == {p: sha256_file(p) for p in ckpt}
