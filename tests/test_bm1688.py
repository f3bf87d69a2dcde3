"""fluxc compile --chip bm1688: the real TPU-MLIR compiler for the BM1688, checked on the BM1688
simulator (model_deploy's own cmodel comparison per piece, then the whole pipeline through
fluxc's cmodel runtime on the BM1688 simulator against ONNX Runtime).

Kept cheap: a tiny schnell with one block of each kind (11 pieces) at 64x64, T5 length 16.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_compile import make_workspace, run_fluxc_compile
from tests.fixtures_runtime import RUNTIME_PROMPT, RUNTIME_SEED, cli_main, invoke
from tests.fixtures_tiny import make_tiny

SIZE, T5_LEN, STEPS = 64, 16, 2
FILES = ("clip.bmodel", "w4bf16_t5.bmodel", "schnell_w4bf16_transformer.bmodel", "tiny_vae_decoder_bf16.bmodel")
# Same floors as the BM1684X W4BF16 build in tests/test_runtime.py (int4 blocks, BF16 tiny VAE).
PSNR_FLOOR_DB, LATENT_COS_FLOOR = 18.0, 0.98


@pytest.fixture(scope="module")
def bm1688_ws(tmp_path_factory) -> Path:
    from fluxc.export.driver import ExportOptions, run_export

    model = make_tiny(tmp_path_factory, "bm1688", "schnell", seed=0, transformer={"num_layers": 1,
                      "num_single_layers": 1}, clip={"num_hidden_layers": 1}, t5={"num_layers": 1})
    root = tmp_path_factory.mktemp("bm1688")
    export = root / "export"
    run_export(ExportOptions(model=str(model), out=export, height=SIZE, width=SIZE, t5_len=T5_LEN,
                             tiny_vae=str(model / "tiny_vae")), show_progress=False)
    ws = make_workspace(root / "ws", export)
    r = run_fluxc_compile(["--models", ws, "--build-dir", root / "build", "--quantize", "W4BF16", "--chip", "bm1688"])
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return ws


def test_bm1688_layout_checks_and_estimate(bm1688_ws):
    out = bm1688_ws / "BM1688"
    assert not (bm1688_ws / "BM1684X").exists()
    for f in FILES:  # the reference's models/BM1688/ file names (gen_bmodel.sh --chip_type bm1688)
        assert (out / f).is_file(), f
        info = (out / f"{f}.info.txt").read_text()
        assert "BM1688" in info and "BM1684X" not in info, info[:400]
    rep = json.loads((out / "compile_report.json").read_text())
    assert rep["chip"] == "bm1688" and rep["recipe"].endswith("bm1688.yaml")
    assert len(rep["pieces"]) == 11
    for name, p in rep["pieces"].items():
        # model_deploy ran each bmodel on the BM1688 simulator against the quantised MLIR
        sim = (p["similarity"] or {}).get("simulator")
        assert p["checked"] and sim and sim["cosine"] >= 0.99, (name, p["similarity"])
        assert p["estimate_ms"] and p["estimate_ms"] > 0, name
    e = rep["estimate_ms"]
    assert e["denoising_step_ms"] > 0 and e["chip"]["cost_model_mhz"] == 900.0 and e["chip"]["cores"] == 2
    print(f"\n[measure] tiny BM1688 W4BF16 ({SIZE}x{SIZE}): estimated step {e['denoising_step_ms']:.3f} ms, "
          f"text encoders {e['text_encoders_ms']:.3f} ms, VAE {e['vae_ms']:.3f} ms; device memory "
          + ", ".join(f"{o['file']} {o['memory']['device'] / 2**20:.1f} MB" for o in rep["outputs"]))


def test_bm1688_pipeline_on_its_simulator_matches_onnx(bm1688_ws, tmp_path, record_property):
    from PIL import Image

    from fluxc.metrics import cosine, psnr

    res = {}
    for backend in ("onnx", "cmodel"):
        r = invoke(["run", "--models", str(bm1688_ws), "--backend", backend, "--chip", "bm1688", "--prompt",
                    RUNTIME_PROMPT, "--seed", str(RUNTIME_SEED), "--steps", str(STEPS),
                    "--out", str(tmp_path / f"{backend}.png"), "--save-latents", str(tmp_path / f"{backend}.npy")])
        assert r.exit_code == 0, (r.output, r.exception)
        res[backend] = (np.array(Image.open(tmp_path / f"{backend}.png").convert("RGB")),
                        np.load(tmp_path / f"{backend}.npy"))
    p = psnr(res["cmodel"][0], res["onnx"][0])
    c = cosine(res["cmodel"][1], res["onnx"][1])
    record_property("psnr_db", p)
    record_property("latent_cosine", c)
    print(f"\n[measure] BM1688 simulator W4BF16 vs onnx (tiny, {SIZE}x{SIZE}, {STEPS} steps): PSNR {p:.2f} dB, "
          f"latent cosine {c:.6f}")
    assert res["onnx"][0].std() > 1.0
    assert p >= PSNR_FLOOR_DB and c >= LATENT_COS_FLOOR


def test_bm1688_bmodel_refused_by_the_bm1684x_simulator(bm1688_ws):
    """The chip matters: the same file on the BM1684X simulator is refused (so the BM1688 run
    above really used the BM1688 simulator)."""
    from fluxc.errors import FluxcError
    from fluxc.runtime.cmodel_engine import CmodelEngine

    with pytest.raises(FluxcError):
        e = CmodelEngine(bm1688_ws / "BM1688" / "tiny_vae_decoder_bf16.bmodel", chip="BM1684X")
        e.close()


@pytest.mark.parametrize("cmd", ["compile", "run"])
def test_unknown_chip_one_line_error(tmp_path, cmd):
    args = (["compile", "--quantize", "W4BF16"] if cmd == "compile" else ["run", "--backend", "cmodel"])
    (tmp_path / "onnx").mkdir()
    r = cli_main([*args, "--models", str(tmp_path), "--chip", "bm1690"])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "bm1690" in lines[0] and "bm1684x" in lines[0] and "bm1688" in lines[0]
    assert not (tmp_path / "BM1690").exists()


def test_bm1688_cost_model_clock(bm1688_ws, tmp_path):
    """The compiler's BM1688 estimate counts cycles at 900 MHz (chips.py): its `runtime` line
    equals TCYC / 900e3 ms on a real BM1688 profile, and fluxc's fallback for nets without a
    runtime line uses that clock."""
    import re

    from fluxc.compile.chips import chip_mhz
    from fluxc.compile.parse import parse_profile_ms

    rep = json.loads((bm1688_ws / "BM1688" / "compile_report.json").read_text())
    prof = Path(rep["pieces"]["schnell_trans_block_0"]["build_dir"]) / "work" / "compiler_profile_0.txt"
    text = prof.read_text()
    tcyc = sum(int(m) for m in re.findall(r"^TCYC\s*:\s*(\d+)", text, re.M))
    runtime = float(re.findall(r"runtime:\s*([0-9.]+)\s*ms", text)[-1])
    assert chip_mhz("bm1688") == 900.0
    assert abs(runtime - tcyc / 900e3) <= 1e-3 * runtime + 1e-6, (runtime, tcyc)
    only_cycles = tmp_path / "p.txt"
    only_cycles.write_text(f"TCYC : {tcyc}. (bdc_cycle:1, gdma_cycle:1)\n")
    assert parse_profile_ms(only_cycles, chip_mhz("bm1688")) == pytest.approx(runtime, rel=1e-3)
