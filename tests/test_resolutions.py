"""Several image sizes in one build (issue 11, part 2): `fluxc export --resolution WxH ...`,
`fluxc compile` merging each size-dependent net's sizes as stages of one net (model_tool
--combine: one copy of the weights), `fluxc run --width W --height H` picking one.

On the session's tiny schnell model (its export settings, tiny VAE) at two sizes, one of them
non-square: 128x128 and 128x64 (width x height). Each size's onnx and cmodel images must equal
those of a one-size build at that size; the merged transformer file must not hold its weights twice.
The sail runtime (issue 17 item 5) runs every size on the sail stand-in, bit-identical to cmodel,
with one device tensor per role and distinct shape (the device memory figure counts them all), and
`fluxc verify` checks every size, naming the size of what it catches.
The real compiler and the real chip simulator run throughout (nothing is mocked).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_compile import compile_into, make_workspace, run_fluxc_compile
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
            if s.family == "vae_encoder":  # the one-size session builds carry it (--image-input); this export not
                continue
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


@pytest.fixture(scope="module")
def runs(builds, tmp_path_factory):
    """`fluxc run` of one build (builds key), backend and size, once per module: image, latents
    and, for sail-sim, what the stand-in counted per chip."""
    cache: dict = {}

    def get(key, backend: str, size: tuple[int, int] | None) -> dict:
        if (key, backend, size) not in cache:
            from fluxc.runtime import sail_sim

            sail_sim.reset()  # the stand-in's counters of this run only
            out = tmp_path_factory.mktemp("run") / f"{backend}.png"
            img, lat = _run(builds[key], backend, out, size)
            res = {"image": img, "latents": lat}
            if backend == "sail-sim":
                res["chips"] = {d: c.to_dict() for d, c in sail_sim.stats().items()}
            cache[(key, backend, size)] = res
        return cache[(key, backend, size)]

    return get


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
def test_images_equal_one_size_builds(builds, runs, backend):
    for h, w in SIZES:
        m, one = runs("multi", backend, (h, w)), runs((h, w), backend, None)
        img_m, lat_m, img_s, lat_s = m["image"], m["latents"], one["image"], one["latents"]
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


# ---- the sail runtime at every size (issue 17 item 5)

# Device tensors of the tiny schnell W4BF16 build on its one chip: 15 at one size (tests/test_sail.py:
# clip ids/hidden/pooled, t5 ids/hidden, head latents/timestep, temb, enc, hid, rotary, single, noise,
# vae latents/image); the second size adds one per size-dependent role at its own shape (head latents,
# hid, single, rotary, noise, vae latents, vae image), as sophon-demo allocates one set per distinct shape.
TENSORS_TWO_SIZES = 15 + 7


def test_sail_sim_models_stages(builds):
    """The stand-in answers sail.EngineLLM's stage calls from the bmodel: the merged transformer head
    has one stage per size (largest first), each stage's addrmode0 tensors have that stage's shapes,
    and `process` on tensors of a shape no stage takes is refused (bmruntime picks the stage by the
    input shapes) before anything runs."""
    from fluxc.runtime import sail_sim as sail

    sail.reset()
    e = sail.EngineLLM(str(builds["multi"] / "BM1684X" / TRANSFORMER), [0])
    try:
        head = "schnell_head"
        assert e.get_stage_num(head) == 2 and e.get_stage_num("schnell_trans_block_0") == 2
        tokens = [h * w // 256 for h, w in SIZES]  # image tokens: (H/16) * (W/16)
        assert [e.get_input_shape(head, 0, st) for st in (0, 1)] == [[1, n, 64] for n in tokens]
        assert [e.get_input_tensors_addrmode0(head, st)[0].shape() for st in (0, 1)] == [[1, n, 64] for n in tokens]
        assert e.get_input_max_shape(head, 0) == [1, tokens[0], 64]
        assert e.get_output_tensors_addrmode0("schnell_tail", 1)[0].shape() == [1, tokens[1], 64]
        h0 = sail.Handle(0)
        n_in = e.get_input_num(head)
        ins = {i: sail.Tensor(h0, [1, 48, 64] if i == 0 else e.get_input_shape(head, i, 0), e.get_input_dtype(head, i),
                              False, True) for i in range(n_in)}
        outs = {i: sail.Tensor(h0, e.get_output_shape(head, i, 0), e.get_output_dtype(head, i), False, True)
                for i in range(e.get_output_num(head))}
        with pytest.raises(sail.SailSimError, match="match no stage"):
            e.process(head, ins, outs)
    finally:
        e.close()
        sail.reset()


def test_sail_sim_each_size_equals_cmodel(builds, runs):
    """`fluxc run --backend sail-sim --width W --height H` on the two-size build: each size's image and
    latents bit-identical to cmodel's; every size's tensors allocated at open (one per role and
    distinct shape, never per net); the stand-in's peak device memory is the build's figure."""
    from fluxc.export.manifest import load_manifest
    from fluxc.runtime.device_memory import device_memory_for_build, io_bytes_per_device, specs_per_size

    ws = builds["multi"]
    man = load_manifest(ws / "onnx")
    fig = device_memory_for_build(ws / "BM1684X", man, "W4BF16")
    first = specs_per_size(man)[0]
    io_first = io_bytes_per_device(first, {n: 0 for n in first})[0]
    print(f"\n[measure] two-size tiny W4BF16 build, device 0: {fig[0]['total']} B (models {fig[0]['models']}, "
          f"I/O tensors {fig[0]['io']} B for both sizes, {io_first} B for the first alone)")
    assert list(fig) == [0] and fig[0]["io"] > io_first  # the second size's tensors are counted
    for h, w in SIZES:
        sim, ref = runs("multi", "sail-sim", (h, w)), runs("multi", "cmodel", (h, w))
        assert sim["image"].shape == (h, w, 3) and ref["image"].std() > 1.0
        diff = np.abs(sim["image"].astype(int) - ref["image"].astype(int)).max()
        print(f"[measure] sail-sim vs cmodel at {w}x{h}: max pixel diff {diff}, "
              f"max latent diff {np.abs(sim['latents'] - ref['latents']).max():.3g}")
        assert np.array_equal(sim["image"], ref["image"]) and np.array_equal(sim["latents"], ref["latents"]), (h, w)
        chips = sim["chips"]
        assert list(chips) == [0]
        assert chips[0]["allocations"] == TENSORS_TWO_SIZES == fig[0]["tensors"], chips[0]
        assert chips[0]["peak_bytes"] == fig[0]["total"], (chips[0], fig[0])
        assert chips[0]["live_tensors"] == 0


def _verify(ws: Path, report: Path, *extra: str) -> tuple:
    r = invoke(["verify", "--models", str(ws), "--report", str(report), *extra])
    assert r.exception is None or isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert report.is_file(), r.output
    return r, json.loads(report.read_text())


def test_verify_checks_every_size(builds, tmp_path):
    """fluxc verify on the two-size build checks both sizes: structure (each size's stage), the
    rotary table and schedule, the size-dependent pieces and the end-to-end run per size, the text
    encoders once; every size passes."""
    from fluxc.export.manifest import load_manifest

    r, rep = _verify(builds["multi"], tmp_path / "report.json", "--steps", str(STEPS))
    print(r.output)
    assert r.exit_code == 0, rep["failures"]
    labels = [_label(h, w) for h, w in SIZES]
    assert rep["info"]["build_sizes"] == labels
    man = load_manifest(builds["multi"] / "onnx")
    second = man.at(*SIZES[1])
    varies = {s.name for s in man.specs if s.to_dict() != second.spec(s.name).to_dict()}
    assert varies and rep["info"]["size_dependent_pieces"] == sorted(varies)
    by = {}
    for c in rep["checks"]:
        by.setdefault((c["section"], c["name"]), []).append(c["size"])
    for s in man.specs:
        want = labels if s.name in varies else [""]
        assert sorted(by[("piece", s.name)]) == sorted(want), (s.name, by[("piece", s.name)])
        assert sorted(by[("structure", s.name)]) == sorted(want), (s.name, by[("structure", s.name)])
    for item in [("reference", "rotary_emb.npy"), ("reference", "scheduler"), ("e2e", f"{STEPS}-step generation")]:
        assert sorted(by[item]) == sorted(labels), (item, by[item])
    assert set(rep["info"]["drift_cosine_by_size"]) == {labels[1]}


def test_verify_names_the_size_of_a_broken_piece(builds, compile_build_dir, tmp_path):
    """A block broken only at the second size (its 128x64 piece's weights x1.25, recompiled into
    its net's second stage) fails verify at that size, named with it; the same block at the first
    size and every other piece pass."""
    from fluxc.validation import mutants as mu

    exp = mu.copy_export(builds["multi"] / "onnx", tmp_path / "export" / "onnx")
    mu.scale_block_weights(exp, "schnell_trans_block_1", 1.25, size=_label(*SIZES[1]))
    ws = make_workspace(tmp_path / "ws", exp)
    report = compile_into(ws, compile_build_dir, COMPILE_ARGS)
    print(f"\n[measure] mutant compile: {sum(not p['cache_hit'] for p in report['pieces'].values())} piece(s) "
          f"rebuilt")
    r, rep = _verify(ws, tmp_path / "report.json", "--no-e2e")
    print(r.output)
    assert r.exit_code == 1
    bad = [c for c in rep["checks"] if not c["ok"]]
    assert [(c["section"], c["name"], c["size"]) for c in bad] == [("piece", "schnell_trans_block_1", "128x64")], \
        rep["failures"]
    assert rep["failures"][0].startswith("piece: schnell_trans_block_1 @128x64:"), rep["failures"]
    assert "schnell_trans_block_1 @128x64" in r.output
    same_first = [c for c in rep["checks"] if c["name"] == "schnell_trans_block_1" and c["section"] == "piece"
                  and c["size"] == "128x128"]
    assert len(same_first) == 1 and same_first[0]["ok"]
