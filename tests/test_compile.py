"""fluxc compile on the tiny models, with the real TPU-MLIR compiler and chip simulator."""
from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest

from fluxc.compile.parse import parse_info
from fluxc.compile.recipe import load_recipe, piece_plan, validate_recipe
from fluxc.compile.split import (PieceMem, device_cost, full_size_comparison, split_contiguous)
from fluxc.errors import FluxcError
from fluxc.fsutil import sha256_file
from tests.fixtures_compile import compile_into, make_workspace, run_fluxc_compile


def _manifest(ws: Path) -> dict:
    return json.loads((ws / "onnx" / "manifest.json").read_text())


def _report(ws: Path) -> dict:
    return json.loads((ws / "BM1684X" / "compile_report.json").read_text())


def _specs_by_family(ws: Path):
    from fluxc.specs import PieceSpec

    out: dict[str, list] = {}
    for d in _manifest(ws)["pieces"]:
        s = PieceSpec.from_dict(d)
        out.setdefault(s.family, []).append(s)
    return out


def _nets_of(info_file: Path):
    info = parse_info(info_file.read_text())
    return [(n.name, [(i.name, i.shape, i.dtype) for i in n.stages[0]["inputs"]]) for n in info.nets], info


def _contract(specs):
    return [(s.net_name, [(t.name, list(t.shape), t.dtype) for t in s.inputs]) for s in specs]


def _check_similarities(report: dict) -> None:
    assert report["check"] is True
    for name, p in report["pieces"].items():
        sim = p["similarity"]
        assert p["checked"] and sim, name
        q = sim["quantized"]
        assert q["cosine"] >= p["tolerance"][0] and q["euclidean"] >= p["tolerance"][1], (name, q)
        # the bmodel on the chip simulator vs the quantised MLIR
        assert sim["simulator"]["cosine"] >= 0.99, (name, sim["simulator"])
        # the float MLIR vs ONNX Runtime
        assert sim["onnx_vs_top"]["cosine"] >= 0.99, (name, sim["onnx_vs_top"])
        assert p["estimate_ms"] and p["estimate_ms"] > 0, name
        assert p["memory"]["weight"] >= 0 and p["memory"]["device"] > 0, name


# ---------------------------------------------------------------- recipe and split (no compiler)

def test_default_recipe_groups():
    r = load_recipe()
    from fluxc.specs import KINDS, PieceSpec, TensorSpec

    def spec(group):  # a piece of the first kind in that quantisation group
        kind = next(k.name for k in KINDS.values() if k.group == group)
        return PieceSpec("x", kind, None, (TensorSpec("a", (1, 2), "float32"),), ())

    assert piece_plan(r, spec("clip"), "BF16").quantize == "F16"
    assert piece_plan(r, spec("t5_head"), "BF16").quantize == "F16"
    assert piece_plan(r, spec("t5_block"), "BF16").quantize == "W4BF16"
    assert piece_plan(r, spec("t5_tail"), "W4BF16").quantize == "BF16"
    assert piece_plan(r, spec("transformer_head"), "W4BF16").quantize == "BF16"
    assert piece_plan(r, spec("transformer_block"), "W4BF16").quantize == "W4BF16"
    assert piece_plan(r, spec("transformer_block"), "BF16").quantize == "BF16"
    assert piece_plan(r, spec("transformer_tail"), "W4BF16").quantize == "BF16"
    assert piece_plan(r, spec("vae"), "W4BF16").quantize == "BF16"


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d["groups"]["clip"].update(quantise="F16"), "groups.clip.quantise"),
    (lambda d: d["groups"]["vae"].update(quantize="INT8"), "groups.vae.quantize"),
    (lambda d: d["groups"].pop("t5_tail"), "groups.t5_tail"),
    (lambda d: d["groups"]["t5_block"].update(q_group_size="big"), "groups.t5_block.q_group_size"),
    (lambda d: d.update(chips="bm1684x"), "chips"),
    (lambda d: d["thresholds"].update(BF16=[2, 0.5]), "thresholds.BF16"),
])
def test_bad_recipe_names_the_key(mutate, key):
    import yaml

    data = yaml.safe_load(Path(load_recipe().source).read_text())
    mutate(data)
    with pytest.raises(FluxcError, match=f"bad key '{key}'"):
        validate_recipe(data, "r.yaml")


