"""`fluxc compile --cluster`: the compile's jobs (fluxc/compile/schedule.py) as Ray tasks.

- Same jobs, same order: templates (the first piece of each kind: a real model_transform) are
  started first and the pieces rebound from them only once their template is done, as the
  local compile's folder locks make them wait.
- Each task declares `memory=` the job's planned peak (schedule.piece_need: the measured
  multiple of its weights for a transform or a rebound piece) and one CPU, so Ray never puts
  more on a node than its memory holds (two 17 GB transforms never share a 24 GB node). A job
  larger than every node is a one-line error before anything starts.
- Results land in the shared, content-keyed build cache exactly as a local compile's (the task
  runs the same compile_piece with its folder lock and its COMPLETE marker written last). The
  head looks the cache up first: a rerun with nothing changed starts no task.
- Faults: a task whose node dies is retried by Ray elsewhere (max_retries); the half-done
  folder has no COMPLETE marker and is redone. A killed driver takes its tasks with it (Ray
  kills the workers of a dead owner; each tool's process group dies with its worker,
  fluxc/tool_launcher.py); the rerun resumes from the cache.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from fluxc.cluster.connect import alive_nodes, connect, disconnect
from fluxc.cluster.node import check_all_nodes, ensure_ready, one_line
from fluxc.compile.build import PieceResult, cached_piece
from fluxc.compile.schedule import Job
from fluxc.compile.tools import Tools
from fluxc.errors import FluxcError
from fluxc.fsutil import sha256_file, write_text_atomic

RETRIES = 3  # times Ray reruns a task whose node or worker died
GB = 1 << 30


def compile_task(job: Job, chip: str, toolchain: str, export_dir: str, manifest_sha: str, token: str) -> dict:
    """One job on a node (a Ray task): the node's checks, then compile_piece into the shared
    cache. Errors come back as values (their one-line text, with the node) so that the head
    can report them as fluxc errors."""
    t0 = time.monotonic()
    me: dict[str, Any] = {}
    try:
        me = ensure_ready(export_dir, manifest_sha, token)
        tools = Tools()
        r = job.run(chip, toolchain, tools)
    except FluxcError as e:
        return {"error": str(e), "node": me}
    return {"result": r, "node": me, "runs": tools.runs, "seconds": round(time.monotonic() - t0, 2)}


def run_on_cluster(address: str, jobs: list[Job], exp, chip: str, toolchain: str, tools: Tools,
                   build_root: Path, on_start: Callable[[Job], None],
                   on_done: Callable[..., None], say: Callable[[str], None]
                   ) -> tuple[dict[str, PieceResult], list[BaseException]]:
    results: dict[str, PieceResult] = {}
    errors: list[BaseException] = []
    # What the cache holds needs no cluster at all.
    for j in jobs:
        p = j.piece
        r = cached_piece(p.spec, p.sha256, j.plan, chip, toolchain, j.build_root, j.check, j.keep)
        if r is not None:
            results[j.label] = r
    todo = [j for j in jobs if j.label not in results]
    for j in jobs:
        if j.label in results:
            on_start(j)
            on_done(j, results[j.label])
    if not todo:
        say(f"cluster {address}: every piece is in the build cache; no task started")
        return results, errors

    ray = connect(address)
    try:
        nodes = alive_nodes(ray)
        say(f"cluster {address}: {len(nodes)} node(s): " + ", ".join(
            f"{n['ip']} ({n['cpus']:g} CPU, {n['memory'] / GB:.1f} GB)" for n in nodes))
        biggest = max((n["memory"] for n in nodes), default=0)
        for j in todo:
            if j.need > biggest:
                raise FluxcError(f"{j.label} needs {j.need / GB:.1f} GB to compile, more than any node of the "
                                 f"cluster offers (largest {biggest / GB:.1f} GB); add a node with more memory")
        manifest_sha = sha256_file(exp.folder / "manifest.json")
        token = build_root / ".fluxc-cluster-token"
        write_text_atomic(token, f"{manifest_sha}\n")
        check_all_nodes(ray, nodes, str(exp.folder), manifest_sha, str(token), say)
        _schedule(ray, todo, chip, toolchain, str(exp.folder), manifest_sha, str(token), tools, results, errors,
                  on_start, on_done)
    finally:
        disconnect(ray)
    return results, errors


def _schedule(ray, todo: list[Job], chip, toolchain, export_dir, manifest_sha, token, tools: Tools,
              results: dict, errors: list, on_start, on_done) -> None:
    task = ray.remote(compile_task)
    done_kinds = {j.kind for j in todo if not any(k.kind == j.kind and k.first_of_kind for k in todo)}
    pending = list(todo)
    running: dict[Any, Job] = {}
    while pending or running:
        if errors:
            pending.clear()  # start nothing new; let the running ones finish
        for j in [j for j in pending if j.first_of_kind or j.kind in done_kinds]:
            pending.remove(j)
            on_start(j)
            ref = task.options(num_cpus=1, memory=j.need, max_retries=RETRIES, retry_exceptions=False,
                               name=f"fluxc compile {j.label}").remote(j, chip, toolchain, export_dir,
                                                                      manifest_sha, token)
            running[ref] = j
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for ref in ready:
            j = running.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # noqa: BLE001  (retries used up, or the task could not run)
                errors.append(FluxcError(f"{j.label}: the cluster task failed: {one_line(e)}"))
                on_done(j, None)
                continue
            if "error" in out:
                node = out["node"]
                where = f" (on node {node['ip']} {node['host']})" if node else ""
                first, _, rest = out["error"].partition("\n")
                errors.append(FluxcError(f"{first}{where}" + (f"\n{rest}" if rest else "")))
                on_done(j, None)
                continue
            r: PieceResult = out["result"]
            tools.runs.extend(out["runs"])
            results[j.label] = r
            done_kinds.add(j.kind)
            on_done(j, r, f"  on node {out['node']['ip']} {out['node']['node_id'][:8]}")
