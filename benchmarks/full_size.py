"""Full-size FLUX.1 on this machine: `fluxc export` then two `fluxc compile` builds, with wall
time, peak RSS of the whole process tree and peak disk use per stage.

Stages (each one a `fluxc` subprocess; run in this order):

    checkpoint      fluxc tiny CHECKPOINT --preset full --flux-type dev   (only if CHECKPOINT holds no model)
    export          fluxc export CHECKPOINT --height 1024 --width 1024 --t5-seq-len 512 --tiny-vae CHECKPOINT/tiny_vae
    compile_w4bf16  fluxc compile --quantize W4BF16 --tiny-vae            (one chip, as on an SE7-32)
    compile_bf16    fluxc compile --quantize BF16 --num-devices 3

Measured per stage:
- wall_s: the subprocess's wall time (summed over attempts if a killed run was restarted);
- peak_rss_gb: the highest sum of RSS over fluxc and all its descendants (psutil, sampled every
  0.5 s), and ru_maxrss_gb, the direct child's own high-water mark (os.wait4; a floor);
- peak_disk_gb: the highest drop of free space (statvfs, sampled) on the work folder's disk since
  the harness started (so it includes the export's ONNX while compiling); the disk is shared,
  so other processes' writes count too: du_gb gives the exact size of the workspace and
  build folders at the end of the stage;
- per piece kind (compile stages): the tools' peak RSS per piece (processes whose working folder
  is the piece's build folder), build seconds and estimated on-chip ms from compile_report.json.

Results: benchmarks/results/full_size.json (--results to change), keys commit, machine, and for
w4bf16 and bf16: export_compile_wall_s, peak_rss_gb, peak_disk_gb, device_mem_mb (one per chip,
from the compile report), est_step_s (compile_report.json estimate_ms.denoising_step_ms / 1000),
plus the per-stage figures. The file is rewritten after every stage.

Resumable: a stage whose output is complete (export manifest complete, compile_report.json
present) and whose figures are recorded is skipped; a stage killed half-way is run again (fluxc
itself resumes: unchanged pieces are reused) and its attempts are summed (wall) or maxed (peaks).

    .venv/bin/python benchmarks/full_size.py /work/fullsize/FLUX.1-dev --work /work/fullsize/run
    .venv/bin/python benchmarks/full_size.py --tiny --work /tmp/fs-tiny     # plumbing check only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from fluxc.export.manifest import load_manifest
from fluxc.runtime.device_memory import io_bytes_per_device

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "full_size.json"
FULL_SIZE = {"height": 1024, "width": 1024, "t5_seq_len": 512}
TINY_SIZE = {"height": 128, "width": 128, "t5_seq_len": 32}  # as the tests' exports
BUILDS = {  # result key -> (stage, compile arguments)
    "w4bf16": ("compile_w4bf16", ["--quantize", "W4BF16", "--tiny-vae"]),
    "bf16": ("compile_bf16", ["--quantize", "BF16", "--num-devices", "3"]),
}
SAMPLE_S = 0.5
GB = 1e9
MB = 1 << 20
_PIECE_DIR = re.compile(r"/pieces/([A-Za-z0-9_]+?)-[0-9a-f]{16}(?:/|$)")


# ------------------------------------------------------------------------------ measuring
class Sampler(threading.Thread):
    """Samples the RSS of a process tree and the free space of a disk until stopped."""

    def __init__(self, pid: int, disk: Path, free_at_start: int):
        super().__init__(daemon=True)
        self.pid, self.disk, self.free0 = pid, disk, free_at_start
        self.peak_rss = 0
        self.min_free = shutil.disk_usage(disk).free
        self.piece_rss: dict[str, int] = {}
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._done.is_set():
            total, per_piece = 0, {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    m = _PIECE_DIR.search(p.cwd() + "/")
                    if m:
                        per_piece[m.group(1)] = per_piece.get(m.group(1), 0) + rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.peak_rss = max(self.peak_rss, total)
            for k, v in per_piece.items():
                self.piece_rss[k] = max(self.piece_rss.get(k, 0), v)
            try:
                self.min_free = min(self.min_free, shutil.disk_usage(self.disk).free)
            except OSError:
                pass
            self.samples += 1
            self._done.wait(SAMPLE_S)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def run_measured(cmd: list[str], log: Path, disk: Path, free0: int) -> dict:
    """Run cmd (output appended to log); wall time, tree peak RSS, ru_maxrss, disk peak. It runs
    in the work folder, not the repository, so `python -m fluxc.cli` imports the installed fluxc
    (a plain `pip install .` too), not the source tree's half of it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {subprocess.list2cmdline(cmd)}\n")
        f.flush()
        stage_free0 = shutil.disk_usage(disk).free
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=disk, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "COLUMNS": "160"})
        sampler = Sampler(proc.pid, disk, free0)
        sampler.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
    return {
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(max(sampler.peak_rss, ru.ru_maxrss * 1024) / GB, 3),
        "ru_maxrss_gb": round(ru.ru_maxrss * 1024 / GB, 3),
        "peak_disk_gb": round(max(0, free0 - sampler.min_free) / GB, 3),
        "stage_peak_disk_gb": round(max(0, stage_free0 - sampler.min_free) / GB, 3),
        "rss_samples": sampler.samples,
        "piece_peak_rss_gb": {k: round(v / GB, 3) for k, v in sorted(sampler.piece_rss.items())},
    }


