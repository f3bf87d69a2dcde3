"""One piece through TPU-MLIR, cached: model_transform, then model_deploy (with the chip
simulator check), then `model_tool --info`.

Cache layout (under the build folder, default models/build):

    pieces/<piece>-<key16>/
        in.npz                 the piece's sample inputs (PieceSpec.sample_inputs(0))
        work/                  cwd of the tools: MLIR, npz files, compiler_profile_0.txt
        transform.log deploy.log info.log
        transform.done         model_transform finished (a resumed build skips it)
        <piece>.bmodel         renamed into place once model_deploy succeeded
        result.json            similarity, memory, cost estimate, options
        COMPLETE               written last: only then is the folder trusted

The key hashes everything that decides the bmodel: the ONNX file's sha256 (from the export
manifest), the piece's I/O spec, the quantisation and options, the chip and the toolchain
version. The check tolerance is not in the key: a result is reused only if it was checked
against a threshold at least as strict as the one asked for now (or no check is asked).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fluxc.compile import fold, rebind
from fluxc.compile.chips import chip_mhz
from fluxc.compile.parse import (Similarity, deploy_similarities, f32_ops_from_inputs, parse_info, parse_profile_ms,
                                 transform_similarity)
from fluxc.compile.recipe import PiecePlan, deploy_args, transform_args
from fluxc.compile.tools import Tools
from fluxc.errors import FluxcError
from fluxc.fsutil import COMPLETE, read_complete_json, sha256_json, write_json_atomic, write_text_atomic
from fluxc.specs import PieceSpec

# Rebinding runs in this process and holds a piece's weights in float32 two or three times over
# (3.0 GB for a full-size double block, measured). One at a time (it takes seconds; the deploys
# beside it run on), and the freed memory is handed back to the system. The whole compile's peak
# is not this but `model_tool --combine` of the transformer file (benchmarks/combine_memory.py).
_REBIND_ONE_AT_A_TIME = threading.Lock()


def _give_back_memory() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas otherwise
    except (OSError, AttributeError):
        pass


BUILD_FORMAT = 2  # 2: model_transform reads the folded graph (fluxc.compile.fold)


def piece_key(spec: PieceSpec, onnx_sha: str, plan: PiecePlan, chip: str, toolchain: str) -> str:
    return sha256_json({
        "format": BUILD_FORMAT, "onnx_sha256": onnx_sha,
        "io": {"inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs]},
        "net_name": spec.net_name, "quantize": plan.quantize, "options": plan.options,
        "chip": chip, "toolchain": toolchain,
    })


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _sim_dict(s) -> dict[str, float | None] | None:
    return None if s is None else {k: _finite(v) for k, v in s.to_dict().items()}


@dataclass
class PieceResult:
    name: str
    folder: Path
    bmodel: Path
    data: dict[str, Any]
    cache_hit: bool
    seconds: float = 0.0
    tool_runs: list[str] = field(default_factory=list)

    @property
    def memory(self) -> dict[str, int]:
        return self.data["memory"]


def _transform_similarity(folder: Path):
    """ONNX Runtime vs top MLIR: model_transform's own figure, or ours for a rebound piece."""
    own = folder / "transform_check.json"
    if own.is_file():
        return Similarity(**json.loads(own.read_text()))
    log = folder / "transform.log"
    return transform_similarity(log.read_text(errors="replace")) if log.is_file() else None


def _check_passes(data: dict[str, Any], tolerance: tuple[float, float]) -> bool:
    q = (data.get("similarity") or {}).get("quantized")
    if not data.get("checked") or not q:
        return False
    return (q["cosine"] or 0) >= tolerance[0] and (q["euclidean"] or 0) >= tolerance[1]


