"""`fluxc compile --cluster` and `fluxc verify --cluster` on a real Ray cluster of two nodes on
this machine (ray.cluster_utils.Cluster on the loopback address; one CPU per node, small object
stores, no dashboard).

One cluster compile of the suite's tiny W4BF16 build (the transformer's 8 pieces compiled on the
cluster, the text encoders' and the VAE's found in the content-keyed cache), with the worker node
removed while a TPU-MLIR tool runs on it: the build completes (Ray retries the lost task on the
head node), no tool of the removed node survives it, and the bmodels equal the local build's
(`compiled_schnell_w4`) except for TPU-MLIR's build time. A rerun starts no task. Then verify
on the cluster passes the local build and fails a build whose one block is wrong (weights x1.25,
validation/mutants.py), naming that block. The cluster and every Ray process are gone at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures_compile import REPO, compile_into, make_workspace
from tests.test_kill import TOOLS, differing_outside_time, time_spans

W4_ARGS = ["--quantize", "W4BF16", "--flux-type", "schnell", "--tiny-vae"]
HALF = 2  # of the transformer's 8 pieces compiled on the cluster: the worker node is removed once
# these are done and a tool runs on it (mid-way)
CACHED_PREFIXES = ("clip_", "t5_", "tiny_vae")  # pieces (and templates) taken from the local build's cache
GB = 1 << 30
NODE = dict(num_cpus=1, memory=4 * GB, object_store_memory=100 * 1024 * 1024, node_ip_address="127.0.0.1")
# Ray turns 127.0.0.1 into the machine's interface address unless this is set (cluster and driver)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _ray_processes() -> list[psutil.Process]:
    """Ray's own processes started by this test process (gcs_server, raylets, workers ...)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ray" in cmd and p.status() != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        worker = cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        started = _ray_processes()  # (a process re-parented after its raylet died is not a child any more)
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        left = []
        for _ in range(100):
            left = [p for p in {q.pid: q for q in started + _ray_processes()}.values() if _alive(p.pid)]
            if not left:
                break
            time.sleep(0.1)
        names = [" ".join(p.cmdline())[:120] for p in left if _alive(p.pid)]
        for p in left:  # never leave a Ray process behind for CI, even when failing
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        assert not names, names


def _fluxc(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, **LOOPBACK_ENV, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "fluxc.cli", *map(str, args)], cwd=REPO, env=env, text=True, **kw)