def du_bytes(*paths: Path, exclude: Path | None = None) -> int:
    """Bytes the files under paths take on disk, each inode once, leaving out the inodes of the
    files under `exclude` (the checkpoint: the export's onnx/weights/ are hard links into it and
    cost no space)."""
    skip = set()
    if exclude is not None and exclude.exists():
        for dirpath, _, files in os.walk(exclude):
            for name in files:
                try:
                    skip.add(os.lstat(os.path.join(dirpath, name)).st_ino)
                except OSError:
                    pass
    total = 0
    for root in paths:
        if not root.exists():
            continue
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if st.st_ino in skip:
                    continue
                skip.add(st.st_ino)
                total += st.st_blocks * 512
    return total


# ------------------------------------------------------------------------------ reading results
def piece_kind(name: str) -> str:
    """dev_trans_block_7 -> dev_trans_block; t5_head -> t5_head."""
    return re.sub(r"_\d+$", "", name)


def by_kind(report: dict, piece_rss: dict[str, float]) -> dict:
    kinds: dict[str, dict] = {}
    for name, p in report.get("pieces", {}).items():
        k = kinds.setdefault(piece_kind(name), {"count": 0, "cache_hits": 0, "build_s": 0.0, "estimate_ms": 0.0,
                                                "tool_peak_rss_gb": None, "device_mb": 0.0})
        k["count"] += 1
        k["cache_hits"] += bool(p.get("cache_hit"))
        k["build_s"] = round(k["build_s"] + float(p.get("build_seconds") or p.get("seconds") or 0), 1)
        k["estimate_ms"] = round(k["estimate_ms"] + float(p.get("estimate_ms") or 0), 4)
        if name in piece_rss:  # sampled only for pieces built in this run (not cache hits)
            k["tool_peak_rss_gb"] = max(k["tool_peak_rss_gb"] or 0.0, piece_rss[name])
        k["device_mb"] = round(k["device_mb"] + (p.get("memory") or {}).get("device", 0) / MB, 2)
    return kinds


def device_mem_mb(report: dict, export_dir: Path | None = None) -> tuple[list[float], str]:
    """Device memory per chip from a compile (or estimate-only) report, and where it comes from."""
    dm = report.get("device_memory")
    if isinstance(dm, dict) and dm.get("chips"):  # a full build: model_tool of the combined files + I/O
        return ([round(float(c["total_mb"]), 1) for c in dm["chips"]],
                "compile_report.json device_memory: model_tool --info of the combined bmodels (weight + "
                "instructions + runtime) plus the I/O tensors the sail runtime allocates")
    if isinstance(dm, list) and dm and export_dir is not None:  # --estimate-only: per-piece model_tool
        man = load_manifest(export_dir)
        by_piece = {s.name: s for s in man.specs}
        where = {by_piece[p].net_name: c["device"] for c in dm for p in c["pieces"]}
        specs = {s.net_name: s for s in man.specs if s.net_name in where}
        io = io_bytes_per_device(specs, where)
        return ([round(c["modeled_mb"] + io.get(c["device"], 0) / MB, 1) for c in dm],
                "estimate_report.json: every piece compiled and measured by model_tool --info (bmodels not kept: "
                "the disk holds one build), summed per chip as the combined files hold them (weight + "
                "instructions + the largest runtime area), plus the I/O tensors the sail runtime allocates")
    return [], "no device memory figure in the report"


