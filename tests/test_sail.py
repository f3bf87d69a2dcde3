"""The sail runtime (runtime/sail_flux.py) as the board runs it, on the sail stand-in over the
chip simulator (runtime/sail_sim.py, `--backend sail-sim`): same image as the cmodel backend,
device tensors allocated once per role and chip (not per net), only token ids / latents /
scalars in and noise / image out across the host boundary, chip-to-chip copies for the BF16
split, the device memory figure, and bad input stopped before anything runs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_runtime import RUNTIME_STEPS, cli_main


def _no_traceback(res):
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text
    return text


def _net_io_count(ws: Path) -> int:
    from fluxc.export.manifest import load_manifest

    man = load_manifest(ws / "onnx")
    return sum(len(s.inputs) + len(s.outputs) for s in man.specs)


@pytest.mark.parametrize("quant", ["W4BF16", "BF16"])
def test_sail_sim_same_image_as_cmodel(quant, bmodel_run, record_property):
    from fluxc.export.manifest import load_manifest
    from fluxc.metrics import psnr

    sim, ref = bmodel_run("sail-sim", quant), bmodel_run("cmodel", quant)
    same = np.array_equal(sim["image"], ref["image"])
    p = float("inf") if same else psnr(sim["image"], ref["image"])
    record_property("psnr_db", p)
    print(f"\n[measure] sail-sim vs cmodel ({quant}): image bit-identical {same}, PSNR {p} dB, latents "
          f"max |diff| {np.abs(sim['latents'] - ref['latents']).max():.3g}")
    print(sim["output"])
    assert ref["image"].std() > 1.0
    assert same or p >= 60.0
    assert "load" in sim["output"] and f"{RUNTIME_STEPS}-step generation" in sim["output"]

    # ---- allocations: one set of device tensors per role and chip, none per net
    d = load_manifest(sim["ws"] / "onnx").dims
    chips = sim["chips"]
    total = sum(c["allocations"] for c in chips.values())
    if quant == "W4BF16":
        assert list(chips) == [0]
        # the reference's W4BF16 set (flux_pipeline.py): clip ids/hidden/pooled, t5 ids/hidden,
        # head latents/timestep (+guidance for dev), temb, enc, hid, rotary, single, noise, vae in/out;
        # the head's pooled and T5 inputs are the CLIP and T5 output tensors themselves (same chip);
        # an image-input build (issue 19) adds the VAE encoder's image in / output tensors
        man = load_manifest(sim["ws"] / "onnx")
        enc = 2 if any(s.family == "vae_encoder" for s in man.specs) else 0
        assert total == 15 + (1 if d.guidance_embeds else 0) + enc, sim["tensor_log"]
        assert chips[0]["c2c_in_bytes"] == 0
    else:
        assert sorted(chips) == [0, 1, 2]
        # every chip after the first receives activations chip to chip (d2d), never via the host
        assert chips[1]["c2c_in_bytes"] > 0 and chips[2]["c2c_in_bytes"] > 0
        for dev, log in sim["tensor_log"].items():
            assert len(log) == chips[dev]["allocations"]
    assert total < _net_io_count(sim["ws"]) / 2, (total, _net_io_count(sim["ws"]))
    assert all(c["live_tensors"] == 0 for c in chips.values()), "tensors not freed at the end of the run"

    # ---- the host boundary: exactly token ids, latents, scalars and the rotary table in;
    # noise per step and the image out. Nothing else crosses (activations stay on the chips).
    f4 = 4
    n_lat = d.image_tokens * d.in_channels * f4
    h2d = sum(c["h2d_bytes"] for c in chips.values())
    d2h = sum(c["d2h_bytes"] for c in chips.values())
    rot = int(np.prod(d.rotary_shape)) * f4
    n_rot = len(chips) if quant == "W4BF16" else sum(1 for dev, log in sim["tensor_log"].items()
                                                     if any(tuple(s) == tuple(d.rotary_shape) for s, _, _ in log))
    scalars = (2 if d.guidance_embeds else 1) * f4
    vae_in = d.latent_channels * d.latent_h * d.latent_w * f4
    assert h2d == (d.clip_len + d.t5_len) * 4 + n_rot * rot + RUNTIME_STEPS * (n_lat + scalars) + vae_in
    assert d2h == RUNTIME_STEPS * d.image_tokens * d.out_channels * f4 + 3 * d.height * d.width * f4


@pytest.mark.parametrize("quant", ["W4BF16", "BF16"])
def test_sail_sim_memory_is_the_build_figure(quant, bmodel_run):
    """What the stand-in measured per chip = device_memory_for_build (the figure compile and
    verify use): model_tool's weight + instruct + runtime of each file + the I/O tensors."""
    from fluxc.export.manifest import load_manifest
    from fluxc.runtime.device_memory import device_memory_for_build

    sim = bmodel_run("sail-sim", quant)
    ws = sim["ws"]
    fig = device_memory_for_build(ws / "BM1684X", load_manifest(ws / "onnx"), quant)
    print(f"\n[measure] {quant} device memory per chip (bytes): "
          + ", ".join(f"{dev}: {r['total']} (models {r['models']}, I/O {r['io']})" for dev, r in fig.items()))
    assert sorted(fig) == sorted(sim["chips"])
    for dev, r in fig.items():
        assert sim["chips"][dev]["peak_bytes"] == r["total"], (dev, sim["chips"][dev], r)


