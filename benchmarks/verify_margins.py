"""How far fluxc verify's thresholds sit from good builds and from broken ones (tiny models).

For a compiled tiny workspace (W4BF16 schnell and/or BF16 dev), this script
1. runs verify on the good build and takes, per piece kind, its worst figure;
2. builds mutants of its export (validation/mutants.py: a block's weights zeroed or scaled, a
   block replaced by identity, rotary axes swapped, scheduler shift changed, timestep and
   guidance swapped in the dev head), recompiles only the mutated pieces through the shared
   build cache, runs verify on each and takes the mutated piece's figure;
3. searches the smallest weight scale of one block that verify still catches (per
   quantisation): scales are tried from large to small until one passes;
and writes everything to benchmarks/results/verify_margins.json with the commit.

Usage (workspaces made by `fluxc tiny` + `fluxc export` + `fluxc compile`, build cache inside):
    python benchmarks/verify_margins.py --schnell /tmp/ws_schnell --dev /tmp/ws_dev \
        [--scales 1.25,1.1,1.05,1.02] [--out benchmarks/results/verify_margins.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import git_commit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _compile(ws: Path, build: Path, args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "fluxc.cli", "compile", "--models", str(ws), "--build-dir", str(build),
                        *args], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compile failed: {r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads((ws / "BM1684X" / "compile_report.json").read_text())


def _verify(ws: Path, *extra: str) -> dict:
    from fluxc.validation.verify import verify_workspace

    rep = verify_workspace(ws, e2e="--e2e" in extra, say=lambda s: None)
    return rep.to_dict()


def _pieces(rep: dict) -> dict:
    return {c["name"]: c for c in rep["checks"] if c["section"] == "piece"}


def _kind(name: str) -> str:
    for k in ("single_trans_block", "trans_block", "head", "tail", "block"):
        if k in name:
            return k
    return name


def _figure(c: dict) -> dict:
    w = c["metrics"]["worst"]
    return {k: w[k] for k in ("cosine", "rel_err", "delta_cosine", "delta_rel_err") if k in w} | {
        "ok": c["ok"], "detail": c["detail"]}


def _scheduler_mutant(ws: Path) -> tuple:
    """A schedule change that matters for this build: schnell's fixed shift 1.0 -> 3.0; dev shifts
    dynamically (mu from the image size between base_shift and max_shift; its `shift` is unused,
    so changing it is an equivalent mutant that nothing can catch): max_shift 1.15 -> 1.5."""
    from fluxc.validation import mutants as mu

    cfg = json.loads((ws / "onnx" / "scheduler" / "scheduler_config.json").read_text())
    if cfg.get("use_dynamic_shifting"):
        return "scheduler max_shift 1.5", "scheduler", lambda e: mu.set_scheduler(e, max_shift=1.5)
    return "scheduler shift 3.0", "scheduler", lambda e: mu.set_scheduler(e, shift=3.0)


def _build_args(ws: Path) -> list[str]:
    rec = json.loads((ws / "BM1684X" / "fluxc_build.json").read_text())
    a = ["--quantize", rec["quantize"], "--flux-type", rec["flux_type"], "--num-devices", str(rec["devices"])]
    return a + (["--tiny-vae"] if rec["tiny_vae"] else [])


def _mutant(base_ws: Path, root: Path, name: str, mutate, recompile: bool) -> tuple[Path, float]:
    from fluxc.validation.mutants import copy_export

    exp = copy_export(base_ws / "onnx", root / name / "onnx")
    mutate(exp)
    ws = root / name
    t0 = time.perf_counter()
    if recompile:
        _compile(ws, base_ws / "build", _build_args(base_ws))
    else:
        shutil.copytree(base_ws / "BM1684X", ws / "BM1684X")
    return ws, time.perf_counter() - t0


def _record_block_mutants(out: dict, rep: dict, muts: dict, log) -> None:
    checks = _pieces(rep)
    failing = [f.split(":")[1].strip() for f in rep["failures"]]
    for piece, name in muts.items():
        c = checks[piece]
        out["mutants"][name] = {"target": piece, "caught": not c["ok"], "figure": _figure(c),
                                "failing_in_this_build": failing}
        log(f"    {name} ({piece}): caught={not c['ok']}: {c['detail'][:150]}")


def margins_for(ws: Path, scales: list[float], root: Path, log) -> dict:
    """Mutated blocks are put into one build (each piece is judged per hop on its own chip
    inputs, so they do not mask each other: the tests assert the other pieces pass)."""
    from fluxc.validation import mutants as mu

    rec = json.loads((ws / "BM1684X" / "fluxc_build.json").read_text())
    ft, q = rec["flux_type"], rec["quantize"]
    cfg = json.loads((Path(json.loads((ws / "onnx" / "manifest.json").read_text())["source"]["path"]) /
                      "transformer" / "config.json").read_text())
    out: dict = {"flux_type": ft, "quantize": q, "good": {}, "mutants": {}, "scale_search": []}
    log(f"[{ft} {q}] verify on the good build")
    t0 = time.perf_counter()
    good_rep = _verify(ws)
    out["good_verify_s"] = round(time.perf_counter() - t0, 1)
    for n, c in _pieces(good_rep).items():
        k = f"{_kind(n)} {c['metrics']['quant']}"
        f = _figure(c)
        cur = out["good"].setdefault(k, {"worst": f, "piece": n})
        for m in ("rel_err", "delta_rel_err"):
            if m in f and f[m] > cur["worst"].get(m, -1):
                cur["worst"], cur["piece"] = f, n
    blocks = {f"{ft}_trans_block_0": ("zeroed", lambda e, p: mu.zero_block_weights(e, p)),
              f"{ft}_trans_block_1": ("x1.25", lambda e, p: mu.scale_block_weights(e, p, 1.25)),
              f"{ft}_single_trans_block_1": ("identity", lambda e, p: mu.identity_block(e, p))}
    if ft == "dev":
        blocks[f"{ft}_head"] = ("timestep/guidance swapped", lambda e, p: mu.swap_inputs(e, p, "timestep", "guidance"))

    def mutate(e):
        for p, (_, fn) in blocks.items():
            fn(e, p)

    log(f"[{ft} {q}] block mutants: " + ", ".join(f"{v[0]} ({k})" for k, v in blocks.items()))
    mws, secs = _mutant(ws, root, f"{ft}-blocks", mutate, True)
    _record_block_mutants(out, _verify(mws), {p: v[0] for p, v in blocks.items()}, log)
    for name, target, fn in (("rotary axes swapped", "rotary_emb.npy",
                              lambda e: mu.swap_rotary_axes(e, tuple(cfg["axes_dims_rope"]))),
                             _scheduler_mutant(ws)):
        log(f"[{ft} {q}] mutant: {name}")
        mws, _ = _mutant(ws, root, f"{ft}-{target}", fn, False)
        rep = _verify(mws)
        c = next(c for c in rep["checks"] if c["name"] == target)
        out["mutants"][name] = {"target": target, "caught": not c["ok"], "figure": {"detail": c["detail"], **c["metrics"]},
                                "failing": [f.split(":")[1].strip() for f in rep["failures"]]}
        log(f"    caught={not c['ok']}: {c['detail'][:150]}")
    # smallest weight scale caught: one block and one T5 block per scale, one build per scale
    blk, t5b = f"{ft}_trans_block_2", "t5_block_1"
    for s_ in scales:
        log(f"[{ft} {q}] scale search: {blk} and {t5b} weights x{s_}")
        mws, _ = _mutant(ws, root, f"{ft}-scale-{s_}", lambda e, s_=s_: (mu.scale_block_weights(e, blk, s_),
                                                                         mu.scale_block_weights(e, t5b, s_)), True)
        checks = _pieces(_verify(mws))
        for p in (blk, t5b):
            c = checks[p]
            out["scale_search"].append({"scale": s_, "piece": p, "quant": c["metrics"]["quant"], "caught": not c["ok"],
                                        "figure": _figure(c)})
            log(f"    {p} x{s_}: caught={not c['ok']}: {c['detail'][:120]}")
        if all(checks[p]["ok"] for p in (blk, t5b)):
            break
    out["smallest_scale_caught"] = {}
    for r in out["scale_search"]:
        key = f"{r['piece']} ({r['quant']})"
        if r["caught"]:
            cur = out["smallest_scale_caught"].get(key)
            out["smallest_scale_caught"][key] = r["scale"] if cur is None else min(cur, r["scale"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schnell", type=Path, help="compiled tiny schnell W4BF16 workspace")
    ap.add_argument("--dev", type=Path, help="compiled tiny dev BF16 workspace")
    ap.add_argument("--scales", default="1.1,1.05,1.02")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "verify_margins.json")
    a = ap.parse_args()
    scales = [float(x) for x in a.scales.split(",")]
    commit = git_commit(short=False)
    res = {"commit": commit, "size": "tiny models (fluxc tiny), as exported by the workspaces", "builds": []}
    with tempfile.TemporaryDirectory(prefix="fluxc-margins-") as td:
        for ws in (a.schnell, a.dev):
            if ws:
                res["builds"].append(margins_for(ws.resolve(), scales, Path(td), lambda s: print(s, flush=True)))
    from fluxc.fsutil import write_json_atomic

    try:  # keep the builds measured earlier (e.g. schnell) that this run did not redo
        old = json.loads(a.out.read_text())
        done = {(b["flux_type"], b["quantize"]) for b in res["builds"]}
        kept = [dict(b, commit=old.get("commit")) for b in old.get("builds", [])
                if (b.get("flux_type"), b.get("quantize")) not in done]
        res["builds"] = kept + res["builds"]
    except (OSError, ValueError, KeyError):
        pass
    write_json_atomic(a.out, res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