def test_bad_recipe_cli_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(load_recipe().source).read_text().replace("clip:", "clipp:"))
    r = run_fluxc_compile([tmp_path, "--quantize", "W4BF16", "--recipe", bad])
    assert r.returncode == 2
    assert "bad key 'groups.clipp'" in r.stderr and "Traceback" not in r.stderr


def test_split_is_optimal_contiguous():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        ps = [PieceMem(str(i), rng.randint(0, 100), rng.randint(0, 100)) for i in range(n)]
        best = min(max(device_cost(ps[a:b]) for a, b in zip((0,) + c, c + (n,)))
                   for c in itertools.combinations(range(1, n), k - 1))
        parts = split_contiguous(ps, k)
        assert [p for part in parts for p in part] == ps and all(parts)
        assert max(device_cost(p) for p in parts) == best


def test_full_size_split_beats_reference_hand_split():
    c = full_size_comparison(3)
    assert c["ours"][0]["pieces"][0] == "dev_head" and c["ours"][-1]["pieces"][-1] == "dev_tail"
    assert c["reference"][0]["summary"] == "head + double 0..12"
    assert c["reference"][2]["summary"] == "single 28..37 + tail"
    assert c["ours_max_mb"] < c["reference_max_mb"]


# ---------------------------------------------------------------- bad input (real CLI)

def _copy_export(src_ws: Path, dst: Path) -> Path:
    shutil.copytree(src_ws / "onnx", dst, symlinks=False)
    return dst


def test_unknown_quantisation(export_schnell_tinyvae):
    r = run_fluxc_compile([export_schnell_tinyvae, "--quantize", "INT8"])
    assert r.returncode == 2 and "unknown quantisation 'INT8'" in r.stderr and "Traceback" not in r.stderr


def test_wrong_flux_type(export_schnell_tinyvae, tmp_path):
    r = run_fluxc_compile([export_schnell_tinyvae, "--quantize", "BF16", "--flux-type", "dev", "--out", tmp_path])
    assert r.returncode == 2 and "not dev" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


def test_missing_piece(export_schnell_tinyvae, tmp_path):
    exp = shutil.copytree(export_schnell_tinyvae, tmp_path / "onnx")
    (exp / "t5_block_1.onnx").unlink()
    r = run_fluxc_compile([exp, "--quantize", "W4BF16", "--out", tmp_path / "out"])
    assert r.returncode == 2 and "t5_block_1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_toolchain(export_schnell_tinyvae, tmp_path):
    r = run_fluxc_compile([export_schnell_tinyvae, "--quantize", "W4BF16", "--out", tmp_path / "out",
                           "--build-dir", tmp_path / "b"], env={"FLUXC_CACHE": str(tmp_path / "nocache")})
    assert r.returncode == 2 and "fluxc toolchain install" in r.stderr and "Traceback" not in r.stderr