def git_commit() -> dict:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "mem_gb": round(psutil.virtual_memory().total / GB, 1), "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


# ------------------------------------------------------------------------------ stages
def export_complete(out: Path, size: dict) -> bool:
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    o = m.get("options", {})
    return m.get("complete") is True and (o.get("height"), o.get("width"), o.get("t5_seq_len")) == \
        (size["height"], size["width"], size["t5_seq_len"])


def report_path(out: Path) -> Path:
    """compile_report.json of a build, or estimate_report.json of an --estimate-only one."""
    full = out / "compile_report.json"
    return full if full.is_file() else out / "estimate_report.json"


def compile_complete(out: Path) -> bool:
    return report_path(out).is_file()


def combine_attempts(old: dict | None, new: dict) -> dict:
    """Figures of a stage run again after an interruption: walls add up, peaks take the max."""
    if not old:
        return {**new, "attempts": 1}
    out = dict(new)
    out["attempts"] = old.get("attempts", 1) + 1
    out["wall_s"] = round(old.get("wall_s", 0) + new["wall_s"], 1)
    for k in ("peak_rss_gb", "ru_maxrss_gb", "peak_disk_gb", "stage_peak_disk_gb"):
        out[k] = max(old.get(k, 0), new[k])
    pr = dict(old.get("piece_peak_rss_gb", {}))
    for k, v in new.get("piece_peak_rss_gb", {}).items():
        pr[k] = max(pr.get(k, 0), v)
    out["piece_peak_rss_gb"] = pr
    return out


def write_results(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, path)


