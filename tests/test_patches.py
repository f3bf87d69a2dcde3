"""fluxc.patches: each patch against the unpatched module on random fp32 inputs, restore,
and the version checks.

Relative error: rel(a, ref) = max|a - ref| / max|ref|, required <= 1e-5."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from fluxc.errors import FluxcError
from fluxc.patches import (
    FluxAttnExportProcessor,
    Patcher,
    apply_rotary_table,
    apply_rotary_table_slices,
    clip_causal_mask,
    clip_layer_export,
    flux_ids,
    rotary_table,
    rotary_table_from_ids,
    t5_block_export,
    t5_position_bias,
)
from tests.test_pieces import AXES, rel, tiny_clip, tiny_dims, tiny_t5, tiny_transformer

TOL = 1e-5


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rmsnorms():
    from diffusers.models.normalization import RMSNorm as DRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    mods = {
        "torch.nn.RMSNorm": torch.nn.RMSNorm(64, eps=1e-6),
        "torch.nn.RMSNorm(eps=None)": torch.nn.RMSNorm(64),
        "diffusers.RMSNorm": DRMSNorm(64, eps=1e-6),
        "diffusers.RMSNorm(no affine)": DRMSNorm(64, eps=1e-6, elementwise_affine=False),
        "T5LayerNorm": T5LayerNorm(64, eps=1e-6),
    }
    with torch.no_grad():
        for i, m in enumerate(mods.values()):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.3 * _rand(64, seed=100 + i))
    return mods


@pytest.mark.parametrize("name", list(_rmsnorms()))
def test_rmsnorm_patch_matches_and_restores(name):
    m = _rmsnorms()[name]
    x = 3 * _rand(2, 7, 64, seed=1)
    with torch.no_grad():
        ref = m(x)
        with Patcher() as p:
            assert p.apply(m, ("rmsnorm",)).applied == ["rmsnorm: <root>"]
            assert "forward" in m.__dict__
            out = m(x)
            buf = io.BytesIO()  # the patched module exports with the TorchScript exporter
            torch.onnx.export(m, (x,), buf, opset_version=17, dynamo=False)
        after = m(x)
    e = rel(out, ref)
    print(f"{name}: rel err {e:.2e}")
    assert e <= TOL
    assert "forward" not in m.__dict__
    assert torch.equal(after, ref)


def _flux_attention(joint: bool, seed: int):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(seed)
    a = FluxAttention(query_dim=128, heads=2, dim_head=64, out_dim=128, bias=True, eps=1e-6,
                      added_kv_proj_dim=128 if joint else None, context_pre_only=False if joint else None,
                      pre_only=not joint)
    with torch.no_grad():
        for n, prm in a.named_parameters():
            if n.startswith("norm"):
                prm.copy_(1 + 0.3 * torch.randn_like(prm))
    return a.eval()


def _flux_rotary(t5_len, gh, gw):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.from_numpy(flux_ids(t5_len, gh, gw)).float()
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(AXES))(ids)
    table = torch.from_numpy(rotary_table(t5_len, gh * 16, gw * 16, axes_dims=AXES))
    return (cos, sin), table


@pytest.mark.parametrize("joint", [True, False], ids=["double_stream", "single_stream"])
@pytest.mark.parametrize("form", ["fattention/matmul", "prescaled/matmul", "sdpa/slices"])
def test_flux_attention_patch_matches_and_restores(joint, form):
    a = _flux_attention(joint, seed=3)
    S, N = 5, 12  # text tokens, image tokens (3 x 4 grid)
    (cos, sin), table = _flux_rotary(S, 3, 4)
    if joint:
        args = dict(hidden_states=_rand(1, N, 128, seed=4), encoder_hidden_states=_rand(1, S, 128, seed=5))
    else:
        args = dict(hidden_states=_rand(1, S + N, 128, seed=4))
    orig = a.processor
    with torch.no_grad():
        ref = a(**args, image_rotary_emb=(cos, sin))
        with Patcher() as p:
            p.apply(a)
            assert isinstance(a.processor, FluxAttnExportProcessor)
            attention, rotary = form.split("/")
            a.processor.attention, a.processor.rotary = attention, rotary
            assert sum(w.startswith("rmsnorm") for w in p.applied) == (4 if joint else 2)
            with_table = a(**args, image_rotary_emb=table)
            with_tuple = a(**args, image_rotary_emb=(cos, sin))
        after = a(**args, image_rotary_emb=(cos, sin))
    refs = ref if joint else (ref,)
    outs_t = with_table if joint else (with_table,)
    outs_c = with_tuple if joint else (with_tuple,)
    for o_t, o_c, r in zip(outs_t, outs_c, refs):
        print(f"joint={joint}: table rel err {rel(o_t, r):.2e}, (cos,sin) rel err {rel(o_c, r):.2e}")
        assert rel(o_t, r) <= TOL and rel(o_c, r) <= TOL
    assert a.processor is orig and "forward" not in a.norm_q.__dict__
    for x, y in zip(after if joint else (after,), refs):
        assert torch.equal(x, y)


def test_rotary_table_is_flux_pos_embed():
    from diffusers import FluxPipeline

    S, gh, gw = 7, 3, 5
    ids = flux_ids(S, gh, gw)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, gh, gw, "cpu", torch.float32)
    assert np.array_equal(ids[S:], img_ids.numpy()) and not ids[:S].any()
    (cos, sin), table = _flux_rotary(S, gh, gw)
    assert table.shape == (1, S + gh * gw, 1, sum(AXES) // 2, 2, 2) and table.dtype == torch.float32
    # per pair [[cos, -sin], [sin, cos]]; diffusers repeats each angle for the two pair members
    t = table[0, :, 0]
    assert torch.equal(t[..., 0, 0], cos[:, 0::2]) and torch.equal(t[..., 1, 1], cos[:, 1::2])
    assert torch.equal(t[..., 1, 0], sin[:, 0::2]) and torch.equal(t[..., 0, 1], -sin[:, 0::2])
    from diffusers.models.embeddings import apply_rotary_emb

    x = _rand(1, S + gh * gw, 3, sum(AXES), seed=6)
    ref = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    for name, f in (("matmul", apply_rotary_table), ("slices", apply_rotary_table_slices)):
        e = rel(f(x, table), ref)
        print(f"rotary apply ({name}) rel err {e:.2e}")
        assert e <= TOL
    # FluxDims entry point: same as the explicit one
    d = tiny_dims("dev")
    assert np.array_equal(rotary_table(d, axes_dims=AXES), rotary_table(d.t5_len, d.height, d.width, axes_dims=AXES))
    assert np.array_equal(rotary_table_from_ids(flux_ids(S, gh, gw), AXES), table.numpy())


def test_patched_transformer_forward_matches_and_restores():
    from diffusers import FluxPipeline

    tr = tiny_transformer("dev", seed=7)
    N, S = 24, 6
    kw = dict(hidden_states=_rand(1, N, 64, seed=8), encoder_hidden_states=_rand(1, S, 128, seed=9),
              pooled_projections=_rand(1, 128, seed=10), timestep=torch.tensor([0.4]), guidance=torch.tensor([3.5]),
              img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32),
              txt_ids=torch.zeros(S, 3), return_dict=False)
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    with torch.no_grad():
        ref = tr(**kw)[0]
        with Patcher() as p:
            p.apply(tr)
            n_attn = sum(w.startswith("flux_attention") for w in p.applied)
            out = tr(**kw)[0]
        after = tr(**kw)[0]
    assert n_attn == 4
    e = rel(out, ref)
    print(f"patched FluxTransformer2DModel rel err {e:.2e}")
    assert e <= TOL
    assert torch.equal(after, ref)
    assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())


def test_t5_block_with_baked_bias_matches_block():
    t5 = tiny_t5(seed=11)
    S = 9
    sa0 = t5.encoder.block[0].layer[0].SelfAttention
    bias = t5_position_bias(sa0, S)
    assert bias.shape == (1, 2, S, S)
    x = _rand(1, S, 128, seed=12)
    for i, block in enumerate(t5.encoder.block):
        with torch.no_grad():
            ref = block(x, attention_mask=None, position_bias=sa0.compute_bias(S, S))[0]
            out = t5_block_export(block, bias)(x)
        e = rel(out, ref)
        print(f"t5 block {i}: rel err {e:.2e}")
        assert e <= TOL


def test_clip_layer_with_baked_mask_matches_layer():
    clip = tiny_clip(seed=13)
    L = 16
    x = _rand(1, L, 128, seed=14)
    layer = clip.encoder.layers[1]
    causal = torch.triu(torch.full((L, L), torch.finfo(torch.float32).min), diagonal=1)[None, None]
    with torch.no_grad():
        ref = layer(x, attention_mask=causal)
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = clip_layer_export(layer, L)(x)
    e = rel(out, ref)
    print(f"clip layer: rel err {e:.2e}")
    assert e <= TOL
    m = clip_causal_mask(L)
    assert m[0, 0, 3, 3] == 0 and m[0, 0, 3, 4] == -10000.0 and m[0, 0, 4, 3] == 0


# ------------------------------------------------------------------------------ versions
def test_version_check_strict_fails_clearly_on_fake_version():
    a = _flux_attention(True, seed=15)
    orig = a.processor
    with pytest.raises(FluxcError) as ei:
        with Patcher(strict=True, versions={"diffusers": "0.99.0"}) as p:
            p.apply(a, ("flux_attention",))
    msg = str(ei.value)
    print(msg)
    assert "FluxAttention" in msg and "diffusers 0.99.0" in msg and "0.42." in msg and "pip install" in msg
    assert a.processor is orig


def test_version_check_tolerant_when_structure_matches_and_fails_when_not():
    a = _flux_attention(True, seed=16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Patcher(versions={"diffusers": "0.99.0"}) as p:
            p.apply(a, ("flux_attention",))
            assert isinstance(a.processor, FluxAttnExportProcessor)
    assert any("0.99.0" in str(x.message) for x in w)
    a.fused_projections = True  # a structure the patch does not handle
    for versions in ({"diffusers": "0.99.0"}, {}):
        with pytest.raises(FluxcError, match="fused q/k/v"):
            Patcher(versions=versions).apply(a, ("flux_attention",))
    t5 = tiny_t5()
    with pytest.raises(FluxcError, match="T5Block.*transformers 4.40.0"):
        t5_block_export(t5.encoder.block[1], torch.zeros(1, 2, 4, 4),
                        Patcher(strict=True, versions={"transformers": "4.40.0"}), "encoder.block.1")
    with pytest.raises(FluxcError, match="unknown fluxc patch"):
        Patcher().apply(a, ("nope",))


class _ByKeyword(torch.nn.Module):
    def __init__(self, m, emb_kw: bool):
        super().__init__()
        self.m, self.emb_kw = m, emb_kw

    def forward(self, x, emb):
        return self.m(x, emb=emb) if self.emb_kw else self.m(x, emb)


def test_adaln_patch_matches_and_has_no_shape_ops():
    import onnx
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

    torch.manual_seed(17)
    mods = {"zero": AdaLayerNormZero(128), "zero_single": AdaLayerNormZeroSingle(128),
            "continuous": AdaLayerNormContinuous(128, 128, elementwise_affine=False, eps=1e-6)}
    x, emb = _rand(1, 10, 128, seed=18), _rand(1, 128, seed=19)
    for name, m in mods.items():
        m.eval()
        call = (lambda m=m: m(x, emb)) if name == "continuous" else (lambda m=m: m(x, emb=emb))
        with torch.no_grad():
            ref = call()
            with Patcher() as p:
                assert p.apply(m, ("adaln",)).applied == ["adaln: <root>"]
                out = call()
                buf = io.BytesIO()
                torch.onnx.export(_ByKeyword(m, name != "continuous"), (x, emb), buf, opset_version=17, dynamo=False)
            after = call()
        ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
        refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
        for o, r in zip(outs, refs):
            assert rel(o, r) <= TOL, name
        assert "Shape" not in ops and "Gather" not in ops, (name, ops)
        for a, r in zip(after if isinstance(after, tuple) else (after,), refs):
            assert torch.equal(a, r)


def test_piece_factory_names_the_block_on_version_mismatch_and_leaves_it_unpatched():
    from fluxc.export.pieces import build_piece_module
    from fluxc.specs import piece_specs, specs_by_name

    dims = tiny_dims("dev")
    tr = tiny_transformer("dev", seed=20)
    spec = specs_by_name(piece_specs(dims))["dev_trans_block_1"]
    with pytest.raises(FluxcError, match=r"at 'transformer_blocks\.1\.attn\.norm_q' with diffusers 0\.99\.0"):
        build_piece_module(spec, dims, tr, patcher=Patcher(strict=True, versions={"diffusers": "0.99.0"}))
    assert not any("forward" in m.__dict__ for m in tr.modules())
