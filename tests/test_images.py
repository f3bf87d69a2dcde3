"""Images in (issue 19): the VAE encoder piece and img2img, against diffusers on an input image
made here.

The session exports (tests/fixtures_export.py) carry the encoder (`--image-input`): the tiny
schnell export taef1's, the tiny dev export AutoencoderKL's; the compiled builds hold it as
tiny_vae_encoder_bf16.bmodel / vae_encoder_bf16.bmodel. `fluxc verify` checks the encoder and an
img2img run of those builds (tests/test_verify.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fluxc.export.manifest import load_manifest
from fluxc.metrics import cosine, psnr
from tests.fixtures_runtime import RUNTIME_PROMPT, cli_main, invoke

SEED = 7
STRENGTH = 0.6
STEPS = {"schnell": 4, "dev": 3}  # schnell at 0.6: 2 of 4 steps run; dev: 1 of 3 trimmed (int(3 - 1.8))
EXPORT = {"schnell": "export_schnell_tinyvae", "dev": "export_dev"}


def make_input_image(path: Path, width: int = 200, height: int = 120) -> Path:
    """A landscape RGB PNG of another size than the builds' (so the resize is exercised):
    colour ramps, a bright square and a little seeded noise."""
    from PIL import Image

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([200 * x / width + 20, 180 * (1 - y / height) + 30, 90 + 60 * np.sin(x / 9.0)], -1)
    img[height // 4:height // 2, width // 3:width // 2] = (250, 240, 40)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).round().astype(np.uint8)
    Image.fromarray(img, "RGB").save(path)
    return path


@pytest.fixture(scope="session")
def input_png(tmp_path_factory) -> Path:
    return make_input_image(tmp_path_factory.mktemp("images_in") / "in.png")


def _diffusers_img2img(flux_type: str, request, image_path: Path) -> dict:
    import torch
    from diffusers import AutoencoderTiny, FluxImg2ImgPipeline
    from diffusers.utils import load_image

    model = Path(request.getfixturevalue(f"tiny_{flux_type}"))
    d = load_manifest(request.getfixturevalue(EXPORT[flux_type])).dims
    kw = {"vae": AutoencoderTiny.from_pretrained(str(model / "tiny_vae"))} if d.tiny_vae else {}
    pipe = FluxImg2ImgPipeline.from_pretrained(str(model), local_files_only=True, **kw).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    common = dict(image=load_image(str(image_path)), strength=STRENGTH, height=d.height, width=d.width,
                  num_inference_steps=STEPS[flux_type], guidance_scale=3.5, max_sequence_length=d.t5_len)
    with torch.no_grad():
        lat = pipe(RUNTIME_PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
                   **common).images
        img = pipe(RUNTIME_PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **common).images[0]
    return {"latents": lat.numpy(), "image": np.array(img)}


def _fluxc_run(ws: Path, backend: str, image_path: Path, out: Path, steps: int, extra=()) -> dict:
    from PIL import Image

    r = invoke(["run", "--models", str(ws), "--backend", backend, "--prompt", RUNTIME_PROMPT, "--seed", str(SEED),
                "--steps", str(steps), "--image", str(image_path), "--strength", str(STRENGTH),
                "--out", str(out / "result.png"), "--save-latents", str(out / "latents.npy"), *extra])
    assert r.exit_code == 0, (r.output, r.exception)
    return {"image": np.array(Image.open(out / "result.png").convert("RGB")), "latents": np.load(out / "latents.npy"),
            "output": r.output}


@pytest.mark.parametrize("flux_type", ["schnell", "dev"])
def test_onnx_img2img_equals_diffusers(flux_type, request, input_png, tmp_path):
    """`fluxc run --image --strength` on the exported pieces == diffusers' FluxImg2ImgPipeline
    (schnell: taef1 encoder, no draw from the latent distribution; dev: AutoencoderKL, the
    distribution sampled with the generator's first draw, the noise its second)."""
    ws = Path(request.getfixturevalue(f"onnx_workspace_{flux_type}"))
    got = _fluxc_run(ws, "onnx", input_png, tmp_path, STEPS[flux_type])
    ref = _diffusers_img2img(flux_type, request, input_png)
    p = psnr(ref["image"], got["image"])
    print(f"[measure] {flux_type} onnx img2img vs diffusers FluxImg2ImgPipeline: PSNR {p:.2f} dB, latent max abs "
          f"err {np.abs(ref['latents'] - got['latents']).max():.3g}")
    assert p >= 40.0
    np.testing.assert_allclose(got["latents"], ref["latents"], atol=1e-3, rtol=1e-3)
    assert f"strength {STRENGTH}" in got["output"]
    # the image matters: the same seed without it (text to image) is another image
    t2i = request.getfixturevalue("onnx_run")(flux_type)["image"]
    assert psnr(t2i, got["image"]) < 30.0


def test_encoder_piece_is_diffusers_vae_encode(export_dev, export_schnell_tinyvae):
    """Each exported encoder (ONNX) against diffusers' own `vae.encode` on the original weights,
    unpatched (AutoencoderKL: the latent distribution's parameters; taef1: its latents); and the
    Downsample2D export patch leaves AutoencoderKL's encoder bit-identical."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from fluxc.patches import Patcher
    from fluxc.runtime.image_input import preprocess
    from fluxc.validation.verify import verify_image
    from tests.parity import run_onnx

    for export in (export_dev, export_schnell_tinyvae):
        m = load_manifest(export)
        d = m.dims
        spec = next(s for s in m.specs if s.family == "vae_encoder")
        x = preprocess(verify_image(d.width, d.height), d.height, d.width)
        src = Path(m.source["path"])
        if d.tiny_vae:
            vae = AutoencoderTiny.from_pretrained(str(src / "tiny_vae")).eval()
            with torch.no_grad():
                ref = vae.encode(torch.from_numpy(x)).latents.numpy()
        else:
            vae = AutoencoderKL.from_pretrained(str(src / "vae")).eval()
            with torch.no_grad():
                ref = vae.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
                with Patcher() as p:
                    assert len(p.apply(vae.encoder, ("downsample",)).applied) == len(vae.encoder.down_blocks) - 1
                    patched = vae.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
            np.testing.assert_array_equal(patched, ref)
        (got,) = run_onnx(m.path(spec.name), spec, {"image": x})
        print(f"{spec.name}: cos {cosine(ref, got):.8f}, max abs err {np.abs(ref - got).max():.3g}")
        assert got.shape == ref.shape == spec.outputs[0].shape
        assert cosine(ref, got) >= 0.99999 and np.abs(ref - got).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_compiled_img2img_cmodel_and_sail_sim(bmodel_run, onnx_workspace_schnell, input_png, tmp_path):
    """The compiled W4BF16 build (tiny_vae_encoder_bf16.bmodel) runs img2img on the chip
    simulator and on the sail runtime's stand-in: images, the same from both, near the float run."""
    # the seed last: bmodel_run passes RUNTIME_SEED first, and the last --seed counts
    extra = ("--image", str(input_png), "--strength", str(STRENGTH), "--steps", str(STEPS["schnell"]),
             "--seed", str(SEED))
    cm = bmodel_run("cmodel", "W4BF16", extra)
    ss = bmodel_run("sail-sim", "W4BF16", extra)
    ws = Path(cm["ws"])
    assert (ws / "BM1684X" / "tiny_vae_encoder_bf16.bmodel").is_file()
    np.testing.assert_array_equal(ss["image"], cm["image"])
    np.testing.assert_array_equal(ss["latents"], cm["latents"])
    fl = _fluxc_run(onnx_workspace_schnell, "onnx", input_png, tmp_path, STEPS["schnell"])
    p, c = psnr(fl["image"], cm["image"]), cosine(fl["latents"], cm["latents"])
    print(f"[measure] W4BF16 cmodel img2img vs onnx: PSNR {p:.2f} dB, latent cosine {c:.5f}")
    assert c > 0.9 and p > 15.0
    assert cm["image"].std() > 5.0  # an image, not a flat field
    assert "image encode" in " ".join(cm["output"].split())  # the timing line names the encoder


def _err(r) -> str:
    """The error line of a failed command (asserting there is one, with no traceback)."""
    text = r.stderr or ""
    assert "Traceback" not in text, text[-2000:]
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, text[-2000:]
    return lines[0]


def test_image_input_bad_inputs(onnx_workspace_schnell, tmp_path, tiny_schnell):
    """One-line errors, exit 2, nothing written."""
    from PIL import Image

    ws = str(onnx_workspace_schnell)
    out = tmp_path / "o.png"
    good = make_input_image(tmp_path / "in.png", 64, 48)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    big = tmp_path / "big.png"
    Image.new("RGB", (4097, 8)).save(big)
    base = ["run", "--models", ws, "--backend", "onnx", "--steps", "1", "--out", str(out)]
    cases = [
        (["--image", str(tmp_path / "missing.png")], "no such file"),
        (["--image", str(text)], "not an image"),
        (["--image", str(big)], "over 4096x4096"),
        (["--image", str(good), "--strength", "0"], "outside (0, 1]"),
        (["--image", str(good), "--strength", "1.5"], "outside (0, 1]"),
        (["--strength", "0.5"], "give --image"),
    ]
    for args, want in cases:
        r = cli_main(base + args)
        err = _err(r)
        assert r.returncode == 2 and want in err, (args, r.returncode, err)
        assert not out.exists()

    # a build without the encoder: re-export with --image-input
    from fluxc.export.driver import ExportOptions, run_export
    from tests.fixtures_export import EXPORT_HEIGHT, EXPORT_T5_LEN, EXPORT_WIDTH

    plain = tmp_path / "plain"
    (plain / "onnx").parent.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copytree(Path(onnx_workspace_schnell) / "onnx", plain / "onnx", symlinks=False)
    run_export(ExportOptions(model=str(tiny_schnell), out=plain / "onnx", height=EXPORT_HEIGHT, width=EXPORT_WIDTH,
                             t5_len=EXPORT_T5_LEN, tiny_vae=str(Path(tiny_schnell) / "tiny_vae")),
               show_progress=False)
    assert not any(s.family == "vae_encoder" for s in load_manifest(plain / "onnx").specs)
    r = cli_main(["run", "--models", str(plain), "--backend", "onnx", "--steps", "1", "--out", str(out),
                  "--image", str(good)])
    err = _err(r)
    assert r.returncode == 2 and "--image-input" in err, err
    assert not out.exists()


# ---------------------------------------------------------------- FLUX.1 Kontext
# A tiny Kontext pipeline (dev's tiny sizes, one double and one single block: the text encoders
# are the session's, so their compiled pieces are reused), 64x64 output, a 96x64 (WxH) reference.
KONTEXT_HW, KONTEXT_REF = (64, 64), (64, 96)  # (height, width)
KONTEXT_STEPS, KONTEXT_GUIDANCE = 3, 2.5
KONTEXT_PROMPT = "make it winter"


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory) -> Path:
    from tests.fixtures_tiny import make_tiny

    return make_tiny(tmp_path_factory, "kontext", "kontext", seed=0,
                     transformer={"num_layers": 1, "num_single_layers": 1})