def load_cached(folder: Path, check: bool, tolerance: tuple[float, float], keep: bool = True) -> dict[str, Any] | None:
    """The cached result if the folder is complete (and checked enough when asked). Without
    `keep` (an estimate-only build) a result whose bmodel was not kept is enough."""
    data = read_complete_json(folder, "result.json")
    if data is None:
        return None
    if keep and not (folder / data.get("bmodel", "?")).is_file():
        return None
    if check and not _check_passes(data, tolerance):
        return None
    return data


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on a build folder (two compiles sharing a cache wait for each other)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compile_piece(spec: PieceSpec, onnx: Path, onnx_sha: str, plan: PiecePlan, chip: str, toolchain: str,
                  build_root: Path, tools: Tools, check: bool, keep: bool = True) -> PieceResult:
    """`keep=False`: an estimate-only build (its memory and cost figures; the bmodel is deleted)."""
    key = piece_key(spec, onnx_sha, plan, chip, toolchain)
    folder = build_root / "pieces" / f"{spec.name}-{key[:16]}"
    with folder_lock(folder):
        return _compile_piece(spec, onnx, key, folder, plan, chip, tools, check, toolchain, keep)


def cached_piece(spec: PieceSpec, onnx_sha: str, plan: PiecePlan, chip: str, toolchain: str, build_root: Path,
                 check: bool, keep: bool = True) -> PieceResult | None:
    """The piece's result if the cache already holds it (what compile_piece would return without
    running a tool), else None. Lock-free: a complete folder is never rewritten in place."""
    key = piece_key(spec, onnx_sha, plan, chip, toolchain)
    folder = build_root / "pieces" / f"{spec.name}-{key[:16]}"
    t0 = time.monotonic()
    cached = load_cached(folder, check, plan.tolerance, keep)
    if cached is None:
        return None
    if cached.get("estimate_ms") is None:
        cached["estimate_ms"] = parse_profile_ms(folder / "work" / "compiler_profile_0.txt", chip_mhz(chip))
    return PieceResult(spec.name, folder, folder / cached["bmodel"], cached, True, time.monotonic() - t0)


def _run_transform(spec: PieceSpec, onnx: Path, plan: PiecePlan, tools: Tools, check: bool, folder: Path,
                   samples: dict | None = None) -> None:
    """model_transform of the piece's graph, simplified first by fluxc.compile.fold (what
    model_transform's own simplification would make, without running the whole graph)."""
    name = spec.net_name
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        folded, figures = fold.fold(onnx, work, tools, folder / "fold.log", spec.name)
        if check and samples is not None:
            figures["max_rel_diff_vs_piece"] = fold.check(onnx, folded, samples, spec.name)
        model_def, targs = folded.name, transform_args(spec, plan)
    except FluxcError as e:  # model_transform's own simplification, as before (fluxc.compile.fold)
        fold.remove(work)
        figures = {"fallback": str(e).splitlines()[0]}
        model_def, targs = str(onnx), transform_args(spec, plan, folded=False)
    write_json_atomic(folder / "fold.json", figures)
    args = ["--model_name", name, "--model_def", model_def, *targs, "--mlir", f"{name}.mlir"]
    if check:
        # The transform runs the ONNX piece in ONNX Runtime and the top MLIR on the
        # same inputs and compares them (cos/euclid >= 0.99 by default, else it fails);
        # its top npz then is the float reference for model_deploy below.
        args += ["--test_input", str(folder / "in.npz"), "--test_result", f"{name}_top.npz"]
    try:
        tools.run("model_transform", args, work, folder / "transform.log", spec.name)
    finally:
        fold.remove(work)