def _descendant_tools(pid: int) -> dict[int, str]:
    out = {}
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for k in kids:
        try:
            cmd = " ".join(k.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(t in cmd for t in TOOLS) or "tool_launcher" in cmd:
            out[k.pid] = cmd[:160]
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


NODE_CHECK = """
import json, sys
import ray
from fluxc.cluster.connect import alive_nodes
from fluxc.cluster.node import check_all_nodes
from fluxc.errors import FluxcError
from fluxc.fsutil import sha256_file
address, export = sys.argv[1], sys.argv[2]
ray.init(address=address, log_to_driver=False)
out = {}
try:
    nodes = alive_nodes(ray)
    out["nodes"] = [n["node_id"] for n in nodes]
    for what, path, sha in (("ok", export, sha256_file(export + "/manifest.json")),
                            ("other", export, "0" * 64), ("missing", export + "/nowhere", "0" * 64)):
        try:
            out[what] = [r["node_id"] for r in check_all_nodes(ray, nodes, path, sha, None, lambda t: None)]
        except FluxcError as e:
            out[what] = "error: " + str(e)
finally:
    ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_a_node_that_cannot_read_the_export_is_named(ray_cluster, tmp_path):
    """The node check at the start of a cluster build, from a driver process of its own (as fluxc
    is): every node reads the export's manifest; a node that sees another export, or none, stops
    the build with a one-line error naming it."""
    cluster, _ = ray_cluster
    (tmp_path / "manifest.json").write_text('{"format": 1}\n')
    env = {**os.environ, **LOOPBACK_ENV}
    p = subprocess.run([sys.executable, "-c", NODE_CHECK, cluster.address, str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(line[len("RESULT "):])
    assert len(r["nodes"]) == 2 and sorted(r["ok"]) == sorted(r["nodes"]), r
    for what, words in (("other", "sees another export"), ("missing", "cannot read")):
        msg = r[what]
        assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, (what, msg)
        assert words in msg, (what, msg)
        assert all(n[:8] in msg for n in r["nodes"]), (what, msg)  # each node named


@pytest.mark.timeout(3600)
def test_cluster_compile_loses_a_node_and_equals_the_local_build(ray_cluster, compiled_schnell_w4,
                                                                 compile_build_dir, tmp_path):
    from ray._private import ray_constants

    cluster, worker = ray_cluster
    export_dir = (compiled_schnell_w4 / "onnx").resolve()
    ws = make_workspace(tmp_path / "ws", export_dir)
    # A fresh cache holding only the text encoders' and the VAE's finished pieces (copied from the
    # local build's content-keyed cache, as a user's earlier build would leave them): the
    # transformer's pieces (its templates first, then the pieces rebound from them) are compiled
    # on the cluster; suite time goes to the cluster path, not to compiling CLIP and T5 again.
    build = tmp_path / "build"
    copied = 0
    for sub in ("pieces", "templates"):
        for d in sorted((compile_build_dir / sub).glob("*")):
            if d.name.startswith(CACHED_PREFIXES) and (sub == "templates" or (d / "COMPLETE").is_file()):
                shutil.copytree(d, build / sub / d.name, symlinks=True)
                copied += sub == "pieces"
    assert copied >= 8, copied
    log = tmp_path / "compile.log"
    raylet = worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    with open(log, "w") as out:
        proc = _fluxc(["compile", "--models", ws, "--build-dir", build, *W4_ARGS, "--cluster", cluster.address],
                      stdout=out, stderr=subprocess.STDOUT)
    try:
        # mid-way: some pieces done, and a TPU-MLIR tool running on the worker node
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list(build.glob("pieces/*/COMPLETE"))) - copied
            seen = _descendant_tools(raylet) if done >= HALF else {}
            if seen:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the compile ended before a tool was caught on the worker node:\n" + log.read_text()
        assert seen, "no tool ever ran on the worker node:\n" + log.read_text()
        time.sleep(0.5)
        seen.update(_descendant_tools(raylet))
        cluster.remove_node(worker, allow_graceful=False)
        survivors = list(seen)
        for _ in range(100):  # no tool of the lost node may outlive it
            survivors = [pid for pid in seen if _alive(pid)]
            if not survivors:
                break
            time.sleep(0.1)
        assert not survivors, [seen[p] for p in survivors]
        proc.wait(timeout=3000)  # a loaded 2-core machine: the rest runs on one node, one piece at a time
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    nodes = {line.rsplit(" on node ", 1)[1].strip() for line in text.splitlines() if " on node " in line}
    assert len(nodes) == 2, nodes  # both nodes compiled pieces (the worker's before it was lost)

    ref = compiled_schnell_w4 / "BM1684X"
    names = sorted(p.name for p in ref.glob("*.bmodel"))
    assert names and names == sorted(p.name for p in (ws / "BM1684X").glob("*.bmodel"))
    for name in names:
        a, b = (ref / name).read_bytes(), (ws / "BM1684X" / name).read_bytes()
        assert len(a) == len(b) and time_spans(a), name
        assert differing_outside_time(a, b) == [], name

    # nothing changed: no task, no tool
    with open(tmp_path / "rerun.log", "w") as out:
        rerun = _fluxc(["compile", "--models", ws, "--build-dir", build, *W4_ARGS, "--cluster", cluster.address],
                       stdout=out, stderr=subprocess.STDOUT)
        rerun.wait(timeout=600)
    rtext = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, rtext[-3000:]
    assert "no task started" in rtext, rtext[-3000:]
    rep = json.loads((ws / "BM1684X" / "compile_report.json").read_text())
    assert rep["tool_runs"] == 0 and all(p["cache_hit"] for p in rep["pieces"].values())


def _verify(ws: Path, report: Path, address: str, *extra: str) -> tuple[int, str, dict]:
    p = _fluxc(["verify", "--models", ws, "--report", report, "--no-e2e", "--cluster", address, *extra],
               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=1500)
    assert report.is_file(), out[-4000:]
    return p.returncode, out, json.loads(report.read_text())


def test_cluster_verify_passes_the_build_and_fails_a_wrong_block(ray_cluster, compiled_schnell_w4, compile_build_dir,
                                                                 tmp_path):
    from fluxc.validation import mutants as mu

    cluster, _ = ray_cluster
    if len(cluster.list_all_nodes()) < 2:  # the compile test removed the worker: add one again
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
    rc, out, rep = _verify(compiled_schnell_w4, tmp_path / "good.json", cluster.address)
    assert rc == 0 and rep["ok"], out[-4000:]
    placed = rep["info"]["cluster"]["pieces"]
    pieces = [c for c in rep["checks"] if c["section"] == "piece"]
    n = len(json.loads((compiled_schnell_w4 / "onnx" / "manifest.json").read_text())["pieces"])
    assert len(pieces) == len(placed) == n and all(c["ok"] for c in pieces)
    assert all(v["node_id"] and v["wall_s"] > 0 for v in placed.values()), placed

    # a build with one wrong block (its weights x1.25), compiled and recorded as usual
    exp = mu.copy_export(compiled_schnell_w4 / "onnx", tmp_path / "bad" / "onnx")
    mu.scale_block_weights(exp, "schnell_trans_block_1", 1.25)
    ws = make_workspace(tmp_path / "bad", exp)
    compile_into(ws, compile_build_dir, W4_ARGS)
    rc, out, rep = _verify(ws, tmp_path / "bad.json", cluster.address, "--pieces", "schnell_trans_block_*")
    assert rc == 1, out[-4000:]
    failed = {c["name"] for c in rep["checks"] if not c["ok"]}
    assert failed == {"schnell_trans_block_1"}, (failed, out[-4000:])


def test_cluster_without_ray_says_how_to_install(tmp_path):
    # Ray made unimportable in this one process: the one-line hint, exit 2, before any work
    code = ("import sys; sys.modules['ray'] = None; from fluxc.cli import main; "
            f"main(['compile', '--models', {str(tmp_path)!r}, '--quantize', 'W4BF16', '--cluster', 'auto'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "fluxc[cluster]"' in lines[0], r.stderr


def test_full_size_checks_needs_a_cluster(compiled_schnell_w4, tmp_path):
    p = _fluxc(["verify", "--models", compiled_schnell_w4, "--report", tmp_path / "r.json", "--full-size-checks"],
               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "--full-size-checks needs --cluster" in out, out[-2000:]