@pytest.fixture(scope="session")
def kontext_ws(tiny_kontext, tmp_path_factory) -> Path:
    """A workspace with the tiny Kontext export (`fluxc export` through the CLI)."""
    ws = tmp_path_factory.mktemp("ws_kontext")
    h, w = KONTEXT_HW
    r = invoke(["export", str(tiny_kontext), "--out", str(ws / "onnx"), "--height", str(h), "--width", str(w),
                "--t5-seq-len", "32", "--reference-size", f"{KONTEXT_REF[1]}x{KONTEXT_REF[0]}"])
    assert r.exit_code == 0, (r.output, r.exception)
    return ws


@pytest.fixture(scope="session")
def kontext_compiled(kontext_ws, compile_build_dir) -> Path:
    from tests.fixtures_compile import compile_into

    compile_into(kontext_ws, compile_build_dir, ["--quantize", "W4BF16", "--flux-type", "kontext", "--num-devices", "1"])
    return kontext_ws


def _kontext_run(ws: Path, backend: str, image_path: Path, out: Path) -> dict:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    r = invoke(["run", "--models", str(ws), "--backend", backend, "--prompt", KONTEXT_PROMPT, "--seed", str(SEED),
                "--steps", str(KONTEXT_STEPS), "--guidance", str(KONTEXT_GUIDANCE), "--image", str(image_path),
                "--out", str(out / "result.png"), "--save-latents", str(out / "latents.npy")])
    assert r.exit_code == 0, (r.output, r.exception)
    return {"image": np.array(Image.open(out / "result.png").convert("RGB")), "latents": np.load(out / "latents.npy"),
            "output": r.output}


