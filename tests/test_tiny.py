"""The built-in tiny FLUX model: loads in diffusers, generates, is deterministic, and every
piece does real work."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fluxc.errors import FluxcError
from fluxc.tiny import build_tiny, folder_size, is_tiny_model
from tests.fixtures_tiny import TINY_PROMPT, load_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
FLUXC = REPO / ".venv" / "bin" / "fluxc"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _generate(pipe, prompt: str, dev: bool, seed: int = 0, guidance: float = 3.5, size: int = 128) -> np.ndarray:
    import torch

    out = pipe(
        prompt,
        height=size,
        width=size,
        num_inference_steps=2,
        guidance_scale=guidance if dev else 0.0,
        max_sequence_length=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return out.images[0]


def _check_image(img: np.ndarray, size: int = 128) -> None:
    assert img.shape == (size, size, 3)
    assert np.isfinite(img).all()
    assert img.std() > 0.05, "image is (nearly) constant"
    saturated = float(((img <= 0.0) | (img >= 1.0)).mean())
    assert saturated < 0.3, f"{saturated:.0%} of the pixels are clipped"


# ------------------------------------------------------------------------- generation
def test_schnell_pipeline_generates(tiny_schnell: Path) -> None:
    pipe = load_tiny_pipeline(tiny_schnell)
    assert not pipe.transformer.config.guidance_embeds
    t0 = time.time()
    img = _generate(pipe, TINY_PROMPT, dev=False)
    print(f"schnell 128x128, 2 steps: {time.time() - t0:.2f} s")
    _check_image(img)
    again = _generate(pipe, TINY_PROMPT, dev=False)
    assert np.array_equal(img, again)
    other = _generate(pipe, "a cat holding a sign that says hello world", dev=False)
    assert np.abs(other - img).mean() > 1e-3, "the prompt does not change the image: text encoders inert"


def test_dev_pipeline_generates(tiny_dev: Path) -> None:
    pipe = load_tiny_pipeline(tiny_dev)
    assert pipe.transformer.config.guidance_embeds
    t0 = time.time()
    img = _generate(pipe, TINY_PROMPT, dev=True, guidance=3.5)
    print(f"dev 128x128, 2 steps: {time.time() - t0:.2f} s")
    _check_image(img)
    other = _generate(pipe, TINY_PROMPT, dev=True, guidance=7.0)
    assert np.abs(other - img).mean() > 1e-3, "guidance does not change the image: guidance embedder inert"


def test_every_block_changes_its_input(tiny_dev: Path) -> None:
    """No zero-initialised gates or output layers: each transformer block, the text encoders'
    layers and the VAE decoder move their input by a real amount, and nothing blows up."""
    import torch

    pipe = load_tiny_pipeline(tiny_dev)
    rel: dict[str, list[float]] = {}
    scale: dict[str, list[float]] = {}

    def hook(name, pick_in, pick_out):
        def f(_m, args, kwargs, out):
            x_in = pick_in(args, kwargs).float()
            x_out = pick_out(out).float()
            rel.setdefault(name, []).append(((x_out - x_in).norm() / x_in.norm()).item())
            scale.setdefault(name, []).append(x_out.std().item())
        return f

    tr = pipe.transformer
    for i, b in enumerate(tr.transformer_blocks):
        b.register_forward_hook(hook(f"double{i}", lambda a, k: k["hidden_states"], lambda o: o[1]), with_kwargs=True)
    for i, b in enumerate(tr.single_transformer_blocks):
        b.register_forward_hook(hook(f"single{i}", lambda a, k: k["hidden_states"], lambda o: o[1]), with_kwargs=True)
    for i, layer in enumerate(pipe.text_encoder.encoder.layers):
        layer.register_forward_hook(hook(f"clip{i}", lambda a, k: a[0] if a else k["hidden_states"],
                                         lambda o: o[0] if isinstance(o, tuple) else o), with_kwargs=True)
    for i, blk in enumerate(pipe.text_encoder_2.encoder.block):
        blk.register_forward_hook(hook(f"t5_{i}", lambda a, k: a[0] if a else k["hidden_states"],
                                       lambda o: o[0] if isinstance(o, tuple) else o), with_kwargs=True)
    _generate(pipe, TINY_PROMPT, dev=True)
    assert len(rel) == 3 + 3 + 2 + 2, sorted(rel)
    for name, values in rel.items():
        assert min(values) > 0.05, f"{name} barely changes its input: {values}"
        assert max(scale[name]) < 20, f"{name} activations blow up: {scale[name]}"

    vae = pipe.vae
    lat = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = vae.decode(lat).sample
        b = vae.decode(lat * 0.5).sample
    assert a.shape == (1, 3, 128, 128)
    assert 0.05 < a.std().item() < 5
    assert (a - b).abs().mean().item() > 1e-2


def test_no_zero_or_constant_tensor(tiny_dev: Path) -> None:
    from safetensors import safe_open

    files = sorted(tiny_dev.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"transformer", "text_encoder", "text_encoder_2", "vae", "tiny_vae"}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k).float()
                assert t.numel() == 1 or t.std().item() > 1e-4, f"{f.parent.name}/{k} is constant"


# ------------------------------------------------------------------------- layout and sizes
def test_configs_are_the_documented_sizes(tiny_schnell: Path, tiny_dev: Path) -> None:
    from transformers import AutoTokenizer

    for path, flux_type in ((tiny_schnell, "schnell"), (tiny_dev, "dev")):
        assert is_tiny_model(path)
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == "FluxPipeline"
        assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
        tr = json.loads((path / "transformer/config.json").read_text())
        assert tr["_class_name"] == "FluxTransformer2DModel"
        assert (tr["num_layers"], tr["num_single_layers"], tr["attention_head_dim"], tr["num_attention_heads"]) == (3, 3, 64, 2)
        assert (tr["joint_attention_dim"], tr["pooled_projection_dim"], tr["in_channels"]) == (128, 128, 64)
        assert list(tr["axes_dims_rope"]) == [16, 24, 24]
        assert tr["guidance_embeds"] is (flux_type == "dev")

        clip = json.loads((path / "text_encoder/config.json").read_text())
        clip_tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        assert (clip["hidden_size"], clip["num_hidden_layers"], clip["num_attention_heads"]) == (128, 2, 2)
        assert (clip["intermediate_size"], clip["max_position_embeddings"], clip["projection_dim"]) == (256, 77, 128)
        assert clip["vocab_size"] == len(clip_tok)
        assert clip["eos_token_id"] == clip_tok.eos_token_id == clip["vocab_size"] - 1
        assert clip["bos_token_id"] == clip_tok.bos_token_id

        t5 = json.loads((path / "text_encoder_2/config.json").read_text())
        t5_tok = AutoTokenizer.from_pretrained(str(path / "tokenizer_2"))
        assert (t5["d_model"], t5["d_kv"], t5["num_heads"], t5["d_ff"], t5["num_layers"]) == (128, 64, 2, 256, 2)
        assert t5["feed_forward_proj"] == "gated-gelu" and t5["is_gated_act"]
        assert (t5["relative_attention_num_buckets"], t5["relative_attention_max_distance"]) == (32, 128)
        assert t5["vocab_size"] == len(t5_tok)

        vae = json.loads((path / "vae/config.json").read_text())
        assert vae["_class_name"] == "AutoencoderKL"
        assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4
        assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
        assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False

        sch = json.loads((path / "scheduler/scheduler_config.json").read_text())
        assert sch["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        expect = {"schnell": (1.0, False), "dev": (3.0, True)}[flux_type]
        assert (sch["shift"], sch["use_dynamic_shifting"]) == expect
        assert (sch["base_image_seq_len"], sch["max_image_seq_len"], sch["base_shift"], sch["max_shift"]) == (256, 4096, 0.5, 1.15)
        assert sch["num_train_timesteps"] == 1000
        print(f"{flux_type}: {folder_size(path) / 1e6:.1f} MB on disk")


def test_tiny_vae_is_taef1_layout(tiny_schnell: Path) -> None:
    import torch
    from diffusers import AutoencoderTiny

    tv = AutoencoderTiny.from_pretrained(str(tiny_schnell / "tiny_vae"), local_files_only=True)
    cfg = tv.config
    assert cfg.latent_channels == 16
    assert tuple(cfg.num_encoder_blocks) == (1, 3, 3, 3) and tuple(cfg.num_decoder_blocks) == (3, 3, 3, 1)
    assert (cfg.latent_magnitude, cfg.latent_shift, cfg.act_fn) == (3, 0.5, "relu")
    lat = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = tv.decode(lat).sample
        img2 = tv.decode(-lat).sample
        enc = tv.encode(img.clamp(-1, 1)).latents
    assert img.shape == (1, 3, 128, 128) and enc.shape == (1, 16, 16, 16)
    assert 0.05 < img.std().item() < 3
    assert float((img.abs() > 1).float().mean()) < 0.3
    assert (img - img2).abs().mean().item() > 1e-2
    assert enc.std().item() > 1e-3


# ------------------------------------------------------------------------- tokenizers
def test_tokenizers_round_trip(tiny_schnell: Path) -> None:
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(str(tiny_schnell / "tokenizer"))
    t5 = T5TokenizerFast.from_pretrained(str(tiny_schnell / "tokenizer_2"))
    assert type(AutoTokenizer.from_pretrained(str(tiny_schnell / "tokenizer"))).__name__ == "CLIPTokenizer"
    assert type(AutoTokenizer.from_pretrained(str(tiny_schnell / "tokenizer_2"))).__name__ == "T5Tokenizer"
    assert clip.model_max_length == 77 and t5.model_max_length == 512
    assert len(clip) > 500 and len(t5) > 300

    texts = [TINY_PROMPT, "Hello, World! A red car, 1234 cafés; it's late."]
    for text in texts:
        ids = clip(text)["input_ids"]
        assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
        assert len(ids) - 2 >= 8
        # CLIP lower-cases and splits punctuation off words: compare without spaces
        assert clip.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
        ids5 = t5(text)["input_ids"]
        assert ids5[-1] == t5.eos_token_id and t5.unk_token_id not in ids5
        assert len(ids5) - 1 >= 8
        assert t5.decode(ids5, skip_special_tokens=True) == text
    # CLIP: the exact round trip on the plain prompt, and the pipeline's padded form pools
    # at the first EOS both ways transformers picks it (argmax of ids, or first eos id).
    assert clip.decode(clip(TINY_PROMPT)["input_ids"], skip_special_tokens=True) == TINY_PROMPT
    padded = clip(TINY_PROMPT, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(padded) == 77
    n_words = len(clip(TINY_PROMPT)["input_ids"]) - 1
    assert int(np.argmax(padded)) == n_words == padded.index(clip.eos_token_id)
    padded5 = t5(TINY_PROMPT, padding="max_length", max_length=512, truncation=True)["input_ids"]
    assert len(padded5) == 512 and padded5[-1] == t5.pad_token_id == 0


# ------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_and_shared_encoders(tmp_path: Path, tiny_schnell: Path, tiny_dev: Path) -> None:
    t0 = time.time()
    again = build_tiny(tmp_path / "again", "schnell", seed=0)
    print(f"build (schnell, default sizes): {time.time() - t0:.1f} s")
    a, b = _files(tiny_schnell), _files(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], f"{k} differs between two builds with seed 0"

    dev = _files(tiny_dev)
    for k in a:
        if k.split("/")[0] in ("text_encoder", "text_encoder_2", "vae", "tiny_vae", "tokenizer", "tokenizer_2"):
            assert a[k] == dev[k], f"{k} differs between dev and schnell with the same seed"
    assert a["transformer/diffusion_pytorch_model.safetensors"] != dev["transformer/diffusion_pytorch_model.safetensors"]

    other = build_tiny(tmp_path / "seed1", "schnell", seed=1)
    c = _files(other)
    for k in a:
        if k.endswith(".safetensors"):
            assert a[k] != c[k], f"{k} does not depend on the seed"


# ------------------------------------------------------------------------- overrides
def test_overrides_bigger_bf16(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    out = build_tiny(
        tmp_path / "big",
        "dev",
        seed=3,
        transformer={"num_layers": 1, "num_single_layers": 2, "num_attention_heads": 3,
                     "attention_head_dim": 128, "joint_attention_dim": 256, "pooled_projection_dim": 192},
        t5={"num_layers": 1},
        dtype="bfloat16",
    )
    tr = json.loads((out / "transformer/config.json").read_text())
    assert list(tr["axes_dims_rope"]) == [16, 56, 56]
    assert json.loads((out / "text_encoder_2/config.json").read_text())["d_model"] == 256
    assert json.loads((out / "text_encoder/config.json").read_text())["hidden_size"] == 192
    with safe_open(str(out / "transformer/diffusion_pytorch_model.safetensors"), "pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}
    pipe = load_tiny_pipeline(out)
    _check_image(_generate(pipe, TINY_PROMPT, dev=True, size=64), size=64)

    with pytest.raises(FluxcError, match="override"):
        build_tiny(tmp_path / "bad", "schnell", unet={"x": 1})
    with pytest.raises(FluxcError, match="inconsistent"):
        build_tiny(tmp_path / "bad", "schnell", transformer={"joint_attention_dim": 256}, t5={"d_model": 512})
    with pytest.raises(FluxcError, match="dtype"):
        build_tiny(tmp_path / "bad", "schnell", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def progress(msg: str) -> None:
        if msg.startswith("transformer"):
            raise Stop

    with pytest.raises(Stop):
        build_tiny(tmp_path / "m", "schnell", progress=progress)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- CLI
def test_cli_refuses_non_empty_and_unknown_type(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fluxc.cli import main

    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["tiny", str(out), "--flux-type", "schnell"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"

    r = subprocess.run([str(FLUXC), "tiny", str(tmp_path / "x"), "--flux-type", "pro"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown flux type" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()

    # --force replaces the folder with a complete model
    with pytest.raises(SystemExit) as e:
        main(["tiny", str(out), "--flux-type", "schnell", "--force", "--seed", "2"])
    assert e.value.code in (0, None)
    assert not (out / "keep.txt").exists() and is_tiny_model(out)
    assert json.loads((out / "fluxc_tiny.json").read_text())["seed"] == 2


# ------------------------------------------------------------------------- the full preset
# The published FLUX.1 configs (transformer/, text_encoder/, text_encoder_2/, vae/ config.json of
# black-forest-labs/FLUX.1-dev and -schnell), written out here independently of fluxc/tiny.py.
PUBLISHED = {
    "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]},
    "text_encoder": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
                     "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
                     "pad_token_id": 1},
    "text_encoder_2": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240,
                       "num_layers": 24, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
                       "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6},
    "vae": {"latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "norm_num_groups": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False},
}
# Parameter counts of the published models (transformer 11.9B, T5-XXL encoder 4.76B, CLIP-L text 123M).
PUBLISHED_PARAMS = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
                    "vae": 83_819_683}


def test_full_preset_writes_the_published_configs_and_layout(tmp_path: Path, monkeypatch) -> None:
    """`fluxc tiny --preset full` end to end except the weight bytes (33 GB): the tensor list of
    every file is generated for real, only the random draws are skipped (header + sparse file)."""
    import torch
    from safetensors import safe_open

    import fluxc.tiny as tiny_mod
    from fluxc.cli import main

    def write_header_only(self, make, tick=None, done=0, total=None):
        with open(self.path, "wb") as f:
            f.write(len(self.header).to_bytes(8, "little"))
            f.write(self.header)
            f.truncate(8 + len(self.header) + self.total)  # sparse: no disk blocks
        return 8 + len(self.header) + self.total

    monkeypatch.setattr(tiny_mod._SafetensorsWriter, "write", write_header_only)
    for flux_type in ("dev", "schnell"):
        out = tmp_path / flux_type
        with pytest.raises(SystemExit) as e:
            main(["tiny", str(out), "--preset", "full", "--flux-type", flux_type])
        assert e.value.code in (0, None)
        for comp, want in PUBLISHED.items():
            cfg = json.loads((out / comp / "config.json").read_text())
            assert {k: cfg[k] for k in want} == want, comp
            assert cfg.get("dtype", cfg.get("torch_dtype", "bfloat16")) == "bfloat16"
        tr = json.loads((out / "transformer" / "config.json").read_text())
        assert tr["guidance_embeds"] is (flux_type == "dev")
        # the Hub's file names, and the tensor counts behind them
        for comp, stem, n in (("transformer", "diffusion_pytorch_model", 3), ("text_encoder_2", "model", 2)):
            names = sorted(p.name for p in (out / comp).glob("*.safetensors"))
            assert names == [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
            idx = json.loads((out / comp / f"{stem}.safetensors.index.json").read_text())
            assert sorted(set(idx["weight_map"].values())) == names
        counts = {}
        for comp in PUBLISHED_PARAMS:
            total = 0
            for f in (out / comp).glob("*.safetensors"):
                with safe_open(str(f), "pt") as sf:
                    for k in sf.keys():
                        sl = sf.get_slice(k)
                        assert sl.get_dtype() == "BF16"
                        total += int(torch.tensor(sl.get_shape()).prod()) if sl.get_shape() else 1
            counts[comp] = total
        want_params = dict(PUBLISHED_PARAMS)
        if flux_type == "schnell":
            want_params["transformer"] -= 3072 * 256 + 3072 + 3072 * 3072 + 3072  # no guidance embedder
        assert counts == want_params
        for tok, n in (("tokenizer", 77), ("tokenizer_2", 512)):
            assert json.loads((out / tok / "tokenizer_config.json").read_text())["model_max_length"] == n
