"""How a full-size build and a full-size verify would scale on a Ray cluster: a COMPUTATION from
measured pieces, not a cluster run.

Inputs (measured):
- benchmarks/results/full_size.json, the full-size FLUX.1-dev W4BF16 compile on this 2-core
  machine (1024x1024, T5 512, tiny VAE): each piece's peak RSS (`piece_peak_rss_gb`), build
  seconds per piece kind (`by_piece_kind`: sum and count; per piece when a newer run recorded
  `piece_build_s`), the six probe checks' seconds, the cost-model estimate per kind and the
  device memory of the combined file;
- benchmarks/results/cluster_overhead.json: the chip simulator's forward time per estimated
  chip-ms, measured on the tiny build's pieces (fluxc verify --cluster).

Placement rules, the cluster path's (fluxc/cluster/compile.py, fluxc/compile/schedule.py):
jobs in the local compile's order (probe pieces, then the pieces in manifest order); the first
piece of each (stage, kind) is the template (a real model_transform) and the other pieces of
that kind start only once it is done; each task takes 1 CPU and declares its memory; a node
runs tasks while their CPUs and memory fit (memory here: each piece's measured peak RSS);
ready tasks are placed in order on the fitting node with the most free memory. Node memory
offered to tasks: its RAM less 2 GB (object store and Ray's own processes).

Assumptions, stated: a piece takes as long on any node as it took here (one tool process per
task); where full_size.json has only a kind's total, each piece of the kind is given the kind's
mean (the template really takes longer and the rebound pieces less, so the critical path is
understated); the head's combine of the files (after the pieces) and verify's reference run on
the head are not included. Verify: every full-size piece on the simulator, one task each, the
piece's time = simulator seconds per estimated ms x its cost-model estimate (the kind's
estimate / count) + the measured fixed cost per task (load, worker start) of the tiny run;
memory = twice the combined file that holds its net (the task loads that file) + 1 GiB, as
fluxc/cluster/verify.task_memory declares.

    .venv/bin/python benchmarks/cluster_scaling.py
-> benchmarks/results/cluster_scaling.json
"""
from __future__ import annotations

import heapq
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_file import write_results  # noqa: E402

from fluxc.compile.schedule import plan_jobs  # noqa: E402  (the cluster path's order and templates)

FULL = REPO / "benchmarks" / "results" / "full_size.json"
OVERHEAD = REPO / "benchmarks" / "results" / "cluster_overhead.json"
OUT = REPO / "benchmarks" / "results" / "cluster_scaling.json"
NODE_COUNTS = (1, 2, 4, 8, 16)
NODE_TYPES = {"2 cores / 24 GB": (2, 24.0), "16 cores / 128 GB": (16, 128.0)}
RESERVED_GB = 2.0  # per node: object store and Ray's own processes
KIND_ORDER = ["clip_head", "clip_block", "clip_tail", "t5_head", "t5_block", "t5_tail", "dev_head",
              "dev_trans_block", "dev_single_trans_block", "dev_tail", "tiny_vae_decoder"]


