"""Mutation tests: broken variants of the tiny models must fail fluxc verify, naming the piece.

Each mutant is a copy of a session export with one thing broken (validation/mutants.py); the
manifest's source still names the original tiny model, so verify's reference is the right
model. Mutated ONNX pieces are recompiled through the shared compile cache (only they and the
combined file holding them are rebuilt). Blocks are judged per hop (each on the inputs it got
on the chip), so a mutant fails exactly its own piece: the tests assert that too.

The margins (the mutant's figure against the worst figure of the good pieces of the same kind
in the same run, and against the threshold) are printed as `[margin]` lines;
benchmarks/verify_margins.py records them (and the smallest weight scale caught).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures_compile import compile_into, make_workspace
from tests.fixtures_runtime import invoke

SCHNELL_ARGS = ["--quantize", "W4BF16", "--flux-type", "schnell", "--tiny-vae"]
DEV_ARGS = ["--quantize", "BF16", "--flux-type", "dev", "--num-devices", "3"]
BLOCK_MUTANTS = {  # piece -> mutation (one build, three mutated blocks)
    "schnell_trans_block_0": "weights zeroed",
    "schnell_trans_block_1": "weights x1.25",
    "schnell_single_trans_block_1": "replaced by identity",
}


def _verify(ws: Path, report: Path, *extra: str) -> tuple:
    r = invoke(["verify", "--models", str(ws), "--report", str(report), *extra])
    assert r.exception is None or isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert report.is_file(), r.output
    return r, json.loads(report.read_text())


def _mutant_ws(root: Path, base_ws: Path, mutate) -> tuple[Path, Path]:
    from fluxc.validation.mutants import copy_export

    exp = copy_export(Path(base_ws) / "onnx", root / "export" / "onnx")
    mutate(exp)
    return make_workspace(root / "ws", exp), exp


def _piece_checks(rep: dict) -> dict:
    return {c["name"]: c for c in rep["checks"] if c["section"] == "piece"}


def _block_figure(c: dict) -> tuple[float, float]:
    w = c["metrics"]["worst"]
    return w.get("delta_cosine", w["cosine"]), w.get("delta_rel_err", w["rel_err"])


@pytest.fixture(scope="module")
def block_mutants(compiled_schnell_w4, compile_build_dir, tmp_path_factory):
    from fluxc.validation import mutants as mu

    def mutate(exp):
        mu.zero_block_weights(exp, "schnell_trans_block_0")
        mu.scale_block_weights(exp, "schnell_trans_block_1", 1.25)
        mu.identity_block(exp, "schnell_single_trans_block_1")

    root = tmp_path_factory.mktemp("mutant_blocks")
    ws, _ = _mutant_ws(root, compiled_schnell_w4, mutate)
    report = compile_into(ws, compile_build_dir, SCHNELL_ARGS)
    r, rep = _verify(ws, root / "report.json", "--no-e2e")
    print(r.output)
    return report, r, rep


def test_block_mutants_recompile_only_themselves(block_mutants):
    report, _, _ = block_mutants
    rebuilt = {n for n, p in report["pieces"].items() if not p["cache_hit"]}
    assert rebuilt <= set(BLOCK_MUTANTS)  # == on a cold cache; a warm one may hold the mutants already


@pytest.mark.parametrize("piece", list(BLOCK_MUTANTS))
def test_block_mutant_fails_naming_the_piece(piece, block_mutants):
    _, r, rep = block_mutants
    assert r.exit_code == 1
    checks = _piece_checks(rep)
    assert not checks[piece]["ok"], checks[piece]
    # every other piece passes: the failure is this piece's own
    others_failing = [n for n, c in checks.items() if not c["ok"] and n not in BLOCK_MUTANTS]
    assert not others_failing, [checks[n]["detail"] for n in others_failing]
    good = [_block_figure(c) for n, c in checks.items()
            if c["ok"] and c["metrics"]["quant"] == "W4BF16" and c["metrics"]["delta_cosine_min"] is not None]
    assert good
    g_cos, g_rel = min(x[0] for x in good), max(x[1] for x in good)
    m_cos, m_rel = _block_figure(checks[piece])
    thr = checks[piece]["metrics"]
    print(f"\n[margin] {piece} ({BLOCK_MUTANTS[piece]}): update cosine {m_cos:.4f} vs good W4BF16 blocks' "
          f"worst {g_cos:.4f} (threshold {thr['delta_cosine_min']}); update rel. error {m_rel:.3f} vs "
          f"{g_rel:.3f} (threshold {thr['delta_rel_err_max']}); {checks[piece]['detail']}")
    assert m_cos < g_cos or m_rel > g_rel
    if BLOCK_MUTANTS[piece] == "replaced by identity":
        assert "no-op" in checks[piece]["detail"]


@pytest.fixture(scope="module")
def table_mutants(compiled_schnell_w4, tmp_path_factory):
    """Rotary table with its row/column axes swapped, scheduler shift changed: files the
    runtime reads at run time, no recompile (the manifest and the bmodels are unchanged)."""
    from fluxc.validation import mutants as mu

    results = {}
    for name, mutate in (
            ("rotary", lambda exp: mu.swap_rotary_axes(exp, (16, 24, 24))),
            ("scheduler", lambda exp: mu.set_scheduler(exp, shift=3.0))):
        root = tmp_path_factory.mktemp(f"mutant_{name}")
        ws, _ = _mutant_ws(root, compiled_schnell_w4, mutate)
        shutil.copytree(Path(compiled_schnell_w4) / "BM1684X", ws / "BM1684X")
        results[name] = _verify(ws, root / "report.json", "--no-e2e")
    return results


def test_rotary_axes_swapped_fails(table_mutants, tiny_schnell):
    cfg = json.loads((Path(tiny_schnell) / "transformer" / "config.json").read_text())
    assert tuple(cfg["axes_dims_rope"]) == (16, 24, 24)  # what the mutant assumed
    r, rep = table_mutants["rotary"]
    print(r.output)
    assert r.exit_code == 1
    rot = next(c for c in rep["checks"] if c["name"] == "rotary_emb.npy")
    assert not rot["ok"]
    print(f"\n[margin] rotary axes swapped: max error {rot['metrics']['max_abs_err']:.3g} vs threshold 1e-5 "
          f"(good build: 0)")
    # The blocks fed the swapped table are NOT caught on the tiny random-weight model (measured:
    # every block passes): its attention logits are small, softmax is near uniform, and a
    # permuted rotation hardly moves the output. The direct check of the table against
    # diffusers' FluxPosEmbed is what catches it, naming the file.
    assert [f.split(":")[1].strip() for f in rep["failures"]] == ["rotary_emb.npy"]


def test_scheduler_shift_changed_fails(table_mutants):
    r, rep = table_mutants["scheduler"]
    print(r.output)
    assert r.exit_code == 1
    sch = next(c for c in rep["checks"] if c["name"] == "scheduler")
    assert not sch["ok"], sch
    print(f"\n[margin] scheduler shift 1.0 -> 3.0: max error {sch['metrics']['max_err']:.3g} vs threshold 1e-4 "
          f"(good build: 0)")
    assert {f.split(":")[1].strip() for f in rep["failures"]} == {"scheduler"}


def test_head_timestep_guidance_swapped_fails(compiled_dev_bf16, compile_build_dir, tmp_path):
    from fluxc.validation import mutants as mu

    ws, _ = _mutant_ws(tmp_path, compiled_dev_bf16,
                       lambda exp: mu.swap_inputs(exp, "dev_head", "timestep", "guidance"))
    report = compile_into(ws, compile_build_dir, DEV_ARGS)
    assert {n for n, p in report["pieces"].items() if not p["cache_hit"]} <= {"dev_head"}
    r, rep = _verify(ws, tmp_path / "report.json", "--no-e2e")
    print(r.output)
    assert r.exit_code == 1
    checks = _piece_checks(rep)
    assert not checks["dev_head"]["ok"] and "temb" in checks["dev_head"]["detail"]
    assert [n for n, c in checks.items() if not c["ok"]] == ["dev_head"]
    temb = checks["dev_head"]["metrics"]["outputs"]["temb"]["hop"]
    print(f"\n[margin] dev_head timestep/guidance swapped: temb cosine {temb['cosine']:.4f} rel. error "
          f"{temb['rel_err']:.3f} (threshold cos {checks['dev_head']['metrics']['cosine_floor']}, rel "
          f"{checks['dev_head']['metrics']['rel_err_max']})")


def test_custom_recipe_thresholds_and_quantisation(compiled_schnell_w4, compile_build_dir, tmp_path):
    """A build made with --recipe is held to that recipe: its quantisation per piece (t5_tail
    F16 here, BF16 in the default) and its thresholds, both read from the build record."""
    import yaml

    from fluxc.compile.recipe import default_recipe_path

    recipe = yaml.safe_load(default_recipe_path().read_text())
    recipe["groups"]["t5_tail"] = {"quantize": "F16"}
    recipe["thresholds"]["W4BF16"] = [0.9, 0.4]
    recipe["thresholds"]["F16"] = [0.995, 0.9]
    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    ws = make_workspace(tmp_path / "ws", Path(compiled_schnell_w4) / "onnx")
    report = compile_into(ws, compile_build_dir, SCHNELL_ARGS + ["--recipe", rp])
    assert {n for n, p in report["pieces"].items() if not p["cache_hit"]} <= {"t5_tail"}
    r, rep = _verify(ws, tmp_path / "report.json", "--no-e2e", "--pieces", "t5_*")
    print(r.output)
    assert r.exit_code == 0, rep["failures"]
    checks = _piece_checks(rep)
    assert checks["t5_tail"]["metrics"]["quant"] == "F16"
    assert checks["t5_tail"]["metrics"]["cosine_floor"] == 0.995
    assert checks["t5_block_0"]["metrics"]["cosine_floor"] == 0.9
    assert rep["info"]["recipe"]["source"] == str(rp)


def test_missing_source_checks_against_onnx_and_says_so(compiled_schnell_w4, compile_build_dir, tmp_path):
    def drop_source(exp):
        mp = exp / "manifest.json"
        man = json.loads(mp.read_text())
        man["source"]["path"] = str(tmp_path / "gone")
        mp.write_text(json.dumps(man))

    ws, _ = _mutant_ws(tmp_path, compiled_schnell_w4, drop_source)
    compile_into(ws, compile_build_dir, SCHNELL_ARGS)  # nothing recompiles: only the record is new
    r, rep = _verify(ws, tmp_path / "report.json", "--steps", "1")
    print(r.output)
    assert r.exit_code == 0, rep["failures"]
    assert rep["info"]["reference"]["kind"] == "onnx"
    assert "ONNX only" in r.output and "gone" in r.output
    assert next(c for c in rep["checks"] if c["section"] == "e2e")["metrics"]["reference"] == "ONNX pieces"
