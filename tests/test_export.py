"""fluxc export on the tiny models: ONNX pieces vs torch, the chained pieces vs the original
models, the manifest contract, incremental re-runs, block-by-block loading, bad inputs."""
from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from fluxc.errors import FluxcError
from fluxc.export.manifest import load_manifest
from fluxc.metrics import cosine, max_abs_err
from tests.fixtures_export import EXPORT_HEIGHT, EXPORT_T5_LEN, EXPORT_WIDTH

COS_MIN = 0.99999
EXPORTS = ["export_schnell_tinyvae", "export_dev"]


@pytest.fixture(params=EXPORTS)
def exported(request) -> Path:
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------- helpers
@lru_cache(maxsize=None)
def torch_models(model_dir: str, tiny_vae: bool):
    """The original torch models of a checkpoint, fully loaded in float32."""
    from diffusers import AutoencoderKL, AutoencoderTiny, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    d = Path(model_dir)
    vae = (AutoencoderTiny.from_pretrained(d / "tiny_vae") if tiny_vae else AutoencoderKL.from_pretrained(d / "vae"))
    return {
        "transformer": FluxTransformer2DModel.from_pretrained(d / "transformer").float().eval(),
        "text_encoder": CLIPTextModel.from_pretrained(d / "text_encoder").float().eval(),
        "text_encoder_2": T5EncoderModel.from_pretrained(d / "text_encoder_2").float().eval(),
        "tiny_vae" if tiny_vae else "vae": vae.float().eval(),  # keyed by the component the VAE piece reads
    }


def models_of(m) -> dict:
    return torch_models(m.source["path"], m.dims.tiny_vae)


def sessions(m) -> dict:
    from tests.parity import ort_session

    return {s.name: ort_session(m.path(s.name)) for s in m.specs}


def run(m, sess, name, **inputs):
    from tests.parity import run_onnx

    return run_onnx(sess[name], m.spec(name), inputs)