def kind_of(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def index_of(name: str) -> int:
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else -1


def simulate(tasks: list[dict], nodes: int, cpus: int, mem_gb: float) -> dict:
    """List scheduling of `tasks` (in order; "after": the label it waits for) on `nodes` equal
    nodes. Returns the makespan, the critical path and the peak tasks at once."""
    free = [[cpus, mem_gb - RESERVED_GB] for _ in range(nodes)]
    cap = mem_gb - RESERVED_GB
    for t in tasks:
        if t["mem_gb"] > cap:
            return {"wall_s": None, "infeasible": f"{t['label']} needs {t['mem_gb']:.1f} GB, a node offers {cap:.1f}"}
    done: dict[str, float] = {}
    waiting = list(tasks)
    running: list[tuple[float, int, int, dict]] = []  # (end, seq, node, task)
    now, seq, peak = 0.0, 0, 0
    while waiting or running:
        for t in list(waiting):
            if t["after"] and t["after"] not in done:
                continue
            fits = [i for i, (c, m) in enumerate(free) if c >= 1 and m >= t["mem_gb"]]
            if not fits:
                continue
            i = max(fits, key=lambda k: free[k][1])
            free[i][0] -= 1
            free[i][1] -= t["mem_gb"]
            waiting.remove(t)
            seq += 1
            heapq.heappush(running, (now + t["s"], seq, i, t))
        peak = max(peak, len(running))
        end, _, i, t = heapq.heappop(running)
        now = end
        free[i][0] += 1
        free[i][1] += t["mem_gb"]
        done[t["label"]] = end
    # critical path: a task's own time plus its template's
    by = {t["label"]: t for t in tasks}
    crit = max(t["s"] + (by[t["after"]]["s"] if t["after"] else 0.0) for t in tasks)
    return {"wall_s": round(now, 1), "critical_path_s": round(crit, 1), "peak_tasks_at_once": peak}


def compile_tasks(full: dict) -> list[dict]:
    st = full["stages"]["compile_w4bf16"]
    peaks = st["piece_peak_rss_gb"]
    kinds = st["by_piece_kind"]
    per_piece = st.get("piece_build_s") or {}
    names = sorted(peaks, key=lambda n: (KIND_ORDER.index(kind_of(n)), index_of(n)))

    def stand_in(name):
        return SimpleNamespace(spec=SimpleNamespace(name=name, kind=kind_of(name)), weight_bytes=0)

    probes = [stand_in(n) for n in st.get("probe_checks", {})]
    pieces = [stand_in(n) for n in names]
    plans = {n: None for n in names}
    jobs = plan_jobs(probes, pieces, [], {p.spec.name: None for p in probes}, plans, Path("."), False, False)
    template: dict[tuple, str] = {}
    out = []
    for j in jobs:
        name = j.piece.spec.name
        if j.first_of_kind:
            template[j.kind] = j.label
        if j.what == "probe":
            s = st["probe_checks"][name]["seconds"]
        else:
            k = kinds[kind_of(name)]
            s = per_piece.get(name, k["build_s"] / k["count"])
        out.append({"label": j.label, "s": float(s), "mem_gb": float(peaks[name]),
                    "after": None if j.first_of_kind else template[j.kind]})
    return out


def verify_tasks(full: dict, overhead: dict) -> tuple[list[dict], dict]:
    st = full["stages"]["compile_w4bf16"]
    kinds = st["by_piece_kind"]
    rate = overhead["simulator_s_per_estimated_ms"]
    fixed = [p["wall_s"] - (p["forward_s"] or 0) for p in overhead["verify_pieces"].values()]
    fixed_s = sum(fixed) / len(fixed)
    fam_mb = {"clip": sum(kinds[k]["device_mb"] for k in kinds if k.startswith("clip")),
              "t5": sum(kinds[k]["device_mb"] for k in kinds if k.startswith("t5")),
              "transformer": st["device_mem_mb"][0] - sum(kinds[k]["device_mb"] for k in kinds
                                                           if k.startswith(("clip", "t5", "tiny_vae"))),
              "vae": kinds["tiny_vae_decoder"]["device_mb"]}

    def family(kind):
        return "clip" if kind.startswith("clip") else "t5" if kind.startswith("t5") else \
            "vae" if "vae" in kind else "transformer"

    out = []
    for name in sorted(st["piece_peak_rss_gb"], key=lambda n: (KIND_ORDER.index(kind_of(n)), index_of(n))):
        k = kinds[kind_of(name)]
        est = k["estimate_ms"] / k["count"]
        # fluxc/cluster/verify.task_memory: twice the file the task loads, plus 1 GiB
        out.append({"label": name, "s": rate * est + fixed_s, "mem_gb": 2 * fam_mb[family(kind_of(name))] / 1024 + 1.0,
                    "after": None})
    return out, {"simulator_s_per_estimated_ms": rate, "fixed_s_per_task": round(fixed_s, 2),
                 "combined_file_mb_by_family": {k: round(v, 1) for k, v in fam_mb.items()}}


def main() -> None:
    full = json.loads(FULL.read_text())
    overhead = json.loads(OVERHEAD.read_text())
    ctasks = compile_tasks(full)
    vtasks, vmodel = verify_tasks(full, overhead)
    doc = {
        "what": "COMPUTED from measured pieces (benchmarks/results/full_size.json, cluster_overhead.json) with the "
                "cluster path's placement rules; not a cluster run. See the script's docstring for the assumptions.",
        "inputs": {"full_size_commit": full.get("commit"), "cluster_overhead_commit": overhead.get("commit"),
                   "per_piece_build_s": "recorded" if full["stages"]["compile_w4bf16"].get("piece_build_s")
                   else "kind mean (full_size.json has per-kind totals only)"},
        "reserved_gb_per_node": RESERVED_GB,
        "measured_on_this_machine": {"compile_w4bf16_wall_s": full["stages"]["compile_w4bf16"]["wall_s"],
                                     "note": "one 2-core node, loaded (BENCHMARKS.md Full size)"},
        "compile_w4bf16": {"tasks": len(ctasks), "task_seconds_sum": round(sum(t["s"] for t in ctasks), 1),
                           "largest_task_gb": max(t["mem_gb"] for t in ctasks), "nodes": {}},
        "verify_every_piece_on_simulator": {"tasks": len(vtasks), "model": vmodel,
                                            "task_seconds_sum": round(sum(t["s"] for t in vtasks), 1),
                                            "largest_task_gb": round(max(t["mem_gb"] for t in vtasks), 2),
                                            "nodes": {}},
    }
    for tname, (cpus, mem) in NODE_TYPES.items():
        for key, tasks in (("compile_w4bf16", ctasks), ("verify_every_piece_on_simulator", vtasks)):
            doc[key]["nodes"][tname] = {str(n): simulate(tasks, n, cpus, mem) for n in NODE_COUNTS}
    write_results(OUT, doc)
    for key in ("compile_w4bf16", "verify_every_piece_on_simulator"):
        for tname, rows in doc[key]["nodes"].items():
            print(key, tname, {n: (r["wall_s"], r.get("critical_path_s")) for n, r in rows.items()})


if __name__ == "__main__":
    main()