def test_broken_piece_stops_with_piece_name(compiled_schnell_w4, compile_build_dir, tmp_path):
    """A garbage ONNX piece (sha updated in the manifest): the fold cannot read it, so the piece
    goes to model_transform as exported (fluxc.compile.fold), which fails on it; the run stops
    naming the piece, its command and log tail; nothing is marked complete."""
    exp = shutil.copytree(compiled_schnell_w4 / "onnx", tmp_path / "onnx")
    (exp / "schnell_tail.onnx").write_bytes(b"this is not an onnx model\n" * 10)
    m = json.loads((exp / "manifest.json").read_text())
    for e in m["pieces"]:
        if e["name"] == "schnell_tail":
            e["sha256"] = sha256_file(exp / "schnell_tail.onnx")
    (exp / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "out"
    r = run_fluxc_compile([exp, "--quantize", "W4BF16", "--out", out, "--build-dir", compile_build_dir, "--jobs", "1"])
    assert r.returncode == 2, r.stderr
    first = r.stderr.strip().splitlines()[0]
    assert first.startswith("error: model_transform on piece schnell_tail failed"), first
    assert "--model_name schnell_tail" in r.stderr and "last lines of the log" in r.stderr
    broken = list((compile_build_dir / "pieces").glob("schnell_tail-*"))
    assert broken and any(not (b / "COMPLETE").exists() for b in broken)
    assert any("fallback" in json.loads((b / "fold.json").read_text()) for b in broken if (b / "fold.json").is_file())
    assert not out.exists() or not list(out.glob("*.bmodel"))


# ---------------------------------------------------------------- real compiles

def test_schnell_w4_outputs_match_contract(compiled_schnell_w4):
    ws = compiled_schnell_w4
    out = ws / "BM1684X"
    fam = _specs_by_family(ws)
    files = {"clip": "clip.bmodel", "t5": "w4bf16_t5.bmodel",
             "transformer": "schnell_w4bf16_transformer.bmodel", "vae": "tiny_vae_decoder_bf16.bmodel",
             "vae_encoder": "tiny_vae_encoder_bf16.bmodel"}  # the session export has --image-input
    for family, f in files.items():
        assert (out / f).is_file(), f
        nets, _ = _nets_of(out / f"{f}.info.txt")
        assert nets == _contract(fam[family]), f
    rep = _report(ws)
    assert rep["quantize"] == "W4BF16" and rep["flux_type"] == "schnell" and rep["tiny_vae"]
    _check_similarities(rep)
    q = {n: p["quantize"] for n, p in rep["pieces"].items()}
    assert q["clip_head"] == "F16" and q["t5_head"] == "F16" and q["t5_block_0"] == "W4BF16"
    assert q["t5_tail"] == "BF16" and q["schnell_head"] == "BF16" and q["schnell_tail"] == "BF16"
    assert q["schnell_trans_block_0"] == "W4BF16" and q["schnell_single_trans_block_0"] == "W4BF16"
    assert q["tiny_vae_decoder"] == "BF16" and q["tiny_vae_encoder"] == "BF16"
    e = rep["estimate_ms"]
    assert e["denoising_step_ms"] > 0 and e["text_encoders_ms"] > 0 and e["vae_ms"] > 0 and e["vae_encoder_ms"] > 0
    # the encoder's net is `vae_encoder` (as the decoder's is `vae_decoder`), on device 0
    rec = json.loads((out / "fluxc_build.json").read_text())
    enc = next(f for f in rec["files"] if f["family"] == "vae_encoder")
    assert enc["file"] == "tiny_vae_encoder_bf16.bmodel" and enc["nets"] == ["vae_encoder"] and enc["device"] == 0


def test_dev_bf16_split_over_three_devices(compiled_dev_bf16):
    ws = compiled_dev_bf16
    out = ws / "BM1684X"
    fam = _specs_by_family(ws)
    rep = _report(ws)
    _check_similarities(rep)
    assert all(p["quantize"] in ("BF16", "F16", "W4BF16") for p in rep["pieces"].values())
    assert rep["pieces"]["dev_trans_block_0"]["quantize"] == "BF16"
    nets_all = []
    split = json.loads((out / "device_split.json").read_text())
    assert split["devices"] == 3 and len(split["split"]) == 3
    for i, row in enumerate(split["split"]):
        f = out / f"dev_bf16_transformer_on_device{i}.bmodel"
        assert f.is_file() and row["file"] == f.name
        nets, info = _nets_of(out / f"{f.name}.info.txt")
        assert [n for n, _ in nets] == row["pieces"]
        nets_all += nets
        # the memory model: weights and instructions add up, runtime is shared (max)
        mems = [rep["pieces"][n]["memory"] for n in row["pieces"]]
        assert info.weight == sum(m["weight"] for m in mems)
        assert info.runtime == max(m["runtime"] for m in mems)
        assert row["modeled_mb"] == pytest.approx(row["measured_mb"], rel=0.02)
    assert nets_all == _contract(fam["transformer"])
    assert split["split"][0]["pieces"][0] == "dev_head" and split["split"][-1]["pieces"][-1] == "dev_tail"
    # the split is the best contiguous one for the measured per-piece figures
    ps = [PieceMem(n, rep["pieces"][n]["memory"]["weight"] + rep["pieces"][n]["memory"]["instruct"],
                   rep["pieces"][n]["memory"]["runtime"]) for n, _ in nets_all]
    best = min(max(device_cost(ps[a:b]) for a, b in zip((0,) + c, c + (len(ps),)))
               for c in itertools.combinations(range(1, len(ps)), 2))
    assert max(device_cost(ps[i:j]) for i, j in _bounds(split)) == best
    # the head's timestep/guidance projection is kept in float32 through a quantize table
    qt = (Path(rep["pieces"]["dev_head"]["build_dir"]) / "work" / "qtable.txt").read_text()
    assert "time_proj" in qt and "Sin" in qt and qt.count("F32") >= 10
    for family, f in {"clip": "clip.bmodel", "t5": "w4bf16_t5.bmodel", "vae": "vae_decoder_bf16.bmodel",
                      "vae_encoder": "vae_encoder_bf16.bmodel"}.items():
        nets, _ = _nets_of(out / f"{f}.info.txt")
        assert nets == _contract(fam[family]), f


def _bounds(split):
    i = 0
    for row in split["split"]:
        yield i, i + len(row["pieces"])
        i += len(row["pieces"])


def test_shared_text_encoders_reused_between_models(compiled_schnell_w4, compiled_dev_bf16):
    rep = _report(compiled_dev_bf16)
    # CLIP and T5 pieces are identical in the two tiny models: the second compile reused them
    s = _report(compiled_schnell_w4)
    for n in ("clip_head", "clip_tail", "t5_head", "t5_block_0", "t5_tail"):
        assert rep["pieces"][n]["build_dir"] == s["pieces"][n]["build_dir"], n


def test_rerun_does_no_compiler_work(compiled_schnell_w4, compile_build_dir):
    out = compiled_schnell_w4 / "BM1684X"
    before = {p.name: p.stat().st_ino for p in out.glob("*.bmodel")}
    rep = compile_into(compiled_schnell_w4, compile_build_dir, ["--quantize", "W4BF16", "--flux-type", "schnell"])
    assert rep["tool_runs"] == 0 and rep["tool_commands"] == []
    assert all(p["cache_hit"] for p in rep["pieces"].values())
    assert all(o["cache_hit"] for o in rep["outputs"])
    assert rep["seconds"] < 30
    assert {p.name: p.stat().st_ino for p in out.glob("*.bmodel")} == before
    # --no-check accepts the checked results as they are
    rep = compile_into(compiled_schnell_w4, compile_build_dir, ["--quantize", "W4BF16", "--no-check"])
    assert rep["tool_runs"] == 0 and rep["check"] is False


def test_changed_piece_recompiles_only_it(compiled_schnell_w4, compile_build_dir, tmp_path):
    """Change one piece's weights: only that piece and the combined file holding it are rebuilt."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    exp = shutil.copytree(compiled_schnell_w4 / "onnx", tmp_path / "onnx")
    model = onnx.load(str(exp / "t5_tail.onnx"))
    init = model.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr_new = (arr * 1.5 + 0.1).astype(arr.dtype)
    init.CopyFrom(numpy_helper.from_array(arr_new, init.name))
    onnx.save(model, str(exp / "t5_tail.onnx"))
    m = json.loads((exp / "manifest.json").read_text())
    for e in m["pieces"]:
        if e["name"] == "t5_tail":
            e["sha256"] = sha256_file(exp / "t5_tail.onnx")
    (exp / "manifest.json").write_text(json.dumps(m))
    ws = make_workspace(tmp_path / "ws", exp)
    rep = compile_into(ws, compile_build_dir, ["--quantize", "W4BF16"])
    missed = [n for n, p in rep["pieces"].items() if not p["cache_hit"]]
    assert missed == ["t5_tail"]
    assert sorted(c.split()[0] for c in rep["tool_commands"]) == sorted(
        ["fold", "model_transform", "model_deploy", "model_tool", "model_tool", "model_tool"])  # info, combine, info
    rebuilt = [o["file"] for o in rep["outputs"] if not o["cache_hit"]]
    assert rebuilt == ["w4bf16_t5.bmodel"]
    assert np.isfinite(rep["pieces"]["t5_tail"]["similarity"]["quantized"]["cosine"])


def test_default_build_cache_is_next_to_the_export(compiled_schnell_w4, compile_build_dir, tmp_path):
    """`fluxc compile EXPORT --out Y` run from an unrelated folder, without --build-dir: the cache
    goes to the export's workspace (<ws>/build for <ws>/onnx) or, for an export outside a
    workspace, to $FLUXC_CACHE/build; the first line names it; the current folder stays empty.
    Both defaults are pointed (symlinks) at the session's cache, so every piece is a cache hit."""
    from fluxc.workspace import cache_root

    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    env = {"FLUXC_BUILD_DIR": "", "FLUXC_MODELS": "", "COLUMNS": "1000"}
    ws = tmp_path / "ws"
    exp = _copy_export(compiled_schnell_w4, ws / "onnx")
    (ws / "build").symlink_to(compile_build_dir.resolve(), target_is_directory=True)
    cache = tmp_path / "cache"  # $FLUXC_CACHE: the toolchain where it is, the build cache the session's
    cache.mkdir()
    (cache / "toolchain").symlink_to((cache_root() / "toolchain").resolve(), target_is_directory=True)
    (cache / "build").symlink_to(compile_build_dir.resolve(), target_is_directory=True)
    alone = shutil.copytree(exp, tmp_path / "my-export", symlinks=False)
    for src, want in ((exp, ws / "build"), (alone, cache / "build")):
        out = tmp_path / f"out-{src.name}"
        r = run_fluxc_compile([src, "--quantize", "W4BF16", "--out", out], cwd=elsewhere,
                              env={**env, "FLUXC_CACHE": str(cache)})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        first = r.stdout.strip().splitlines()[0]
        assert f"build cache {want.resolve()}" in first, first
        rep = json.loads((out / "compile_report.json").read_text())
        assert Path(rep["build_dir"]) == want.resolve()
        assert not any(c.startswith("model_") for c in rep["tool_commands"] if "model_tool" not in c), \
            rep["tool_commands"]
        assert not any(elsewhere.iterdir()), list(elsewhere.iterdir())


def test_profile_breakdown_of_a_real_profile(compiled_schnell_w4):
    """The breakdown of a compiled block's compiler_profile_0.txt (fluxc/compile/profile_breakdown.py)
    agrees with the compiler's own totals (command counts, DMA bytes, cycles), attributes the
    layer groups' Load/Store DMA to compute ops, and compile_report.json keeps one per graph."""
    import re

    from fluxc.compile.profile_breakdown import breakdown, read_commands

    rep = _report(compiled_schnell_w4)
    bd = rep["breakdown"]
    kinds = {_k for _k in bd}
    assert {"double_block", "single_block", "clip_block", "t5_block"} <= kinds, kinds
    blk = bd["single_block"]
    assert blk["piece"] == "schnell_single_trans_block_0" and blk["quantize"] == "W4BF16"
    prof = Path(rep["pieces"]["schnell_single_trans_block_0"]["build_dir"]) / "work" / "compiler_profile_0.txt"
    text = prof.read_text()
    b = breakdown(prof)
    cmds, _ = read_commands(prof)
    # the compiler's own counts: TIU and GDMA commands (API_END b:/g:), DMA bytes (GDMA SUMMARY),
    # total cycles (TCYC); BM1688's TCYC line also gives each engine's cycles
    n_tiu = sum(int(x) for x in re.findall(r"API_END total_cycle:\d+\|b:(\d+)", text))
    n_gdma = sum(int(x) for x in re.findall(r"API_END total_cycle:\d+\|b:\d+\|g:(\d+)", text))
    assert sum(c.engine == "tiu" for c in cmds) == n_tiu > 0 and sum(c.engine == "gdma" for c in cmds) == n_gdma > 0
    assert b["gdma_bytes"] == sum(int(x) for x in re.findall(r"dr\[\d\] \w+:(\d+)", text)) > 0
    assert b["total_cycles"] == sum(int(x) for x in re.findall(r"^TCYC\s*:\s*(\d+)", text, re.M))
    for name, cyc in (("bdc_cycle", "tiu_cycles"), ("gdma_cycle", "gdma_cycles")):
        own = re.findall(name + r":(\d+)", text)
        if own:
            assert sum(map(int, own)) == b[cyc]
    tiu, gdma = b["tiu_cycles"], b["gdma_cycles"]
    # shares: by op type they add up to each engine's cycles; busy time is split exactly
    assert sum(r["tiu_cycles"] for r in b["by_type"]) == tiu
    assert sum(r["gdma_cycles"] for r in b["by_type"]) == gdma
    assert abs(b["gdma_only"] + b["both_busy"] - b["gdma_busy"]) < 1e-4
    assert abs(b["tiu_busy"] + b["gdma_only"] + b["idle"] - 1) < 1e-3
    # the DMA not hidden by compute, per op type, adds up to the piece's
    assert abs(sum(r["gdma_exposed_cycles"] for r in b["by_type"]) / b["total_cycles"] - b["gdma_only"]) < 1e-4
    assert 0 < b["tiu_busy"] <= 1 and 0 < b["gdma_busy"] <= 1
    ops = {r["op"] for r in b["by_type"]}
    assert "A16MatMul" in ops, ops  # W4 matmuls (global ops, their DMA named after them)
    loads = [c for c in cmds if c.op in ("Load", "Store")]
    assert loads and b["dma_attributed"] >= 0.9 * len(loads), (b["dma_attributed"], len(loads))
    assert blk["by_type"] == b["by_type"]
