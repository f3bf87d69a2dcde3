"""fluxc export --lora: LoRAs fused into the weights at export time (fluxc/export/lora.py).

The LoRAs are made with peft on the tiny model's own modules (random, non-zero lora_B so the
update is real), saved by diffusers' FluxPipeline.save_lora_weights. The reference image is
diffusers' FluxPipeline with the same files loaded and fused by diffusers/peft:
- transformer: FluxTransformer2DModel.load_lora_adapter + set_adapters + fuse_lora (diffusers);
- CLIP text encoder: peft's inject_adapter_in_model + set_peft_model_state_dict + merge.
  (FluxPipeline.load_lora_weights would route the text-encoder part through transformers'
  load_adapter, which in transformers 5.24 refuses peft < 0.22, and 0.21.2 is the newest peft
  on the package index here; so the text-encoder part goes through peft directly.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_export import EXPORT_HEIGHT, EXPORT_T5_LEN, EXPORT_WIDTH
from tests.fixtures_runtime import (RUNTIME_GUIDANCE, RUNTIME_PROMPT, RUNTIME_SEED, RUNTIME_STEPS, cli_main,
                                    invoke)

# LoRA 1: rank 4, alpha 8 (in the file's adapter metadata), transformer attention, MLP,
# single-block proj_out (split by the single-block piece), x_embedder (head) and CLIP layers.
LORA1 = dict(rank=4, alpha=8, seed=1, scale=0.8,
             targets=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_mlp", "proj_out", "x_embedder",
                      "ff.net.2"],
             te_targets=["q_proj", "v_proj", "fc1"])
# LoRA 2: rank 8, no metadata (diffusers then takes alpha = rank), other transformer layers only.
LORA2 = dict(rank=8, alpha=None, seed=2, scale=0.5,
             targets=["add_q_proj", "to_add_out", "ff.net.0.proj", "ff_context.net.2", "context_embedder"],
             te_targets=None)


def make_lora(model: Path, out: Path, *, rank: int, alpha: int | None, seed: int, targets: list[str],
              te_targets: list[str] | None, gain: float = 1.0, **_) -> Path:
    """A random LoRA for the tiny model, saved in diffusers format (FluxPipeline.save_lora_weights)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel.from_pretrained(str(model / "transformer"))
    tcfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=False, target_modules=targets)
    inject_adapter_in_model(tcfg, tr)
    tsd = {k: v * gain if "lora_B" in k else v for k, v in get_peft_model_state_dict(tr).items()}
    kw: dict = {"transformer_lora_layers": tsd}
    if alpha is not None:
        kw["transformer_lora_adapter_metadata"] = tcfg.to_dict()
    if te_targets:
        te = CLIPTextModel.from_pretrained(str(model / "text_encoder"))
        ecfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=False, target_modules=te_targets)
        inject_adapter_in_model(ecfg, te)
        kw["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
        if alpha is not None:
            kw["text_encoder_lora_adapter_metadata"] = ecfg.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(out), weight_name="lora.safetensors", **kw)
    return out / "lora.safetensors"