def fluxc(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process like the console script; returns (exit code, stderr)."""
    from fluxc.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def not_complete(out: Path) -> bool:
    p = out / "manifest.json"
    return not p.exists() or json.loads(p.read_text()).get("complete") is not True


def tree_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the manifest
def test_manifest_contract(exported):
    import onnx

    from fluxc.export.onnx_io import check_io
    from fluxc.fsutil import sha256_file
    from fluxc.patches.rotary import rotary_table
    from fluxc.specs import PieceSpec, piece_specs

    m = load_manifest(exported)
    raw = json.loads((exported / "manifest.json").read_text())
    assert raw["complete"] is True and raw["format"] == 1
    tiny = m.dims.tiny_vae
    cfg = json.loads((Path(m.source["path"]) / "transformer" / "config.json").read_text())
    # sizes come from the configs and options
    assert (m.dims.num_double, m.dims.num_single) == (cfg["num_layers"], cfg["num_single_layers"])
    assert m.dims.inner_dim == cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert (m.dims.height, m.dims.width, m.dims.t5_len) == (EXPORT_HEIGHT, EXPORT_WIDTH, EXPORT_T5_LEN)
    assert m.dims.flux_type == ("dev" if cfg["guidance_embeds"] else "schnell")
    assert [s.to_dict() for s in m.specs] == [s.to_dict() for s in piece_specs(m.dims)]
    assert ("tiny_vae_decoder" if tiny else "vae_decoder") in m.entries
    for s in m.specs:
        assert PieceSpec.from_dict(s.to_dict()) == s
        assert sha256_file(m.path(s.name)) == m.sha256(s.name)
        check_io(onnx.load(str(m.path(s.name)), load_external_data=False), s, s.name)
        for t in s.inputs:
            if t.name == "input_ids":
                assert t.dtype == "float32"  # as sophon-demo's runtime feeds them
    for key in ("torch", "diffusers", "transformers", "onnx"):
        assert m.versions[key]
    assert m.source["revision"]
    # side files
    rot = np.load(m.rotary_path, allow_pickle=False)
    assert rot.dtype == np.float32 and rot.shape == m.dims.rotary_shape
    np.testing.assert_array_equal(rot, rotary_table(m.dims, axes_dims=cfg["axes_dims_rope"]))
    assert (m.tokenizer_dir / "tokenizer_config.json").is_file()
    assert (m.tokenizer_2_dir / "tokenizer_config.json").is_file()
    assert json.loads(m.scheduler_config_path.read_text())["num_train_timesteps"] == 1000
    assert "scaling_factor" in json.loads(m.vae_config_path.read_text())


# ----------------------------------------------------------------------------- per-piece parity
def test_every_piece_matches_its_torch_module(exported):
    from tests.parity import compare_piece
    from fluxc.export.pieces import build_piece_module
    from fluxc.patches import Patcher

    m = load_manifest(exported)
    models = models_of(m)
    worst = []
    with Patcher() as p:  # wrappers patch the models in memory; undone at the end
        for s in m.specs:
            mod = build_piece_module(s, m.dims, models[s.component], patcher=p)
            for r in compare_piece(mod, s, m.path(s.name), seed=1):
                worst.append(r)
    lo = min(worst, key=lambda r: r.cosine)
    hi = max(worst, key=lambda r: r.max_abs_err)
    print(f"{exported.parent.name}: {len(worst)} outputs; min cos {lo.cosine:.10f} ({lo.piece}); "
          f"max abs err {hi.max_abs_err:.3g} ({hi.piece}, ref max {hi.ref_max_abs:.3g})")
    bad = [str(r) for r in worst if not r.cosine >= COS_MIN]
    assert not bad, bad
    assert len(worst) == sum(len(s.outputs) for s in m.specs)


# ----------------------------------------------------------------------------- whole models
def test_chained_clip_and_t5_match_the_text_encoders(exported):
    import torch
    from transformers import AutoTokenizer

    m = load_manifest(exported)
    models, sess = models_of(m), sessions(m)
    prompt = "a photo of an astronaut riding a horse on the moon"
    tok = AutoTokenizer.from_pretrained(m.tokenizer_dir)
    ids = tok(prompt, padding="max_length", max_length=m.dims.clip_len, truncation=True, return_tensors="np")["input_ids"]
    ids = ids.astype(np.float32)
    h = run(m, sess, "clip_head", input_ids=ids)[0]
    for i in range(m.dims.clip_layers):
        h = run(m, sess, f"clip_block_{i}", hidden_states=h)[0]
    pooled = run(m, sess, "clip_tail", hidden_states=h, input_ids=ids)[0]
    with torch.no_grad():
        ref = models["text_encoder"](torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
    print("clip pooled: cos", cosine(ref, pooled), "max abs err", max_abs_err(ref, pooled))
    assert cosine(ref, pooled) >= COS_MIN

    tok2 = AutoTokenizer.from_pretrained(m.tokenizer_2_dir)
    ids2 = tok2(prompt, padding="max_length", max_length=m.dims.t5_len, truncation=True, return_tensors="np")["input_ids"]
    ids2 = ids2.astype(np.float32)
    h = run(m, sess, "t5_head", input_ids=ids2)[0]
    for i in range(m.dims.t5_layers):
        h = run(m, sess, f"t5_block_{i}", hidden_states=h)[0]
    enc = run(m, sess, "t5_tail", hidden_states=h)[0]
    with torch.no_grad():
        ref2 = models["text_encoder_2"](torch.from_numpy(ids2.astype(np.int64))).last_hidden_state.numpy()
    print("t5 hidden: cos", cosine(ref2, enc), "max abs err", max_abs_err(ref2, enc))
    assert cosine(ref2, enc) >= COS_MIN


def test_chained_transformer_matches_flux_forward(exported):
    import torch
    from diffusers import FluxPipeline

    m = load_manifest(exported)
    d, models, sess = m.dims, models_of(m), sessions(m)
    rng = np.random.default_rng(7)
    N, S = d.image_tokens, d.t5_len
    latents = rng.standard_normal((1, N, d.in_channels)).astype(np.float32)
    enc = rng.standard_normal((1, S, d.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((1, d.pooled_projection_dim)).astype(np.float32)
    t, g = np.array([0.7], np.float32), np.array([3.5], np.float32)
    # torch reference: FluxPipeline's call convention (timestep in 0..1, x1000 inside)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, d.latent_h // 2, d.latent_w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(S, 3)
    kw = dict(hidden_states=torch.from_numpy(latents), timestep=torch.from_numpy(t),
              pooled_projections=torch.from_numpy(pooled), encoder_hidden_states=torch.from_numpy(enc),
              txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
    if d.guidance_embeds:
        kw["guidance"] = torch.from_numpy(g)
    with torch.no_grad():
        ref = models["transformer"](**kw)[0].numpy()
    # ONNX chain: the runtime's convention (timestep and guidance x1000, real rotary table)
    p = d.flux_type
    head_in = dict(hidden_states=latents, timestep=t * 1000, pooled_projections=pooled, encoder_hidden_states=enc)
    if d.guidance_embeds:
        head_in["guidance"] = g * 1000
    temb, ehs, hs = run(m, sess, f"{p}_head", **head_in)
    rot = np.load(m.rotary_path)
    for i in range(d.num_double):
        ehs, hs = run(m, sess, f"{p}_trans_block_{i}", hidden_states=hs, encoder_hidden_states=ehs, temb=temb,
                      rotary_emb=rot)
    x = np.concatenate([ehs, hs], axis=1)
    for i in range(d.num_single):
        x = run(m, sess, f"{p}_single_trans_block_{i}", hidden_states=x, temb=temb, rotary_emb=rot)[0]
    noise = run(m, sess, f"{p}_tail", hidden_states=np.ascontiguousarray(x[:, S:]), temb=temb)[0]
    c, e = cosine(ref, noise), max_abs_err(ref, noise)
    print(f"{p} transformer noise_pred: cos {c:.8f} max abs err {e:.3g} (ref max {np.abs(ref).max():.3g})")
    assert c >= COS_MIN


def test_vae_piece_matches_vae_decode(exported):
    import torch

    m = load_manifest(exported)
    d, models, sess = m.dims, models_of(m), sessions(m)
    vae = models["tiny_vae" if d.tiny_vae else "vae"]
    lat = np.random.default_rng(3).standard_normal((1, d.latent_channels, d.latent_h, d.latent_w)).astype(np.float32)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(lat) / vae.config.scaling_factor + shift, return_dict=False)[0].numpy()
    name = "tiny_vae_decoder" if d.tiny_vae else "vae_decoder"
    img = run(m, sess, name, latents=lat)[0]
    print(f"{name}: cos {cosine(ref, img):.8f} max abs err {max_abs_err(ref, img):.3g}")
    assert img.shape == (1, 3, d.height, d.width)
    assert cosine(ref, img) >= COS_MIN


# ----------------------------------------------------------------------------- incremental
def test_rerun_rewrites_nothing_and_force_reexports(export_dev, tmp_path):
    from fluxc.export.driver import ExportOptions, run_export

    out = tmp_path / "onnx"
    shutil.copytree(export_dev, out, copy_function=shutil.copy2)
    m = load_manifest(out)
    opts = ExportOptions(model=m.source["path"], out=out, height=EXPORT_HEIGHT, width=EXPORT_WIDTH,
                         t5_len=EXPORT_T5_LEN, image_input=True)  # as the fixture was exported
    before = tree_state(out)
    res = run_export(opts, show_progress=False)
    assert res.exported == [] and len(res.reused) == len(m.specs)
    assert tree_state(out) == before  # not one file rewritten, manifest included

    # a deleted piece and a tampered piece are re-exported, nothing else
    (out / "t5_block_1.onnx").unlink()
    with open(out / "dev_tail.onnx", "ab") as f:
        f.write(b"\0")
    res = run_export(opts, show_progress=False)
    assert sorted(res.exported) == ["dev_tail", "t5_block_1"]
    load_manifest(out)

    opts.force = True
    res = run_export(opts, show_progress=False)
    assert len(res.exported) == len(m.specs)
    assert load_manifest(out).entries["dev_head"]["sha256"] == m.entries["dev_head"]["sha256"]  # deterministic


def test_changed_option_reexports_only_what_depends_on_it(export_dev, tmp_path):
    from fluxc.export.driver import ExportOptions, run_export

    out = tmp_path / "onnx"
    shutil.copytree(export_dev, out, copy_function=shutil.copy2)
    m = load_manifest(out)
    # a different T5 length changes T5 and transformer pieces, not CLIP or the VAE (decoder, encoder)
    opts = ExportOptions(model=m.source["path"], out=out, height=EXPORT_HEIGHT, width=EXPORT_WIDTH,
                         t5_len=EXPORT_T5_LEN + 16, image_input=True)
    res = run_export(opts, show_progress=False)
    m2 = load_manifest(out)
    same = {s.name for s in m2.specs if s.to_dict() == m.spec(s.name).to_dict()}
    assert set(res.reused) == same
    assert {s.name for s in m.specs if s.family in ("clip", "vae", "vae_encoder")} | {"dev_tail"} == same
    assert "vae_encoder" in same
    assert all(m2.sha256(n) == m.sha256(n) for n in same)
    assert m2.dims.t5_len == EXPORT_T5_LEN + 16
    assert np.load(m2.rotary_path).shape == m2.dims.rotary_shape


def test_interrupted_export_is_not_marked_complete(export_dev, tmp_path):
    from fluxc.export.driver import ExportOptions, run_export

    out = tmp_path / "onnx"
    shutil.copytree(export_dev, out, copy_function=shutil.copy2)
    m = load_manifest(out)
    seen = []

    def boom(spec, module, path):
        seen.append(spec.name)
        if len(seen) == 2:
            raise KeyboardInterrupt

    opts = ExportOptions(model=m.source["path"], out=out, height=EXPORT_HEIGHT, width=EXPORT_WIDTH, t5_len=16)
    with pytest.raises(KeyboardInterrupt):
        run_export(opts, show_progress=False, on_piece=boom)
    assert not_complete(out)
    with pytest.raises(FluxcError, match="incomplete"):
        load_manifest(out)


# ----------------------------------------------------------------------------- memory
def test_blocks_are_materialised_one_at_a_time(tiny_model_dir_for_export):
    """Loading a piece materialises exactly its own tensors; releasing frees them all."""
    from fluxc.export.checkpoint import Checkpoint
    from fluxc.export.loading import _param_slots, loaded_bytes, materialize, release
    from fluxc.export.source import resolve
    from fluxc.export.dims import build_dims
    from fluxc.specs import piece_specs

    ckpt = Checkpoint(resolve(str(tiny_model_dir_for_export)), None)
    c = ckpt.configs
    dims = build_dims(flux_type="dev", height=64, width=64, t5_len=8, transformer=c["transformer"],
                      clip=c["text_encoder"], t5=c["text_encoder_2"], vae=c["vae"], tiny_vae=None)
    for spec in piece_specs(dims):
        comp = spec.component
        model = ckpt.model(comp)
        assert loaded_bytes(model) == 0
        prefixes = list(spec.parts)
        materialize(model, prefixes, ckpt.stores[comp], comp)
        own = {id(mod._parameters[n]) : mod._parameters[n] for _, mod, n in _param_slots(model, prefixes)}
        assert loaded_bytes(model) == sum(p.numel() * 4 for p in own.values()), spec.name
        if spec.index is not None and spec.family == "transformer":
            total = sum(p.numel() for p in model.parameters())
            assert sum(p.numel() for p in own.values()) < total / 3, spec.name
        release(model, prefixes)
        assert loaded_bytes(model) == 0


@pytest.fixture(scope="session")
def tiny_model_dir_for_export(export_dev) -> Path:
    return Path(load_manifest(export_dev).source["path"])


def test_large_pieces_use_external_data(tiny_model_dir_for_export, tmp_path, monkeypatch):
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxc.export import onnx_io
    from fluxc.export.dims import build_dims
    from tests.parity import compare_piece
    from fluxc.export.pieces import build_piece_module
    from fluxc.export.source import read_json
    from fluxc.specs import piece_specs

    d = tiny_model_dir_for_export
    cfgs = {k: read_json(d / k / "config.json", k) for k in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    dims = build_dims(flux_type="dev", height=64, width=64, t5_len=8, transformer=cfgs["transformer"],
                      clip=cfgs["text_encoder"], t5=cfgs["text_encoder_2"], vae=cfgs["vae"], tiny_vae=None)
    spec = next(s for s in piece_specs(dims) if s.name == "dev_trans_block_1")
    tr = FluxTransformer2DModel.from_pretrained(d / "transformer").float().eval()
    mod = build_piece_module(spec, dims, tr)
    monkeypatch.setattr(onnx_io, "EXTERNAL_THRESHOLD", 1024)
    written = onnx_io.export_piece(mod, spec, tmp_path)
    assert written == [spec.file, spec.file + ".data"]
    assert (tmp_path / (spec.file + ".data")).stat().st_size > (tmp_path / spec.file).stat().st_size
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    res = compare_piece(mod, spec, tmp_path / spec.file)
    assert all(r.cosine >= COS_MIN for r in res), res
    mod.fluxc_patcher.restore()


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_give_one_line_errors(tiny_model_dir_for_export, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good = tiny_model_dir_for_export
    out = tmp_path / "out"
    small = ["--height", "64", "--width", "64", "--t5-seq-len", "8", "--out", str(out)]

    code, err = fluxc(["export", str(tmp_path / "nope"), *small], capsys)
    assert_one_line_error(code, err, "does not exist")

    notflux = tmp_path / "notflux"
    (notflux / "unet").mkdir(parents=True)
    (notflux / "unet" / "config.json").write_text("{}")
    code, err = fluxc(["export", str(notflux), *small], capsys)
    assert_one_line_error(code, err, "not a diffusers FLUX.1 checkpoint")

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    for f in (broken / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    code, err = fluxc(["export", str(broken), *small], capsys)
    assert_one_line_error(code, err, "text_encoder_2", "safetensors")

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    st = next((truncated / "vae").glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    code, err = fluxc(["export", str(truncated), *small], capsys)
    assert_one_line_error(code, err, "vae", "truncated")

    code, err = fluxc(["export", str(good), "--height", "100", "--width", "64", "--out", str(out)], capsys)
    assert_one_line_error(code, err, "multiple of 16")

    code, err = fluxc(["export", str(good), "--flux-type", "schnell", *small], capsys)
    assert_one_line_error(code, err, "contradicts")

    # bare `fluxc export`: default workspace, default Hub id, offline here
    code, err = fluxc(["export", "--models", str(tmp_path / "ws")], capsys)
    assert_one_line_error(code, err, "black-forest-labs/FLUX.1-schnell", "local")
    assert not (tmp_path / "ws" / "onnx" / "manifest.json").exists()
    assert not_complete(out)


def test_refuses_another_models_export_unless_forced(export_dev, export_schnell_tinyvae, tmp_path, capsys):
    out = tmp_path / "onnx"
    shutil.copytree(export_dev, out, copy_function=shutil.copy2)
    before = tree_state(out)
    schnell_src = load_manifest(export_schnell_tinyvae).source["path"]
    args = ["export", schnell_src, "--out", str(out), "--height", str(EXPORT_HEIGHT), "--width", str(EXPORT_WIDTH),
            "--t5-seq-len", str(EXPORT_T5_LEN)]
    code, err = fluxc(args, capsys)
    assert_one_line_error(code, err, "another model", "--force")
    assert tree_state(out) == before

    code, err = fluxc(args + ["--force"], capsys)
    assert code == 0, err
    m = load_manifest(out)
    assert m.dims.flux_type == "schnell" and m.source["path"] == schnell_src
    # no piece of the dev export is left behind
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(s.file for s in m.specs)