def test_kontext_export_and_onnx_equal_diffusers(tiny_kontext, kontext_ws, input_png, tmp_path):
    """Export detects Kontext from model_index.json; the transformer pieces take image + reference
    + text tokens, the rotary table holds the reference's ids (first axis 1); `fluxc run --image`
    on the ONNX pieces == diffusers' FluxKontextPipeline with max_area at the build's area (else
    it changes the output size: the trap) and the reference resized by its own image processor."""
    import torch
    from diffusers import FluxKontextPipeline
    from diffusers.utils import load_image

    from fluxc.patches.rotary import flux_ids, rotary_table_from_ids

    man = load_manifest(kontext_ws / "onnx")
    d = man.dims
    assert d.flux_type == "kontext" and (d.ref_height, d.ref_width) == KONTEXT_REF
    assert man.options["reference_size"] == f"{KONTEXT_REF[1]}x{KONTEXT_REF[0]}"
    n, r = (KONTEXT_HW[0] // 16) * (KONTEXT_HW[1] // 16), (KONTEXT_REF[0] // 16) * (KONTEXT_REF[1] // 16)
    assert (d.image_tokens, d.ref_tokens) == (n, r)
    head = man.spec("kontext_head")
    assert head.inputs[0].shape == (1, n + r, d.in_channels)
    assert man.spec("kontext_tail").outputs[0].shape == (1, n + r, d.out_channels)
    assert man.spec("vae_encoder").inputs[0].shape == (1, 3, *KONTEXT_REF)
    # the reference's rotary ids: FluxPipeline's image ids at the reference's grid, first axis 1
    ref_ids = flux_ids(0, KONTEXT_REF[0] // 16, KONTEXT_REF[1] // 16)
    ref_ids[:, 0] = 1
    cfg = __import__("json").loads((Path(tiny_kontext) / "transformer" / "config.json").read_text())
    want = rotary_table_from_ids(np.concatenate([flux_ids(d.t5_len, KONTEXT_HW[0] // 16, KONTEXT_HW[1] // 16),
                                                 ref_ids]), cfg["axes_dims_rope"])
    np.testing.assert_array_equal(np.load(man.rotary_path), want)

    got = _kontext_run(kontext_ws, "onnx", input_png, tmp_path / "onnx")
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_kontext), local_files_only=True).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    h, w = KONTEXT_HW
    ref_img = pipe.image_processor.resize(load_image(str(input_png)), *KONTEXT_REF)
    kw = dict(image=ref_img, height=h, width=w, num_inference_steps=KONTEXT_STEPS, guidance_scale=KONTEXT_GUIDANCE,
              max_sequence_length=d.t5_len, max_area=h * w, _auto_resize=False)
    with torch.no_grad():
        lat = pipe(prompt=KONTEXT_PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
                   **kw).images.numpy()
        ref = np.array(pipe(prompt=KONTEXT_PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0])
    p = psnr(ref, got["image"])
    print(f"[measure] kontext onnx vs diffusers FluxKontextPipeline: PSNR {p:.2f} dB, latent max abs err "
          f"{np.abs(lat - got['latents']).max():.3g}")
    assert got["latents"].shape == (1, n, d.in_channels)  # only the image part is kept
    assert p >= 40.0
    np.testing.assert_allclose(got["latents"], lat, atol=1e-3, rtol=1e-3)


def test_kontext_compiled_cmodel_and_sail_sim(kontext_compiled, input_png, tmp_path):
    """The compiled tiny Kontext build (W4BF16, one chip, vae_encoder_bf16.bmodel) edits the image
    on the chip simulator and on the sail stand-in: images, the same from both, near the float run."""
    ws = kontext_compiled
    rec = __import__("json").loads((ws / "BM1684X" / "fluxc_build.json").read_text())
    assert {f["file"] for f in rec["files"]} >= {"kontext_w4bf16_transformer.bmodel", "vae_encoder_bf16.bmodel"}
    cm = _kontext_run(ws, "cmodel", input_png, tmp_path / "cmodel")
    from fluxc.runtime import sail_sim

    sail_sim.reset()
    ss = _kontext_run(ws, "sail-sim", input_png, tmp_path / "sail")
    np.testing.assert_array_equal(ss["image"], cm["image"])
    fl = _kontext_run(ws, "onnx", input_png, tmp_path / "onnx")
    c, p = cosine(fl["latents"], cm["latents"]), psnr(fl["image"], cm["image"])
    print(f"[measure] kontext W4BF16 cmodel vs onnx: latent cosine {c:.5f}, PSNR {p:.2f} dB")
    assert c > 0.9 and p > 15.0 and cm["image"].std() > 1.0


def test_kontext_bad_inputs(kontext_ws, export_dev, tmp_path, tiny_dev, input_png):
    out = tmp_path / "o.png"
    base = ["run", "--models", str(kontext_ws), "--backend", "onnx", "--steps", "1", "--out", str(out)]
    r = cli_main(base)
    assert r.returncode == 2 and "Kontext" in _err(r) and "--image" in _err(r)
    r = cli_main(base + ["--image", str(input_png), "--strength", "0.5"])
    assert r.returncode == 2 and "drop --strength" in _err(r)
    assert not out.exists()
    # --reference-size: Kontext only; a bad size names the flag
    r = cli_main(["export", str(tiny_dev), "--out", str(tmp_path / "x"), "--height", "64", "--width", "64",
                  "--reference-size", "64x64"])
    assert r.returncode == 2 and "Kontext" in _err(r)
    r = cli_main(["export", str(tiny_dev), "--out", str(tmp_path / "x"), "--reference-size", "60x64"])
    assert r.returncode == 2 and "--reference-size" in _err(r)
    assert not (tmp_path / "x" / "manifest.json").exists()