def summarise(res: dict) -> None:
    st = res["stages"]
    for key, (stage, _) in BUILDS.items():
        if stage not in st or not st[stage].get("complete") or not st.get("export", {}).get("complete"):
            continue
        e, c = st["export"], st[stage]
        res[key] = {
            "export_compile_wall_s": round(e["wall_s"] + c["wall_s"], 1),
            "peak_rss_gb": max(e["peak_rss_gb"], c["peak_rss_gb"]),
            "peak_disk_gb": max(e["peak_disk_gb"], c["peak_disk_gb"]),
            "device_mem_mb": c["device_mem_mb"],
            "device_mem_source": c["device_mem_source"],
            "est_step_s": c["est_step_s"],
            "export": {k: e[k] for k in ("wall_s", "peak_rss_gb", "ru_maxrss_gb", "peak_disk_gb", "du_gb")},
            "compile": {k: c[k] for k in ("wall_s", "peak_rss_gb", "ru_maxrss_gb", "peak_disk_gb",
                                          "stage_peak_disk_gb", "du_gb", "tool_runs")},
            "by_piece_kind": c["by_piece_kind"],
            "estimate_only": c.get("estimate_only", False),
            "checked": c.get("checked"),
            "probe_checks": c.get("probe_checks"),
            "estimate_ms": c.get("estimate_ms"),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example: .venv/bin/python benchmarks/full_size.py /work/fullsize/FLUX.1-dev "
                                        "--work /work/fullsize/run")
    ap.add_argument("checkpoint", nargs="?", type=Path,
                    help="full-size FLUX.1 folder (e.g. from `fluxc tiny DIR --preset full --flux-type dev`)")
    ap.add_argument("--work", type=Path, help="folder for the workspace (ONNX, bmodels) and build cache")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"results JSON (default: {RESULTS.relative_to(REPO)}; with --tiny: <work>/full_size_tiny.json)")
    ap.add_argument("--tiny", action="store_true",
                    help="plumbing check: sizes 128x128 / T5 32; builds a sharded tiny dev checkpoint if none is given")
    ap.add_argument("--builds", default="w4bf16,bf16", help="which compiles to run (comma list of w4bf16, bf16)")
    ap.add_argument("--build-dir", type=Path, default=None, help="compile cache (default: <work>/build)")
    ap.add_argument("--jobs", type=int, default=None, help="passed to fluxc compile --jobs")
    ap.add_argument("--estimate-only", default="",
                    help="builds compiled with fluxc compile --estimate-only (every piece compiled and measured, "
                         "no bmodel kept), e.g. bf16 when the disk cannot hold both builds")
    ap.add_argument("--reference-forms", default="",
                    help="after the builds, also compile one full-size block of these kinds (single,double) in the "
                         "reference's graph form (strided-slice rotary; benchmarks/graph_forms.py, BF16) for its "
                         "estimated step time")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite BENCHMARKS.md's Full size section from the results JSON")
    a = ap.parse_args(argv)

    if a.render:
        rp = a.results or RESULTS
        res = json.loads(rp.read_text())
        st = res.get("stages", {})
        if st.get("export") and not st["export"].get("du_fixed"):
            # runs measured before du_bytes left out the checkpoint's hard links counted them (and
            # the combined files twice): the export is recounted; the compile stages' du is dropped
            export_dir = Path(res["work"]) / "ws" / "onnx"
            st["export"].update(du_gb=round(du_bytes(export_dir, exclude=Path(res["checkpoint"])) / GB, 3),
                                du_fixed=True)
            for name in ("compile_w4bf16", "compile_bf16"):
                if name in st:
                    st[name].update(du_gb=None, du_fixed=True)
            for key, (stage, _) in BUILDS.items():
                if res.get(key):
                    res[key]["export"]["du_gb"] = st["export"]["du_gb"]
                    res[key]["compile"]["du_gb"] = None
        implied_tflops(res)
        res["reference_form_step_s"] = reference_form_step_s(res)
        write_results(rp, res)
        render_benchmarks_md(res)
        return 0
    if a.work is None:
        ap.error("--work is required (except with --render)")
    builds = [b.strip() for b in a.builds.split(",") if b.strip()]
    estimate_only = {b.strip() for b in a.estimate_only.split(",") if b.strip()}
    if not builds or any(b not in BUILDS for b in builds):
        ap.error(f"--builds: choose from {', '.join(BUILDS)}")
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fluxc = [sys.executable, "-m", "fluxc.cli"]
    ckpt = a.checkpoint
    if ckpt is None:
        if not a.tiny:
            ap.error("give the full-size checkpoint folder (or --tiny)")
        ckpt = work / "tiny-dev"
        if not (ckpt / "model_index.json").is_file():
            subprocess.run([*fluxc, "tiny", str(ckpt), "--flux-type", "dev", "--sharded", "--force"], cwd=work,
                           check=True)
    ckpt = ckpt.resolve()
    write_ckpt = not a.tiny and not (ckpt / "model_index.json").is_file()
    size = TINY_SIZE if a.tiny else FULL_SIZE
    results_path = a.results or (work / "full_size_tiny.json" if a.tiny else RESULTS)
    ws = work / "ws"
    export_dir = ws / "onnx"
    build_dir = (a.build_dir or work / "build").resolve()
    log = work / "full_size.log"
    state_path = work / "full_size.state.json"

    try:
        state = json.loads(state_path.read_text())
        if state.get("checkpoint") != str(ckpt) or state.get("size") != size:
            state = {}
    except (OSError, ValueError):
        state = {}
    if not state:
        state = {"checkpoint": str(ckpt), "size": size, "free_at_start": shutil.disk_usage(work).free,
                 "stages": {}}
    free0 = state["free_at_start"]
    res = {**git_commit(), "machine": machine(), "checkpoint": str(ckpt),
           "checkpoint_gb": round(du_bytes(ckpt) / GB, 2), "tiny": a.tiny, "size": size,
           "work": str(work), "build_dir": str(build_dir), "stages": state["stages"]}

    def save() -> None:
        write_json(state_path, state)
        summarise(res)
        write_results(results_path, res)

    # ---- checkpoint (only when the given folder does not hold one yet; ~34 GB)
    st = state["stages"]
    if write_ckpt:
        cmd = [*fluxc, "tiny", str(ckpt), "--preset", "full", "--flux-type", "dev", "--force"]
        print(f"checkpoint: {' '.join(cmd[3:])}", flush=True)
        m = run_measured(cmd, log, work, free0)
        m["du_gb"] = round(du_bytes(ckpt) / GB, 3)
        m["complete"] = m["returncode"] == 0 and (ckpt / "model_index.json").is_file()
        st["checkpoint"] = m
        res["checkpoint_gb"] = m["du_gb"]
        state["free_at_start"] = free0 = shutil.disk_usage(work).free  # the export's disk figure starts here
        save()
        if not m["complete"]:
            print(f"writing the checkpoint failed (exit {m['returncode']}); see {log}", flush=True)
            return 1

    # ---- export
    if st.get("export", {}).get("complete") and export_complete(export_dir, size):
        print("export: complete, skipped", flush=True)
    else:
        tiny_vae = ckpt / "tiny_vae"
        cmd = [*fluxc, "export", str(ckpt), "--out", str(export_dir), "--height", str(size["height"]),
               "--width", str(size["width"]), "--t5-seq-len", str(size["t5_seq_len"])]
        if tiny_vae.is_dir():
            cmd += ["--tiny-vae", str(tiny_vae)]
        print(f"export: {' '.join(cmd[3:])}", flush=True)
        m = run_measured(cmd, log, work, free0)
        m["du_gb"] = round(du_bytes(export_dir, exclude=ckpt) / GB, 3)
        m["complete"] = m["returncode"] == 0 and export_complete(export_dir, size)
        st["export"] = combine_attempts(st.get("export") if not st.get("export", {}).get("complete") else None, m)
        save()
        if not m["complete"]:
            print(f"export failed (exit {m['returncode']}); see {log}", flush=True)
            return 1
        print(f"export: {m['wall_s']:.0f} s, peak RSS {m['peak_rss_gb']:.2f} GB", flush=True)

    # ---- compiles
    for key in builds:
        stage, args = BUILDS[key]
        out = ws / f"BM1684X_{key}"
        if st.get(stage, {}).get("complete") and compile_complete(out):
            print(f"{stage}: complete, skipped", flush=True)
            continue
        cmd = [*fluxc, "compile", str(export_dir), "--models", str(ws), "--out", str(out), "--build-dir",
               str(build_dir), *args]
        if a.jobs:
            cmd += ["--jobs", str(a.jobs)]
        if key in estimate_only:
            cmd += ["--estimate-only"]
        print(f"{stage}: {' '.join(cmd[3:])}", flush=True)
        m = run_measured(cmd, log, work, free0)
        m["du_gb"] = round(du_bytes(ws, build_dir, exclude=ckpt) / GB, 3)
        m["complete"] = m["returncode"] == 0 and compile_complete(out)
        if m["complete"]:
            report = json.loads(report_path(out).read_text())
            try:
                mem, source = device_mem_mb(report, export_dir)
            except Exception as e:  # the stage's own figures are kept; --render can recompute this one
                mem, source = [], f"device memory not computed: {type(e).__name__}: {e}"
            step = (report.get("estimate_ms") or {}).get("denoising_step_ms")
            m.update(device_mem_mb=mem, device_mem_source=source,
                     est_step_s=None if step is None else round(step / 1000, 4),
                     tool_runs=report.get("tool_runs"), estimate_ms=report.get("estimate_ms"),
                     estimate_only=bool(report.get("estimate_only")), checked=report.get("checked"),
                     probe_checks=report.get("probe_checks"))
        prev = st.get(stage) if not st.get(stage, {}).get("complete") else None
        st[stage] = combine_attempts(prev, m)
        if m["complete"]:
            st[stage]["by_piece_kind"] = by_kind(report, st[stage]["piece_peak_rss_gb"])
            # each piece's own build seconds (benchmarks/cluster_scaling.py places them on nodes)
            st[stage]["piece_build_s"] = {n: round(float(p.get("build_seconds") or p.get("seconds") or 0), 1)
                                          for n, p in report.get("pieces", {}).items() if not p.get("cache_hit")}
        save()
        if not m["complete"]:
            print(f"{stage} failed (exit {m['returncode']}); see {log}", flush=True)
            return 1
        print(f"{stage}: {m['wall_s']:.0f} s, peak RSS {m['peak_rss_gb']:.2f} GB, "
              f"device {st[stage]['device_mem_mb']} MB, est. step {st[stage]['est_step_s']} s", flush=True)
    # ---- the reference's graph form at full size (one block per kind, BF16, estimate only)
    forms = st.setdefault("reference_forms", {})
    for block in [b.strip() for b in a.reference_forms.split(",") if b.strip()]:
        if forms.get(block, {}).get("estimate_ms") is not None:
            print(f"reference form, {block} block: recorded, skipped", flush=True)
            continue
        cmd = [sys.executable, str(REPO / "benchmarks" / "graph_forms.py"), "--block", block, "--forms", "slices",
               "--t5-len", str(size["t5_seq_len"]), "--size", str(size["height"])]
        print(f"reference form, {block} block: {' '.join(cmd[1:])}", flush=True)
        start = log.stat().st_size if log.exists() else 0
        m = run_measured(cmd, log, work, free0)
        with open(log, "rb") as f:
            f.seek(start)
            hit = re.findall(rb"estimate ([\d.]+) ms", f.read())
        m["estimate_ms"] = float(hit[-1]) if hit and m["returncode"] == 0 else None
        m["form"] = "slices (strided-slice rotary, as sophon-demo), BF16"
        forms[block] = m
        save()
    save()
    print(f"results: {results_path}", flush=True)
    return 0