def _ws_copy(tmp: Path, ws: Path, swap: dict[str, Path] | None = None, manifest_edit=None) -> Path:
    """A workspace of links to `ws` (bmodels swapped or manifest edited where asked)."""
    out = tmp / "ws"
    (out / "BM1684X").mkdir(parents=True)
    for f in (ws / "BM1684X").iterdir():
        src = (swap or {}).get(f.name, f)
        (out / "BM1684X" / f.name).symlink_to(Path(src).resolve())
    exp = (ws / "onnx").resolve()
    if manifest_edit is None:
        (out / "onnx").symlink_to(exp, target_is_directory=True)
    else:
        (out / "onnx").mkdir()
        for f in exp.iterdir():
            if f.name != "manifest.json":
                (out / "onnx" / f.name).symlink_to(f)
        raw = json.loads((exp / "manifest.json").read_text())
        manifest_edit(raw)
        (out / "onnx" / "manifest.json").write_text(json.dumps(raw))
    return out


def _run_bad(ws: Path, tmp: Path, *extra: str, env=None):
    out = tmp / "x.png"
    e = dict(os.environ, **(env or {}))
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "fluxc.cli", "run", "--models", str(ws), "--backend", "sail-sim",
                          "--steps", "1", "--out", str(out), *extra], capture_output=True, text=True, timeout=900, env=e)
    text = _no_traceback(res)
    assert res.returncode == 2, text
    assert not out.exists(), "a failed run left an image"
    err = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, text
    return err[0]


def test_sail_sim_device_that_does_not_exist(compiled_dev_bf16, tmp_path):
    err = _run_bad(compiled_dev_bf16, tmp_path, "--devices", "0,1,7", env={"FLUXC_SAIL_SIM_CHIPS": "3"})
    assert "device 7 does not exist" in err and "--devices" in err
    err = _run_bad(compiled_dev_bf16, tmp_path, "--devices", "0")
    assert "split over 3 chips" in err


def test_sail_sim_nets_not_of_this_build(compiled_schnell_w4, compiled_dev_bf16, tmp_path):
    # the schnell W4BF16 transformer file replaced by a part of the dev BF16 build
    dev_part = Path(compiled_dev_bf16) / "BM1684X" / "dev_bf16_transformer_on_device0.bmodel"
    ws = _ws_copy(tmp_path, Path(compiled_schnell_w4), {"schnell_w4bf16_transformer.bmodel": dev_part})
    err = _run_bad(ws, tmp_path)
    # refused by the first check that sees it: the build record (the file's bytes are not the
    # ones compiled) or, past it, the stand-in's check of the nets against the build
    assert "schnell_w4bf16_transformer.bmodel" in err and "fluxc compile" in err
    assert "holds net 'dev_" in err or "the record says" in err or "differs from the build record" in err, err


def test_sail_sim_input_dtype_not_what_the_runtime_feeds(compiled_schnell_w4, tmp_path):
    # the build says clip_head takes int32 token ids; the compiled net takes float32 (as the
    # reference's runtime feeds them): refused before anything runs
    def edit(raw):
        for p in raw["pieces"]:
            if p["name"] == "clip_head":
                for t in p["inputs"]:
                    if t["name"] == "input_ids":
                        t["dtype"] = "int32"

    ws = _ws_copy(tmp_path, Path(compiled_schnell_w4), manifest_edit=edit)
    err = _run_bad(ws, tmp_path)
    # the build record refuses an export that is not the one compiled before the stand-in's
    # dtype check can; either way nothing runs
    assert ("net clip_head input input_ids is float32, the runtime feeds int32" in err
            or "compiled from another export" in err), err


def test_sail_sim_device_memory_limit(compiled_schnell_w4, tmp_path):
    err = _run_bad(compiled_schnell_w4, tmp_path, env={"FLUXC_SAIL_SIM_MEMORY_MB": "1"})
    assert "out of device memory" in err and "device 0" in err


def test_sail_sim_tensor_rules():
    """The stand-in refuses what sail refuses: wrong dtype into update_data, a device that
    does not exist, out-of-range copies; counts copies within and across chips."""
    from fluxc.runtime import sail_sim as sail

    sail.configure(chips=2, memory_mb=1)
    try:
        with pytest.raises(sail.SailSimError, match="device 2 does not exist"):
            sail.Handle(2)
        h0, h1 = sail.Handle(0), sail.Handle(1)
        a = sail.Tensor(h0, [2, 3], sail.Dtype.BM_FLOAT32, False, True)
        b = sail.Tensor(h1, [2, 3], sail.Dtype.BM_FLOAT32, True, True)
        with pytest.raises(sail.SailSimError, match="own dtype"):
            a.update_data(np.zeros((2, 3), np.int32))
        a.update_data(np.arange(6, dtype=np.float32).reshape(2, 3))
        b.sync_d2d(a, 1, 0, 4)
        b.sync_d2s()
        assert b.asnumpy().reshape(-1)[:4].tolist() == [1, 2, 3, 4]
        with pytest.raises(sail.SailSimError, match="out of bounds"):
            b.sync_d2d(a, 4, 0, 4)
        st = sail.stats()
        assert st[1].c2c_in_bytes == 16 and st[0].h2d_bytes == 24 and st[1].d2h_bytes == 24
        assert st[0].allocations == 1 and st[1].allocations == 1
        with pytest.raises(sail.SailSimError, match="out of device memory"):
            sail.Tensor(h0, [1024, 1024], sail.Dtype.BM_FLOAT32, False, True)
        a.free()
        b.free()
        assert st[0].live_tensors == 0 and st[0].tensor_bytes == 0
    finally:
        sail.reset()
