"""Chaining the per-piece wrappers (fluxc.export.pieces) in torch reproduces the original
diffusers/transformers models; patched blocks export to ONNX and match in onnxruntime.

Relative error: rel(a, ref) = max|a - ref| / max|ref| (fp32), required <= 1e-5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxc.export.pieces import (
    build_all_pieces,
    build_piece_module,
    module_key,
    needs_tensor,
)
from fluxc.patches import rotary_table
from fluxc.specs import FluxDims, piece_specs, specs_by_name

TOL = 1e-5
AXES = (16, 24, 24)
H_IMG, W_IMG = 64, 96  # latent 8x12, 4x6 = 24 image tokens
T5_LEN, CLIP_LEN = 16, 16


def rel(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def _perturb_1d(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make norm weights/biases non-trivial so a wrapper that skips one is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_dims(flux_type: str, tiny_vae: bool = False) -> FluxDims:
    return FluxDims(flux_type=flux_type, height=H_IMG, width=W_IMG,
                    clip_vocab=1000, clip_dim=128, clip_layers=2, clip_len=CLIP_LEN,
                    t5_vocab=1000, t5_dim=128, t5_layers=2, t5_len=T5_LEN,
                    inner_dim=128, head_dim=64, in_channels=64, out_channels=64, num_double=2, num_single=2,
                    joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=flux_type == "dev",
                    latent_channels=16, vae_scale=8, tiny_vae=tiny_vae)


def tiny_transformer(flux_type: str, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                               attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                               pooled_projection_dim=128, guidance_embeds=flux_type == "dev", axes_dims_rope=AXES)
    return _perturb_1d(m, seed)


def tiny_clip(eos_token_id: int = 2, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_LEN, bos_token_id=0,
                         eos_token_id=eos_token_id, pad_token_id=1, hidden_act="quick_gelu")
    return _perturb_1d(CLIPTextModel(cfg), seed)


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=1000, d_model=128, d_kv=64, d_ff=256, num_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _perturb_1d(T5EncoderModel(cfg), seed)


def tiny_vae_kl(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    m = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32),
                      layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                      scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    return _perturb_1d(m, seed)


def tiny_vae_taesd(seed: int = 0, scaling: float = 1.0, shift: float = 0.0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    m = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8, 8, 8),
                        decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                        num_decoder_blocks=(1, 1, 1, 1), latent_channels=16, scaling_factor=scaling,
                        shift_factor=shift)
    return _perturb_1d(m, seed)


def run(mod, *args):
    with torch.no_grad():
        out = mod(*args)
    assert isinstance(out, tuple)
    return out


def chain_transformer(pieces: dict, dims: FluxDims, hidden, timestep_x1000, guidance_x1000, pooled, t5, table):
    p = dims.flux_type
    head_args = [hidden, timestep_x1000] + ([guidance_x1000] if dims.guidance_embeds else []) + [pooled, t5]
    temb, enc, hid = run(pieces[f"{p}_head"], *head_args)
    for i in range(dims.num_double):
        enc, hid = run(pieces[f"{p}_trans_block_{i}"], hid, enc, temb, table)
    x = torch.cat([enc, hid], dim=1)
    for i in range(dims.num_single):
        (x,) = run(pieces[f"{p}_single_trans_block_{i}"], x, temb, table)
    (noise,) = run(pieces[f"{p}_tail"], x[:, dims.t5_len:], temb)
    return noise


@pytest.mark.parametrize("flux_type", ["dev", "schnell"])
def test_transformer_chain_matches_forward(flux_type):
    from diffusers import FluxPipeline

    dims = tiny_dims(flux_type)
    tr = tiny_transformer(flux_type, seed=1)
    g = torch.Generator().manual_seed(2)
    N, S = dims.image_tokens, dims.t5_len
    hidden = torch.randn(1, N, 64, generator=g)
    t5 = torch.randn(1, S, 128, generator=g)
    pooled = torch.randn(1, 128, generator=g)
    t = torch.tensor([0.73])
    guidance = torch.tensor([3.5]) if flux_type == "dev" else None
    img_ids = FluxPipeline._prepare_latent_image_ids(1, dims.latent_h // 2, dims.latent_w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(S, 3)
    with torch.no_grad():
        ref = tr(hidden_states=hidden, encoder_hidden_states=t5, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

    table = torch.from_numpy(rotary_table(dims, axes_dims=AXES))
    assert tuple(table.shape) == dims.rotary_shape
    specs = piece_specs(dims)
    pieces = build_all_pieces(specs, dims, {"transformer": tr})
    # the runtime feeds t in 0..1000 and guidance_scale * 1000
    noise = chain_transformer(pieces, dims, hidden, t * 1000, guidance * 1000 if guidance is not None else None,
                              pooled, t5, table)
    for s in specs:
        if s.family == "transformer":
            assert [tuple(o.shape) for o in run(pieces[s.name], *[torch.from_numpy(a) for a in s.sample_inputs().values()])] \
                == [o.shape for o in s.outputs], s.name
    e = rel(noise, ref)
    print(f"{flux_type} transformer chain rel err {e:.2e}")
    assert e <= TOL
    # the patches stay on until restored; restoring gives back the original processors
    next(iter(pieces.values())).fluxc_patcher.restore()
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    assert all(type(b.attn.processor) is FluxAttnProcessor for b in tr.transformer_blocks)


@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_clip_chain_matches_pooled(eos_token_id):
    dims = tiny_dims("schnell")
    clip = tiny_clip(eos_token_id, seed=3)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(10, 900, (1, CLIP_LEN), generator=g)
    ids[0, 0] = 0
    ids[0, 9] = eos_token_id
    if eos_token_id == 2:
        ids[0, 5] = 999  # argmax rule: pooled at the largest id, not at the eos
    else:
        ids[0, 12] = eos_token_id  # first-eos rule: two eos tokens
    ids_f = ids.to(torch.float32)  # the pieces take float32 ids
    with torch.no_grad():
        out = clip(input_ids=ids)
    pieces = build_all_pieces(piece_specs(dims), dims, {"text_encoder": clip})
    (h,) = run(pieces["clip_head"], ids_f)
    for i in range(dims.clip_layers):
        (h,) = run(pieces[f"clip_block_{i}"], h)
    (pooled,) = run(pieces["clip_tail"], h, ids_f)
    assert pooled.shape == (1, 128)
    e = rel(pooled, out.pooler_output)
    print(f"clip pooled (eos {eos_token_id}) rel err {e:.2e}")
    assert e <= TOL


def test_t5_chain_matches_last_hidden_state():
    dims = tiny_dims("dev")
    t5 = tiny_t5(seed=5)
    ids = torch.randint(0, 1000, (1, T5_LEN), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = t5(input_ids=ids).last_hidden_state
    pieces = build_all_pieces(piece_specs(dims), dims, {"text_encoder_2": t5})
    (h,) = run(pieces["t5_head"], ids.to(torch.float32))
    for i in range(dims.t5_layers):
        (h,) = run(pieces[f"t5_block_{i}"], h)
    (out,) = run(pieces["t5_tail"], h)
    e = rel(out, ref)
    print(f"t5 rel err {e:.2e}")
    assert e <= TOL


def test_vae_decoder_matches_pipeline_unscaling():
    dims = tiny_dims("dev")
    vae = tiny_vae_kl(seed=7)
    lat = torch.randn(1, 16, dims.latent_h, dims.latent_w, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    spec = specs_by_name(piece_specs(dims))["vae_decoder"]
    (img,) = run(build_piece_module(spec, dims, vae), lat)
    assert img.shape == spec.outputs[0].shape
    e = rel(img, ref)
    print(f"vae rel err {e:.2e}")
    assert e <= TOL


@pytest.mark.parametrize("scaling,shift", [(1.0, 0.0), (0.5, 0.25)])
def test_tiny_vae_decoder_matches_pipeline_contract(scaling, shift):
    dims = tiny_dims("schnell", tiny_vae=True)
    vae = tiny_vae_taesd(seed=9, scaling=scaling, shift=shift)
    lat = torch.randn(1, 16, dims.latent_h, dims.latent_w, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():  # what FluxPipeline does with pipe.vae = AutoencoderTiny(...)
        ref = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    spec = specs_by_name(piece_specs(dims))["tiny_vae_decoder"]
    (img,) = run(build_piece_module(spec, dims, vae), lat)
    assert img.shape == spec.outputs[0].shape
    e = rel(img, ref)
    print(f"tiny vae rel err {e:.2e}")
    assert e <= TOL


def test_piece_parts_cover_exactly_what_each_piece_uses():
    """Every component parameter a wrapper touches lies under one of spec.parts."""
    dims = tiny_dims("dev")
    comps = {"transformer": tiny_transformer("dev"), "text_encoder": tiny_clip(), "text_encoder_2": tiny_t5(),
             "vae": tiny_vae_kl()}
    for spec in piece_specs(dims):
        comp = comps[spec.component]
        names = {id(p): n for n, p in comp.named_parameters(remove_duplicate=False)}
        mod = build_piece_module(spec, dims, comp)
        used = {names[id(p)] for p in mod.parameters() if id(p) in names}
        assert used, spec.name
        prefixes = spec.parts
        outside = [n for n in used if not any(n.startswith(pre) for pre in prefixes)]
        assert not outside, (spec.name, outside)
        mod.fluxc_patcher.restore()
        if spec.kind == "t5_block":
            assert needs_tensor(spec, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    # CLIP checkpoints keep the text_model. prefix that transformers 5.x drops
    assert module_key("text_encoder", "text_model.encoder.layers.1.mlp.fc1.weight") == "encoder.layers.1.mlp.fc1.weight"
    clip_block_1 = specs_by_name(piece_specs(dims))["clip_block_1"]
    assert needs_tensor(clip_block_1, "text_model.encoder.layers.1.mlp.fc1.weight")
    assert not needs_tensor(clip_block_1, "text_model.encoder.layers.0.mlp.fc1.weight")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def dev_components():
    return {"transformer": tiny_transformer("dev", seed=11), "text_encoder": tiny_clip(seed=12),
            "text_encoder_2": tiny_t5(seed=13), "vae": tiny_vae_kl(seed=14), "tiny_vae": tiny_vae_taesd(seed=15)}


_EXPORT_NAMES = [s.name for s in piece_specs(tiny_dims("dev"))] + ["tiny_vae_decoder"]
_BLOCKS = {"dev_trans_block_1", "dev_single_trans_block_0"}


@pytest.mark.parametrize("which", sorted(_EXPORT_NAMES, key=lambda n: (n not in _BLOCKS, n)))
def test_pieces_export_to_onnx(which, dev_components, tmp_path):
    """TorchScript export (opset 17, dynamo=False) + onnxruntime parity for every piece kind;
    the two transformer blocks are the patched graphs TPU-MLIR compiles."""
    import onnx
    import onnxruntime as ort

    dims = tiny_dims("dev", tiny_vae=which == "tiny_vae_decoder")
    spec = specs_by_name(piece_specs(dims))[which]
    comp = dev_components["tiny_vae" if which == "tiny_vae_decoder" else spec.component]
    mod = build_piece_module(spec, dims, comp)
    try:
        feeds = spec.sample_inputs(seed=3)
        if "rotary_emb" in feeds:
            feeds["rotary_emb"] = rotary_table(dims, axes_dims=AXES)  # a real table
        args = tuple(torch.from_numpy(a) for a in feeds.values())
        with torch.no_grad():
            ref = mod(*args)
        path = tmp_path / spec.file
        torch.onnx.export(mod, args, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], opset_version=17, dynamo=False)
    finally:
        mod.fluxc_patcher.restore()
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    if spec.kind in ("double_block", "single_block"):
        assert "Softmax" in ops and "MatMul" in ops
        # no rms_norm, no runtime shape arithmetic, no Gather: static Slice/Reshape only
        assert not ops & {"Shape", "Gather", "ScatterND", "If", "Loop"}, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    assert [i.name for i in sess.get_inputs()] == [t.name for t in spec.inputs]
    assert [o.name for o in sess.get_outputs()] == [t.name for t in spec.outputs]
    for o, r, t in zip(outs, ref, spec.outputs):
        assert o.shape == t.shape
        c = _cosine(o, r.numpy())
        print(f"{which} {t.name}: onnxruntime vs torch cosine {c:.7f}, rel err {rel(o, r):.2e}")
        assert c >= 0.99999
