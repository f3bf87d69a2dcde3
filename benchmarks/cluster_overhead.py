"""The cluster path's overhead over a local compile, tiny build, same machine, one run.

  local:    `fluxc compile --quantize W4BF16 --flux-type schnell --tiny-vae` into an empty build
            cache (2 jobs on this 2-core machine);
  cluster:  the same into another empty cache with `--cluster ADDRESS`, on a Ray cluster of two
            nodes on this machine (ray.cluster_utils.Cluster on 127.0.0.1, 1 CPU each: the same
            two pieces at a time as the local compile);
  verify:   `fluxc verify --cluster ADDRESS --no-e2e` of the cluster build: every piece on the
            simulator as a task, with its wall time, its forward time on the simulator and
            its node; with each piece's compiler cost-model estimate (compile_report.json)
            this gives the simulator's speed that benchmarks/cluster_scaling.py uses.

Writes benchmarks/results/cluster_overhead.json: wall seconds of both compiles and their ratio
(cluster / local), the verify's per-piece figures, the machine's load before and after.

    .venv/bin/python benchmarks/cluster_overhead.py [--export DIR] [--work DIR]
Without --export it builds the tiny schnell model (tiny VAE) and exports it at 128x128, T5 32
(the test suite's sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_file import write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "cluster_overhead.json"
ARGS = ["--quantize", "W4BF16", "--flux-type", "schnell", "--tiny-vae"]
GB = 1 << 30
NODE = dict(num_cpus=1, memory=4 * GB, object_store_memory=100 * 1024 * 1024, node_ip_address="127.0.0.1")
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "COLUMNS": "200"}


def fluxc(args: list, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "fluxc.cli", *map(str, args)], cwd=REPO, stdout=f,
                            stderr=subprocess.STDOUT, env={**os.environ, **ENV}).returncode
    return round(time.perf_counter() - t0, 1), rc


def workspace(root: Path, export: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "onnx").symlink_to(export.resolve(), target_is_directory=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, help="a tiny export (default: build and export the tiny schnell model)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="fluxc-cluster-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.export:
        export = a.export
    else:
        from compile_speed import tiny_export

        export = tiny_export(work / "tiny")
    os.environ.update(ENV)
    from ray.cluster_utils import Cluster

    load_before = os.getloadavg()
    local_ws = workspace(work / "local", export)
    local_s, rc = fluxc(["compile", "--models", local_ws, "--build-dir", work / "local_build", *ARGS], work / "local.log")
    assert rc == 0, (work / "local.log").read_text()[-3000:]
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        cl_ws = workspace(work / "cluster", export)
        cl_s, rc = fluxc(["compile", "--models", cl_ws, "--build-dir", work / "cluster_build", *ARGS,
                          "--cluster", cluster.address], work / "cluster.log")
        assert rc == 0, (work / "cluster.log").read_text()[-3000:]
        rerun_s, rc = fluxc(["compile", "--models", cl_ws, "--build-dir", work / "cluster_build", *ARGS,
                             "--cluster", cluster.address], work / "rerun.log")
        assert rc == 0
        ver_s, rc = fluxc(["verify", "--models", cl_ws, "--report", work / "verify.json", "--no-e2e",
                           "--cluster", cluster.address], work / "verify.log")
        assert rc == 0, (work / "verify.log").read_text()[-3000:]
    finally:
        cluster.shutdown()
    load_after = os.getloadavg()
    rep = json.loads((work / "verify.json").read_text())
    comp = json.loads((cl_ws / "BM1684X" / "compile_report.json").read_text())
    pieces = {}
    for name, w in rep["info"]["cluster"]["pieces"].items():
        pieces[name] = {"wall_s": w["wall_s"], "forward_s": round(w["forward_s"], 4) if w.get("forward_s") else None,
                        "node": (w["node_id"] or "")[:8],
                        "estimate_ms": comp["pieces"][name]["estimate_ms"]}
    fwd = sum(p["forward_s"] or 0 for p in pieces.values())
    est = sum(p["estimate_ms"] or 0 for p in pieces.values())
    write_results(RESULTS, {
        "size": "tiny schnell, 128x128, T5 32, W4BF16 blocks, tiny VAE (the test suite's build)",
        "machine": {"cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in load_after]},
        "cluster": "ray.cluster_utils.Cluster on 127.0.0.1: head + 1 node, 1 CPU and 4 GiB (memory resource) each",
        "local_compile_s": local_s, "local_jobs": 2,
        "cluster_compile_s": cl_s, "cluster_rerun_s": rerun_s,
        "overhead_ratio": round(cl_s / local_s, 3),
        "cluster_verify_no_e2e_s": ver_s,
        "verify_pieces": pieces,
        "simulator_s_per_estimated_ms": round(fwd / est, 4) if est else None,
        "simulator_rate_note": "sum of the pieces' forward times on the simulator over the sum of their "
                               "cost-model estimates (tiny pieces: dominated by fixed costs, so an upper bound "
                               "per estimated ms at full size)",
        "one_run": True,
    })
    print(json.dumps({"local_s": local_s, "cluster_s": cl_s, "ratio": round(cl_s / local_s, 3),
                      "rerun_s": rerun_s, "verify_s": ver_s}))


if __name__ == "__main__":
    main()