def _transform(spec: PieceSpec, onnx: Path, plan: PiecePlan, tools: Tools, check: bool, folder: Path,
               samples: dict, toolchain: str) -> str:
    """The piece's top MLIR and weights in <folder>/work: rebound from the template of its graph
    when there is one (fluxc.compile.rebind), else by model_transform (and the result becomes
    the template). Returns "rebound" or "transformed"."""
    io = {"inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs]}
    try:
        gkey = rebind.graph_key(onnx, io, transform_args(spec, plan), toolchain)
    except Exception:  # not a readable ONNX file: model_transform says what is wrong with it
        _run_transform(spec, onnx, plan, tools, check, folder, samples)
        return "transformed"
    tdir = rebind.template_dir(folder.parent.parent, spec.kind, gkey)
    work = folder / "work"
    with folder_lock(tdir):
        t = rebind.load_template(tdir)
        if t is None:
            _run_transform(spec, onnx, plan, tools, check, folder, samples)
            rebind.make_template(tdir, spec.net_name, work, onnx)
            return "transformed"
        if t.rebindable:
            with _REBIND_ONE_AT_A_TIME:
                rebind.apply(t, spec.net_name, work, onnx)
                _give_back_memory()
    if not t.rebindable:
        _run_transform(spec, onnx, plan, tools, check, folder, samples)
        return "transformed"
    if check:
        _check_rebound(spec, onnx, tools, folder, samples)
    return "rebound"


def _check_rebound(spec: PieceSpec, onnx: Path, tools: Tools, folder: Path, samples: dict) -> None:
    """What model_transform checks, for a rebound piece: the top MLIR run by TPU-MLIR's own
    interpreter (all tensors, the reference model_deploy compares against) against the ONNX
    piece in ONNX Runtime, output by output."""
    import onnxruntime as ort

    name = spec.net_name
    work = folder / "work"
    with open(work / f"{name}_in_f32.npz", "wb") as f:
        np.savez(f, **samples)
    tools.run("model_runner", ["--model", f"{name}.mlir", "--input", f"{name}_in_f32.npz",
                               "--output", f"{name}_top.npz", "--dump_all_tensors"],
              work, folder / "transform.log", spec.name)
    top = np.load(work / f"{name}_top.npz")
    ref = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, samples)
    worst = None
    for t, r in zip(spec.outputs, ref):
        # the interpreter names a tensor after the output and the op that made it ("x_Add")
        keys = [k for k in top.files if k == t.name] or [k for k in top.files if k.startswith(t.name + "_")]
        if len(keys) != 1:
            raise FluxcError(f"{spec.name}: the rebound MLIR has no single output {t.name}; see {folder / 'transform.log'}")
        s = Similarity.between(top[keys[0]].astype(np.float64), r.astype(np.float64))
        worst = s if worst is None or s.cosine < worst.cosine else worst
    if worst.cosine < 0.99 or worst.euclidean < 0.99:
        raise FluxcError(f"{spec.name}: rebound MLIR vs ONNX Runtime cos {worst.cosine:.5f} euclid "
                         f"{worst.euclidean:.5f} below 0.99; see {folder / 'transform.log'}")
    write_json_atomic(folder / "transform_check.json", worst.to_dict())