def _peft_text_encoder(te, file: Path, scale: float, adapter: str) -> bool:
    """Merge the file's text_encoder LoRA into `te` with peft itself. True if there was one."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = {k[len("text_encoder."):]: v for k, v in load_file(str(file)).items() if k.startswith("text_encoder.")}
    if not sd:
        return False
    with safe_open(str(file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    cfg = {k[len("text_encoder."):]: v for k, v in meta.items() if k.startswith("text_encoder.")}
    inject_adapter_in_model(LoraConfig(**cfg), te, adapter_name=adapter)
    set_peft_model_state_dict(te, sd, adapter_name=adapter)
    for m in te.modules():
        if isinstance(m, LoraLayer):
            m.set_scale(adapter, scale)
            m.merge(adapter_names=[adapter])
    return True


def diffusers_lora_image(model: Path, loras: list[tuple[Path, float]], height: int, width: int, t5_len: int):
    import torch
    from diffusers import AutoencoderTiny, FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(model), local_files_only=True,
                                        vae=AutoencoderTiny.from_pretrained(str(model / "tiny_vae"))).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    te_q = pipe.text_encoder.encoder.layers[0].self_attn.q_proj
    te_before = te_q.weight.detach().clone()
    names, weights, te_loras = [], [], 0
    for i, (f, s) in enumerate(loras):
        pipe.transformer.load_lora_adapter(str(f.parent), weight_name=f.name, prefix="transformer",
                                           adapter_name=f"l{i}")
        names.append(f"l{i}")
        weights.append(s)
        te_loras += _peft_text_encoder(pipe.text_encoder, f, s, f"l{i}")
    pipe.transformer.set_adapters(names, weights=weights)
    pipe.transformer.fuse_lora(adapter_names=names)
    te_q = pipe.text_encoder.encoder.layers[0].self_attn.q_proj
    te_changed = float((te_q.weight.detach() - te_before).abs().max()) if hasattr(te_q, "weight") else \
        float((te_q.base_layer.weight.detach() - te_before).abs().max())
    with torch.no_grad():
        img = pipe(RUNTIME_PROMPT, generator=torch.Generator("cpu").manual_seed(RUNTIME_SEED), height=height,
                   width=width, num_inference_steps=RUNTIME_STEPS, guidance_scale=RUNTIME_GUIDANCE,
                   max_sequence_length=t5_len, output_type="pil").images[0]
    return np.array(img), te_loras, te_changed


def _export(model: Path, out: Path, loras) -> "object":
    from fluxc.export.driver import ExportOptions, run_export

    return run_export(ExportOptions(model=str(model), out=out, height=EXPORT_HEIGHT, width=EXPORT_WIDTH,
                                    t5_len=EXPORT_T5_LEN, tiny_vae=str(model / "tiny_vae"), loras=loras),
                      show_progress=False)


def _run_onnx(ws: Path, out: Path):
    from PIL import Image

    r = invoke(["run", "--models", str(ws), "--backend", "onnx", "--prompt", RUNTIME_PROMPT, "--seed",
                str(RUNTIME_SEED), "--steps", str(RUNTIME_STEPS), "--guidance", str(RUNTIME_GUIDANCE),
                "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    return np.array(Image.open(out).convert("RGB")), r.output


@pytest.fixture(scope="module")
def lora_files(tiny_schnell, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [(make_lora(Path(tiny_schnell), root / "l1", **LORA1), LORA1["scale"]),
            (make_lora(Path(tiny_schnell), root / "l2", **LORA2), LORA2["scale"])]


@pytest.fixture(scope="module")
def lora_export(tiny_schnell, lora_files, tmp_path_factory):
    from fluxc.export.lora import LoraArg

    ws = tmp_path_factory.mktemp("ws_lora")
    res = _export(Path(tiny_schnell), ws / "onnx", [LoraArg(f, s) for f, s in lora_files])
    return ws, res


def test_lora_export_matches_diffusers_fused(tiny_schnell, lora_files, lora_export, onnx_run, tmp_path,
                                             record_property):
    from fluxc.metrics import psnr

    ws, _ = lora_export
    ours, output = _run_onnx(ws, tmp_path / "lora.png")
    ref, te_loras, te_changed = diffusers_lora_image(Path(tiny_schnell), lora_files, EXPORT_HEIGHT, EXPORT_WIDTH,
                                                     EXPORT_T5_LEN)
    plain = onnx_run("schnell")["image"]  # the same export without any LoRA
    p_ref, p_plain = psnr(ours, ref), psnr(ours, plain)
    record_property("psnr_vs_diffusers_db", p_ref)
    record_property("psnr_vs_no_lora_db", p_plain)
    print(f"\n[measure] tiny schnell, 2 stacked LoRAs, {RUNTIME_STEPS} steps: onnx vs diffusers fused "
          f"PSNR {p_ref:.2f} dB; vs the export without LoRA {p_plain:.2f} dB")
    assert te_loras == 1 and te_changed > 1e-3, "the reference did not merge the CLIP LoRA"
    assert ref.std() > 1.0
    assert p_ref >= 40.0
    assert p_plain < 25.0, "the LoRA barely changes the image: the comparison would prove little"
    assert "LoRA fused at export: lora.safetensors x0.8" in output and "x0.5" in output


def test_lora_content_key_manifest_and_reuse(tiny_schnell, lora_files, lora_export, export_schnell_tinyvae):
    from fluxc.export.lora import LoraArg
    from fluxc.fsutil import sha256_file

    ws, first = lora_export
    man = json.loads((ws / "onnx" / "manifest.json").read_text())
    recs = man["options"]["lora"]
    assert [r["sha256"] for r in recs] == [sha256_file(f) for f, _ in lora_files]
    assert [r["scale"] for r in recs] == [0.8, 0.5]
    assert recs[0]["modules"]["text_encoder"] == 6 and "text_encoder" not in recs[1]["modules"]
    # the fused tensors live in one file per touched component, referenced by the touched pieces
    for comp in ("transformer", "text_encoder"):
        fused = list((ws / "onnx" / "weights" / comp).glob("lora-fused-*.safetensors"))
        assert len(fused) == 1, (comp, fused)
        users = [e["name"] for e in man["pieces"] if f"weights/{comp}/{fused[0].name}" in e.get("weight_files", [])]
        assert users, comp
    plain = {e["name"]: e["key"] for e in json.loads((export_schnell_tinyvae / "manifest.json").read_text())["pieces"]}
    keys = {e["name"]: e["key"] for e in man["pieces"]}
    changed = {n for n in keys if keys[n] != plain[n]}
    # exactly the pieces the LoRAs touch get new keys: CLIP blocks and every transformer piece
    assert changed == {n for n in keys if n.startswith(("clip_block", "schnell_"))}
    assert not any(n.startswith(("t5", "tiny_vae", "clip_head", "clip_tail")) for n in changed)
    # same inputs: nothing re-exported; another scale: only the touched pieces re-export
    again = _export(Path(tiny_schnell), ws / "onnx", [LoraArg(f, s) for f, s in lora_files])
    assert again.exported == [] and len(again.reused) == len(keys)
    other = ws.parent / (ws.name + "_scale")
    shutil.copytree(ws / "onnx", other / "onnx")
    res = _export(Path(tiny_schnell), other / "onnx", [LoraArg(lora_files[0][0], 0.3)])
    assert set(res.exported) == {n for n in keys if n.startswith("clip_block")} | {
        n for n in keys if n.startswith("schnell_")}
    shutil.rmtree(other)


# ------------------------------------------------------------------------ bad inputs (one line, exit 2)

def _one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_lora_scale_not_a_number(tiny_schnell, tmp_path):
    r = cli_main(["export", str(tiny_schnell), "--out", str(tmp_path / "o"), "--lora", "style.safetensors:strong"])
    _one_line_error(r, "not a number", "FILE:SCALE")
    assert not (tmp_path / "o").exists()


def test_lora_not_safetensors(tiny_schnell, tmp_path):
    import torch

    bad = tmp_path / "lora.bin"
    torch.save({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64)}, bad)
    r = cli_main(["export", str(tiny_schnell), "--out", str(tmp_path / "o"), "--lora", f"{bad}:0.5",
                  "--height", "64", "--width", "64", "--t5-seq-len", "16"])
    _one_line_error(r, "not a safetensors file")
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("case", ["shape", "layer"])
def test_lora_for_another_model(tiny_schnell, tmp_path, case):
    import torch
    from safetensors.torch import save_file

    name = "transformer_blocks.0.attn.to_q" if case == "shape" else "transformer_blocks.9.attn.to_q"
    width = 96 if case == "shape" else 128  # the tiny transformer is 128 wide with 3 double blocks
    f = tmp_path / "other.safetensors"
    save_file({f"transformer.{name}.lora_A.weight": torch.randn(4, width),
               f"transformer.{name}.lora_B.weight": torch.randn(width, 4)}, str(f))
    r = cli_main(["export", str(tiny_schnell), "--out", str(tmp_path / "o"), "--lora", str(f),
                  "--height", "64", "--width", "64", "--t5-seq-len", "16"])
    _one_line_error(r, "made for another model", name)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_parse_lora_arg(tmp_path):
    from fluxc.errors import FluxcError
    from fluxc.export.lora import parse_lora_arg

    assert parse_lora_arg("a.safetensors").scale == 1.0
    assert parse_lora_arg("dir/a.safetensors:0.75").scale == 0.75
    assert parse_lora_arg("a.safetensors:-1e-1").scale == -0.1
    odd = tmp_path / "x:1.5"  # a file whose name ends like a scale is taken as a file
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) .scale == 1.0
    for bad in ("a.safetensors:", "a.safetensors:nan", "a.safetensors:0.5x"):
        with pytest.raises(FluxcError):
            parse_lora_arg(bad)