# ------------------------------------------------------------------------------ BENCHMARKS.md
BENCHMARKS = REPO / "BENCHMARKS.md"
SECTION = "## Full size (issue 8)"
STEP_TFLOP = 74.6  # one 1024x1024 step of the 12B transformer (issue 8; the cost model's own count)
CHIP_TFLOPS = 16.0  # BM1684X BF16 peak: an estimate implying more is wrong
BUDGET_MB = 12335  # SE7-32 with the reference's memory setting
GOALS = {"export_compile_wall_s": 7200, "peak_rss_gb": 12, "peak_disk_gb": 45}


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def reference_form_step_s(res: dict) -> float | None:
    """The reference's graph form (strided-slice rotary), BF16: head + 19 double + 38 single +
    tail, with the blocks measured in that form and head/tail from the BF16 build."""
    rf = res.get("stages", {}).get("reference_forms", {})
    kinds = (res.get("bf16") or {}).get("by_piece_kind") or {}
    d, s_ = (rf.get("double") or {}).get("estimate_ms"), (rf.get("single") or {}).get("estimate_ms")
    head = next((k for k in kinds if k.endswith("_head") and not k.startswith(("clip", "t5"))), None)
    tail = next((k for k in kinds if k.endswith("_tail") and not k.startswith(("clip", "t5"))), None)
    if d is None or s_ is None or head is None or tail is None:
        return None
    return round((kinds[head]["estimate_ms"] + 19 * d + 38 * s_ + kinds[tail]["estimate_ms"]) / 1000, 4)