def _compile_piece(spec: PieceSpec, onnx: Path, key: str, folder: Path, plan: PiecePlan, chip: str,
                   tools: Tools, check: bool, toolchain: str, keep: bool = True) -> PieceResult:
    t0 = time.monotonic()
    cached = load_cached(folder, check, plan.tolerance, keep)
    if cached is not None:
        if cached.get("estimate_ms") is None:  # results written before the TCYC fallback
            cached["estimate_ms"] = parse_profile_ms(folder / "work" / "compiler_profile_0.txt", chip_mhz(chip))
        return PieceResult(spec.name, folder, folder / cached["bmodel"], cached, True, time.monotonic() - t0)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE).unlink(missing_ok=True)
    runs_before = len(tools.runs)
    work = folder / "work"
    name = spec.net_name
    mlir = work / f"{name}.mlir"
    top = work / f"{name}_top.npz"
    inputs = folder / "in.npz"
    done_t = folder / "transform.done"
    marker_t = {"key": key, "check": check}
    reuse_t = False
    if done_t.is_file() and mlir.is_file():
        try:
            prev = json.loads(done_t.read_text())
            reuse_t = prev.get("key") == key and (prev.get("check") or not check) and (top.is_file() or not check) \
                and ((work / rebind.weight_npz_name(name)).is_file() or prev.get("weights") is False)
        except (OSError, ValueError):
            reuse_t = False
    if not reuse_t:
        done_t.unlink(missing_ok=True)
        (folder / "transform_check.json").unlink(missing_ok=True)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        import numpy as np

        samples = spec.sample_inputs(0)
        with open(inputs.with_suffix(".tmp.npz"), "wb") as f:
            np.savez(f, **samples)
        os.replace(inputs.with_suffix(".tmp.npz"), inputs)
        how = _transform(spec, Path(onnx).resolve(), plan, tools, check, folder, samples, toolchain)
        # a graph without tensors has no weight npz (rebind.make_template); a resumed build must not wait for one
        write_json_atomic(done_t, {**marker_t, "how": how, "weights": (work / rebind.weight_npz_name(name)).is_file()})

    bmodel_tmp = work / f"{name}.bmodel"
    for stale in (bmodel_tmp, work / "compiler_profile_0.txt"):
        stale.unlink(missing_ok=True)
    dargs = ["--mlir", mlir.name, *deploy_args(plan, chip), "--model", bmodel_tmp.name]
    f32_in = [n for n in plan.options.get("f32_inputs", []) if n in {t.name for t in spec.inputs}]
    if f32_in:
        ops = f32_ops_from_inputs(mlir.read_text(errors="replace"), f32_in)
        if ops:
            (work / "qtable.txt").write_text("".join(f"{op} F32\n" for op in ops))
            dargs += ["--quantize_table", "qtable.txt"]
    if check:
        # Reference = the top MLIR's own results (top npz), not a separate ONNX Runtime
        # run: the npz holds the tensors under the names the compiler gives them (an ORT
        # run names outputs differently), model_transform has already checked top vs
        # ONNX Runtime on these inputs, and model_deploy then checks
        #   quantised MLIR vs top (our --tolerance: the quantisation error) and
        #   bmodel on the chip simulator vs quantised MLIR (its own 0.99 cosine),
        # so the chain ONNX -> top -> quantised -> simulated bmodel is checked link by link.
        tol = f"{plan.tolerance[0]},{plan.tolerance[1]}"
        dargs += ["--test_input", f"{name}_in_f32.npz", "--test_reference", top.name, "--tolerance", tol]
    tools.run("model_deploy", dargs, work, folder / "deploy.log", spec.name)
    if not bmodel_tmp.is_file():
        raise FluxcError(f"{spec.name}: model_deploy reported success but wrote no {bmodel_tmp.name}; "
                         f"see {folder / 'deploy.log'}")

    similarity: dict[str, Any] = {}
    if check:
        sims = deploy_similarities((folder / "deploy.log").read_text(errors="replace"))
        ts = _transform_similarity(folder)
        similarity = {"onnx_vs_top": _sim_dict(ts), "quantized": _sim_dict(sims.get("quantized")),
                      "simulator": _sim_dict(sims.get("simulator"))}
        q = sims.get("quantized")
        if q is None or sims.get("simulator") is None:
            raise FluxcError(f"{spec.name}: could not find the similarity figures in {folder / 'deploy.log'}; "
                             f"is this TPU-MLIR version supported?")
        if q.cosine < plan.tolerance[0] or q.euclidean < plan.tolerance[1]:
            raise FluxcError(f"{spec.name}: {plan.quantize} similarity cos {q.cosine:.4f} / euclid "
                             f"{q.euclidean:.4f} below the threshold {plan.tolerance}; log {folder / 'deploy.log'}")

    estimate = parse_profile_ms(work / "compiler_profile_0.txt", chip_mhz(chip))
    final = folder / f"{spec.name}.bmodel"
    os.replace(bmodel_tmp, final)
    info_text = tools.info(final, work, folder / "info.log", spec.name)
    info = parse_info(info_text)
    data = {
        "format": BUILD_FORMAT, "piece": spec.name, "net_name": name, "key": key,
        "bmodel": final.name, "quantize": plan.quantize, "options": plan.options,
        "tolerance": list(plan.tolerance), "checked": check, "similarity": similarity or None,
        "estimate_ms": estimate,
        "memory": {"device": info.device_mem, "weight": info.weight, "instruct": info.instruct,
                   "runtime": info.runtime},
        "info": info.to_dict(), "seconds": round(time.monotonic() - t0, 2),
    }
    if (folder / "fold.json").is_file():  # this piece was transformed for real (not rebound)
        data["fold"] = json.loads((folder / "fold.json").read_text())
    if not keep:
        final.unlink()
        data["bmodel_kept"] = False
    write_json_atomic(folder / "result.json", data)
    # The big intermediates (float and quantised weights as npz, deploy's MLIRs) are not
    # needed any more: the top MLIR stays (small); a rebuild reruns the transform or rebinds.
    for p in work.glob("*weight*.npz"):
        p.unlink(missing_ok=True)
    for p in work.glob(f"{name}_*.mlir"):
        p.unlink(missing_ok=True)
    write_text_atomic(folder / COMPLETE, key + "\n")
    return PieceResult(spec.name, folder, final, data, False, time.monotonic() - t0, tools.runs[runs_before:])
