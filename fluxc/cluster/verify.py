"""`fluxc verify --cluster`: the per-piece simulator checks as Ray tasks.

The head computes every piece's inputs once (the exported ONNX pieces chained on a tokenized
prompt, one transformer call, the VAE: the same activations the local verify feeds) and the
independent reference's outputs for them (diffusers/transformers on the source checkpoint,
else the ONNX pieces). Each piece is then one task: on its node it loads the combined bmodel
file that holds its net (the file of the build record, from the shared path) on the chip
simulator, runs that one net on those inputs and sends the outputs back with its node and wall
time. The head judges each piece with the same check as the local verify (check_piece), so a
piece passes or fails by the same thresholds whichever way it ran.

Unlike the local verify's chain (each piece fed the previous bmodel's output), every piece
here gets the reference chain's inputs, so pieces are independent and a full-size build's 57
blocks run side by side; the chain's drift is not measured this way (the end-to-end check,
still run on the head unless --no-e2e, covers the chained error)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fluxc.cluster.connect import alive_nodes, connect, disconnect
from fluxc.cluster.node import check_all_nodes, ensure_ready, one_line
from fluxc.errors import FluxcError
from fluxc.fsutil import sha256_file

RETRIES = 3
GB = 1 << 30


_engines: dict[tuple, object] = {}  # per Ray worker process: the files loaded on the simulator
KEEP_LOADED = 2


def _engine(file: str):
    """The file loaded on the simulator, kept for the next task of this worker (pieces of one
    combined file follow each other), keyed by path, size and mtime."""
    from fluxc.runtime.cmodel_engine import CmodelEngine

    st = Path(file).stat()
    key = (file, st.st_size, st.st_mtime_ns)
    if key not in _engines:
        while len(_engines) >= KEEP_LOADED:
            _engines.pop(next(iter(_engines))).close()
        _engines[key] = CmodelEngine(Path(file))
    return _engines[key]


def piece_task(file: str, net: str, inputs: dict[str, np.ndarray], export_dir: str, manifest_sha: str) -> dict:
    """One piece on a node's chip simulator: `file` (loaded, or still loaded from the previous
    task of this worker), its net `net` run on `inputs`."""
    t0 = time.perf_counter()
    me: dict[str, Any] = {}
    try:
        me = ensure_ready(export_dir, manifest_sha, None)
        eng = _engine(file)
        out = eng.process(net, inputs)
        forward_s = eng.last_forward_s
    except FluxcError as e:
        return {"error": str(e), "node": me}
    return {"outputs": {k: np.asarray(v) for k, v in out.items()}, "node": me,
            "wall_s": round(time.perf_counter() - t0, 2), "forward_s": forward_s}


def task_memory(file: Path) -> int:
    """Planned peak of one simulator task: the cmodel worker holds the whole file it loads
    (weights in simulated device memory) plus the activations; twice the file plus 1 GiB."""
    return 2 * Path(file).stat().st_size + GB


def run_pieces(address: str, rec, specs, export_dir: Path, feeds: dict[str, dict], say) -> dict[str, dict]:
    """{piece: {"outputs": {spec output name: array}, "node": {...}, "wall_s"}} for every piece
    in `feeds` (piece -> its inputs), each run as a Ray task."""
    ray = connect(address)
    try:
        nodes = alive_nodes(ray)
        say(f"cluster {address}: {len(nodes)} node(s): " + ", ".join(
            f"{n['ip']} ({n['cpus']:g} CPU, {n['memory'] / GB:.1f} GB)" for n in nodes))
        manifest_sha = sha256_file(Path(export_dir) / "manifest.json")
        check_all_nodes(ray, nodes, str(export_dir), manifest_sha, None, say)
        spec_of = {s.name: s for s in specs}
        biggest = max((n["memory"] for n in nodes), default=0)
        task = ray.remote(piece_task)
        refs = {}
        for name, inputs in feeds.items():
            bp = rec.piece(name)
            path = rec.chip_dir / bp.file
            need = task_memory(path)
            if need > biggest:
                raise FluxcError(f"checking {name} needs {need / GB:.1f} GB (its file {bp.file} on the simulator), "
                                 f"more than any node offers (largest {biggest / GB:.1f} GB); add a larger node")
            refs[name] = task.options(num_cpus=1, memory=need, max_retries=RETRIES, name=f"fluxc verify {name}"
                                      ).remote(str(path), bp.net, inputs, str(export_dir), manifest_sha)
        say(f"pieces: {len(refs)} simulator checks started as cluster tasks")
        out: dict[str, dict] = {}
        pending = {ref: name for name, ref in refs.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except Exception as e:  # noqa: BLE001
                    r = {"error": f"the cluster task failed: {one_line(e)}", "node": {}}
                if "outputs" in r:
                    s = spec_of[name]
                    vals = list(r["outputs"].values())
                    r["outputs"] = {t.name: np.asarray(r["outputs"].get(t.name, vals[i] if i < len(vals) else None),
                                                       np.float32).reshape(t.shape)
                                    for i, t in enumerate(s.outputs)}
                out[name] = r
                node = r.get("node") or {}
                say(f"  {name:<28} on node {node.get('ip', '?')} {str(node.get('node_id', '?'))[:8]}"
                    + (f" {r['wall_s']:.1f} s" if "wall_s" in r else f" FAILED: {r['error'].splitlines()[0]}"))
        return out
    finally:
        disconnect(ray)