_FLOPS = re.compile(r"flops:\s*(\d+),\s*runtime:\s*([0-9.]+)\s*ms")


def implied_tflops(res: dict) -> None:
    """Per build and piece kind, the highest TFLOPS a piece's estimate implies: the compiler's own
    FLOP count (last line of compiler_profile_0.txt; the same graph has the same count in every
    build, so a piece whose folder is gone takes it from the other build) over the piece's
    estimate in that build. Above the chip's 16 the estimate is wrong and is flagged."""
    reports, flops = {}, {}
    for key in BUILDS:
        try:
            reports[key] = json.loads(report_path(Path(res["work"]) / "ws" / f"BM1684X_{key}").read_text())
        except (OSError, ValueError, KeyError):
            continue
        for name, p in reports[key].get("pieces", {}).items():
            prof = Path(p.get("build_dir", "")) / "work" / "compiler_profile_0.txt"
            try:
                hit = _FLOPS.findall(prof.read_text(errors="replace"))
            except OSError:
                continue
            if hit:
                flops[name] = int(hit[-1][0])
    for key, report in reports.items():
        if not res.get(key):
            continue
        kinds: dict[str, dict] = {}
        for name, p in report.get("pieces", {}).items():
            ms = p.get("estimate_ms")
            if name not in flops or not ms:
                continue
            tf = flops[name] / (float(ms) * 1e-3) / 1e12
            k = kinds.setdefault(piece_kind(name), {"max_tflops": 0.0, "piece": None, "gflop": 0.0})
            k["gflop"] = round(k["gflop"] + flops[name] / 1e9, 3)
            if tf > k["max_tflops"]:
                k.update(max_tflops=round(tf, 3), piece=name)
        for k in kinds.values():
            k["above_chip_peak"] = k["max_tflops"] > CHIP_TFLOPS
        res[key]["implied_tflops"] = kinds


