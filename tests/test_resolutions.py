"""Several image sizes in one build (issue 11, part 2): `fluxc export --resolution WxH ...`,
`fluxc compile` merging each size-dependent net's sizes as stages of one net (model_tool
--combine: one copy of the weights), `fluxc run --width W --height H` picking one.

On the session's tiny schnell model (its export settings, tiny VAE) at two sizes, one of them
non-square: 128x128 and 128x64 (width x height). Each size's onnx and cmodel images must equal
those of a one-size build at that size; the merged transformer file must not hold its weights twice.
The real compiler and the real chip simulator run throughout (nothing is mocked).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_compile import make_workspace, run_fluxc_compile
from tests.fixtures_runtime import RUNTIME_PROMPT, RUNTIME_SEED, cli_main, invoke
from tests.fixtures_export import EXPORT_HEIGHT, EXPORT_T5_LEN, EXPORT_WIDTH

STEPS = 2
# (height, width): the session's tiny export size (128x128) and a non-square one (width 128 x height 64)
SIZES = ((EXPORT_HEIGHT, EXPORT_WIDTH), (64, 128))
TRANSFORMER = "schnell_w4bf16_transformer.bmodel"
COMPILE_ARGS = ["--quantize", "W4BF16", "--flux-type", "schnell", "--tiny-vae"]


def _label(h: int, w: int) -> str:
    return f"{w}x{h}"


@pytest.fixture(scope="module")
def builds(tiny_schnell, compiled_schnell_w4, compile_build_dir, tmp_path_factory) -> dict:
    """{"multi": ws, (h, w): ws of the one-size build at that size}, all W4BF16.

    The session's tiny schnell build (128x128) is the one-size build of the first size, and the
    several-size build shares its build cache (content-keyed: ONNX, weights, options, chip,
    toolchain), so only what is byte-identical is skipped: the first size's pieces here are the
    session export's byte for byte (tested below), the second size's pieces are compiled for real,
    and every combine and every run is real."""
    from fluxc.export.driver import ExportOptions, run_export

    model = Path(tiny_schnell)
    root = tmp_path_factory.mktemp("resolutions")
    out: dict = {SIZES[0]: compiled_schnell_w4}
    for key, sizes in [("multi", list(SIZES)), (SIZES[1], [SIZES[1]])]:
        name = "multi" if key == "multi" else _label(*key)
        export = root / f"export-{name}"
        h, w = sizes[0]
        run_export(ExportOptions(model=str(model), out=export, height=h, width=w, t5_len=EXPORT_T5_LEN,
                                 tiny_vae=str(model / "tiny_vae"), resolutions=sizes if len(sizes) > 1 else None),
                   show_progress=False)
        ws = make_workspace(root / f"ws-{name}", export)
        r = run_fluxc_compile(["--models", ws, "--build-dir", compile_build_dir, *COMPILE_ARGS], timeout=3600)
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
        out[key] = ws
    return out


def test_export_layout(builds):
    """Text encoders once; the size-dependent pieces per further size, in res/<WxH>/."""
    from fluxc.export.manifest import load_manifest

    m = load_manifest(builds["multi"] / "onnx")
    assert m.sizes == list(SIZES) and m.size_labels == ["128x128", "128x64"]
    own = {e["name"] for e in m.resolutions[1]["pieces"]}
    blocks = {s.name for s in m.specs if "trans_block_" in s.name}
    assert blocks and own == {"schnell_head", "schnell_tail", "tiny_vae_decoder"} | blocks, own
    v = m.at(64, 128)
    for s in v.specs:
        assert ("res/128x64/" in str(v.path(s.name))) == (s.name in own), s.name
    assert v.dims.image_tokens == 32 and m.dims.image_tokens == 64
    assert np.load(v.rotary_path).shape == v.dims.rotary_shape
    # the pieces of each size are the one-size exports' graphs, byte for byte
    for (h, w) in SIZES:
        single = load_manifest(builds[(h, w)] / "onnx")
        view = m.at(h, w)
        for s in single.specs:
            assert view.path(s.name).read_bytes() == single.path(s.name).read_bytes(), (s.name, h, w)


def test_build_record_and_shared_weights(builds):
    from fluxc.build_record import load_record

    chip = builds["multi"] / "BM1684X"
    rec = load_record(chip)
    assert rec.sizes == list(SIZES) and rec.size_labels == ["128x128", "128x64"]
    report = json.loads((chip / "compile_report.json").read_text())
    assert [z["size"] for z in report["resolutions"]] == ["128x128", "128x64"]
    tr = {f.path.name: f for f in rec.files}
    single = {s: {f.path.name: f for f in load_record(builds[s] / "BM1684X").files} for s in SIZES}
    w_multi = tr[TRANSFORMER].memory["weight"]
    w_single = [single[s][TRANSFORMER].memory["weight"] for s in SIZES]
    info = (chip / f"{TRANSFORMER}.info.txt").read_text()
    print(f"\n[measure] tiny W4BF16 transformer weight: merged 2 sizes {w_multi} B, one size {w_single} B; "
          f"device memory merged {tr[TRANSFORMER].memory['device']} B, one size "
          f"{[single[s][TRANSFORMER].memory['device'] for s in SIZES]} B")
    assert info.count("stage") >= 2, info[:2000]
    # the weights are stored once: not ~2x a one-size file's
    assert w_multi <= 1.05 * max(w_single), (w_multi, w_single)
    assert tr[TRANSFORMER].memory["device"] < 1.5 * max(single[s][TRANSFORMER].memory["device"] for s in SIZES)
    # each size's estimated step equals the one-size build's
    for z, s in zip(report["resolutions"], SIZES):
        one = json.loads((builds[s] / "BM1684X" / "compile_report.json").read_text())["estimate_ms"]
        assert z["denoising_step_ms"] == pytest.approx(one["denoising_step_ms"], rel=0.02), (z, one)


def _run(ws: Path, backend: str, out: Path, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    args = ["run", "--models", str(ws), "--backend", backend, "--prompt", RUNTIME_PROMPT, "--seed",
            str(RUNTIME_SEED), "--steps", str(STEPS), "--out", str(out), "--save-latents", str(out.with_suffix(".npy"))]
    if size is not None:
        args += ["--height", str(size[0]), "--width", str(size[1])]
    r = invoke(args)
    assert r.exit_code == 0, (r.output, r.exception)
    return np.array(Image.open(out).convert("RGB")), np.load(out.with_suffix(".npy"))


@pytest.mark.parametrize("backend", ["onnx", "cmodel"])
def test_images_equal_one_size_builds(builds, backend, tmp_path):
    for h, w in SIZES:
        img_m, lat_m = _run(builds["multi"], backend, tmp_path / f"multi-{w}x{h}.png", (h, w))
        img_s, lat_s = _run(builds[(h, w)], backend, tmp_path / f"single-{w}x{h}.png", None)
        assert img_m.shape == (h, w, 3) and img_s.shape == (h, w, 3)
        assert img_m.std() > 1.0
        diff = np.abs(img_m.astype(int) - img_s.astype(int)).max()
        print(f"\n[measure] {backend} {w}x{h}: merged build vs one-size build: max pixel diff {diff}, "
              f"max latent diff {np.abs(lat_m - lat_s).max():.3g}")
        assert np.array_equal(img_m, img_s) and np.array_equal(lat_m, lat_s), (backend, h, w, diff)


def test_run_size_the_build_lacks(builds):
    r = cli_main(["run", "--models", str(builds["multi"]), "--backend", "cmodel", "--width", "96", "--height", "64"])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "96x64" in lines[0] and "128x128" in lines[0] and "128x64" in lines[0]


@pytest.mark.parametrize("res,what", [("100x64", "multiple of 16"), ("64x2064", "above 2048"),
                                      ("64by64", "WIDTHxHEIGHT")])
def test_export_bad_resolution(tmp_path, res, what):
    r = cli_main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "onnx"), "--resolution", "64x64",
                  "--resolution", res])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], r.stderr
    assert not (tmp_path / "onnx").exists()