def render_benchmarks_md(res: dict, path: Path = BENCHMARKS) -> None:
    """Rewrite BENCHMARKS.md's Full size section from the results JSON (nothing typed by hand)."""
    st = res.get("stages", {})
    m = res.get("machine", {})
    L = [SECTION, "",
         f"FLUX.1-dev with random weights at the published sizes ({res.get('checkpoint_gb')} GB bf16 checkpoint, "
         f"written by `fluxc tiny --preset full`), exported at {res['size']['height']}x{res['size']['width']} / "
         f"T5 {res['size']['t5_seq_len']} with the tiny VAE, then compiled W4BF16 for one chip and BF16 over "
         "3 chips, all by `benchmarks/full_size.py` in one run. Commit "
         f"`{res.get('commit', '?')[:10]}`{' (uncommitted changes!)' if res.get('dirty') else ''}; machine: "
         f"{m.get('usable_cpus')} cores, {m.get('mem_gb')} GB RAM, load average at start "
         f"{m.get('load_avg_at_start')}. Figures: `benchmarks/results/full_size.json`. Reproduce:",
         "", "    .venv/bin/python benchmarks/full_size.py /work/fullsize/FLUX.1-dev --work /work/fullsize/run2 \\",
         "        --estimate-only bf16 --reference-forms single,double", "",
         "Peak RSS is the whole process tree's (fluxc and every TPU-MLIR tool it runs, sampled every 0.5 s); "
         "peak disk is the largest drop of free space on the work disk since the export started (the "
         "checkpoint itself not counted).", ""]
    L += ["| stage | complete | attempts | wall (all attempts) | peak RSS | peak disk |", "|---|---|---|---|---|---|"]
    for name in ("checkpoint", "export", "compile_w4bf16", "compile_bf16"):
        if name in st:
            x = st[name]
            L.append(f"| {name}{' (--estimate-only)' if x.get('estimate_only') else ''} | "
                     f"{'yes' if x.get('complete') else 'no (exit ' + str(x.get('returncode')) + ')'} | {x.get('attempts', 1)} | "
                     f"{_f(x.get('wall_s'), '{:.0f} s')} | {_f(x.get('peak_rss_gb'), '{:.2f} GB')} | "
                     f"{_f(x.get('peak_disk_gb'), '{:.2f} GB')} |")
    L.append("")
    w = res.get("w4bf16")
    if w:
        L += ["**Goal, W4BF16 (export + compile in one run):**", "",
              "| figure | measured | goal | |", "|---|---|---|---|"]
        for k, unit in (("export_compile_wall_s", "s"), ("peak_rss_gb", "GB"), ("peak_disk_gb", "GB")):
            v = w.get(k)
            L.append(f"| {k} | {_f(v, '{:.1f}')} {unit} | {GOALS[k]} {unit} | "
                     f"{'met' if v is not None and v <= GOALS[k] else '**not met**'} |")
        L.append("")
    L += ["**Device memory and estimated time per step** (device memory: weights + instructions + runtime "
          "area + the I/O tensors the sail runtime allocates, per chip; time: TPU-MLIR's cost model summed "
          f"over the pieces one step runs, not a board measurement; a step is {STEP_TFLOP} TFLOP):", "",
          "| build | device memory per chip (MB) | against the SE7-32's 12,335 MB | est. step | implied TFLOPS |",
          "|---|---|---|---|---|"]
    for key in ("w4bf16", "bf16"):
        b = res.get(key)
        if not b:
            continue
        mem = b.get("device_mem_mb") or []
        fits = "fits" if mem and max(mem) <= BUDGET_MB else ("**does not fit**" if mem else "-")
        step = b.get("est_step_s")
        tf = STEP_TFLOP / step if step else None
        L.append(f"| {key} | {', '.join(f'{x:,.0f}' for x in mem) or '-'} | {fits} | {_f(step, '{:.3f} s')} | "
                 f"{_f(tf, '{:.1f}')}{' (above the chip peak: mis-estimated)' if tf and tf > CHIP_TFLOPS else ''} |")
    ref = reference_form_step_s(res)
    if ref:
        L.append(f"| bf16, the reference's graph form (strided-slice rotary) | - | - | {ref:.3f} s | "
                 f"{STEP_TFLOP / ref:.1f} |")
    L.append("")
    for key in ("w4bf16", "bf16"):
        b = res.get(key)
        if b:
            L += [f"Where the device figures of {key} come from: {b.get('device_mem_source')}.", ""]
    for key in ("w4bf16", "bf16"):
        b = res.get(key)
        if not b or not b.get("by_piece_kind"):
            continue
        tfl = b.get("implied_tflops") or {}
        L += [f"Per piece kind, {key} (implied TFLOPS: the compiler's FLOP count over its estimate, highest piece "
              "of the kind; above 16 the estimate is wrong):", "",
              "| kind | pieces | cache hits | build s (sum) | tool peak RSS | estimate ms (sum) | implied TFLOPS | "
              "device MB (sum) |", "|---|---|---|---|---|---|---|---|"]
        for k, v in b["by_piece_kind"].items():
            t = tfl.get(k, {})
            tf = "-" if not t else (f"{t['max_tflops']:.2f}" + (" **above the chip's peak: estimate wrong**"
                                                                 if t.get("above_chip_peak") else ""))
            L.append(f"| {k} | {v['count']} | {v['cache_hits']} | {v['build_s']:.0f} | "
                     f"{_f(v.get('tool_peak_rss_gb'), '{:.2f} GB')} | {v['estimate_ms']:.3f} | {tf} | "
                     f"{v['device_mb']:.0f} |")
        L.append("")
        e = b.get("estimate_ms") or {}
        if e:
            L += [f"Estimates, {key}: step {e.get('denoising_step_ms')} ms, T5 {e.get('t5_ms')} ms, CLIP "
                  f"{e.get('clip_ms')} ms, VAE {e.get('vae_ms')} ms.", ""]
        pc = b.get("probe_checks") or {}
        if pc:
            L += [f"Checked, {key}: {b.get('checked')}", "", "| probe piece | quantize | similarity | tolerance |",
                  "|---|---|---|---|"]
            for n, v in pc.items():
                sim = v.get("similarity") or {}
                fig = "; ".join(f"{k} cos {x['cosine']:.5f}" for k, x in sim.items() if isinstance(x, dict)
                                and "cosine" in x)
                L.append(f"| {n} | {v.get('quantize')} | {fig or sim} | {v.get('tolerance')} |")
            L.append("")
    rf = st.get("reference_forms") or {}
    if rf:
        L += ["The reference's graph form, one full-size block each (benchmarks/graph_forms.py, BF16, 4608 tokens):", "",
              "| block | estimate | wall | peak RSS |", "|---|---|---|---|"]
        for k, v in rf.items():
            L.append(f"| {k} | {_f(v.get('estimate_ms'), '{:.1f} ms')} | {_f(v.get('wall_s'), '{:.0f} s')} | "
                     f"{_f(v.get('peak_rss_gb'), '{:.2f} GB')} |")
        L.append("")
    text = path.read_text()
    start = text.find(SECTION)
    new = "\n".join(L) + "\n"
    if start < 0:
        first = text.find("\n## ")
        text = text[:first + 1] + new + "\n" + text[first + 1:] if first >= 0 else text + "\n" + new
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + new + (text[end + 1:] if end >= 0 else "")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_results(path, obj)


if __name__ == "__main__":
    sys.exit(main())
