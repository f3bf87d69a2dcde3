"""What a node checks before it works on a build, and who it is.

Inputs reach the nodes through a path every node mounts: the export (its ONNX pieces reference
the checkpoint's tensors through hard links in onnx/weights/, so a full-size export is the
34 GB checkpoint plus 1.6 GB of graphs) and the build cache. Each node proves it sees the same
export by hashing its manifest.json against the head's sha256, and the same build cache by
reading a token the head wrote there. A node without the TPU-MLIR toolchain installs it
(`fluxc toolchain install`, serialised on the install lock) or fails with a one-line error
naming the node."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from fluxc.errors import FluxcError
from fluxc.fsutil import sha256_file

_ready: set[tuple[str, str, str]] = set()  # per worker process: checks already passed
_watching = False


def die_with_node() -> None:
    """Make this Ray worker process exit as soon as its node's raylet (its parent) is gone.

    A worker whose raylet was killed is re-parented and can live on for a while; the tools it
    started would live on with it. Exiting at once closes the pipe each tool launcher watches
    (fluxc/tool_launcher.py), which then kills the tool's whole process group. Started once
    per worker process (a daemon thread polling the parent pid every 0.2 s)."""
    global _watching
    if _watching:
        return
    _watching = True
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="fluxc-die-with-node", daemon=True).start()


def identity() -> dict[str, Any]:
    """This node: Ray node id, address, host name."""
    import ray

    ctx = ray.get_runtime_context()
    try:
        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        ip = "?"
    return {"node_id": ctx.get_node_id(), "ip": ip, "host": socket.gethostname(), "pid": os.getpid()}


def _where(me: dict[str, Any]) -> str:
    return f"node {me['ip']} ({me['host']}, Ray node {me['node_id'][:12]})"


def ensure_ready(export_dir: str, manifest_sha: str, token_path: str | None, install: bool = True) -> dict[str, Any]:
    """The node's checks (once per worker process): the export's manifest.json hashes to the
    head's sha256, the shared build cache's token is readable, the toolchain is installed
    (installed here under its lock when missing and `install`). FluxcError naming the node."""
    die_with_node()
    me = identity()
    key = (export_dir, manifest_sha, token_path or "")
    if key in _ready:
        return {**me, "toolchain": "ok"}
    manifest = Path(export_dir) / "manifest.json"
    try:
        got = sha256_file(manifest)
    except OSError as e:
        raise FluxcError(f"{_where(me)} cannot read the export's {manifest} ({e.strerror}); every node must "
                         f"mount the workspace at the same path") from None
    if got != manifest_sha:
        raise FluxcError(f"{_where(me)} sees another export at {manifest} (sha256 {got[:12]}, the head's "
                         f"{manifest_sha[:12]}); mount the same workspace on every node")
    if token_path:
        try:
            Path(token_path).read_text()
        except OSError:
            raise FluxcError(f"{_where(me)} cannot read the build cache's token {token_path}; the build cache "
                             f"must be on a path every node mounts (--build-dir)") from None
    from fluxc.toolchain.installed import read_marker, toolchain_dir

    how = "ok"
    if read_marker() is None:
        if not install:
            raise FluxcError(f"{_where(me)} has no TPU-MLIR toolchain at {toolchain_dir()}; run "
                             f"`fluxc toolchain install` there")
        from fluxc.toolchain.install import install as install_toolchain

        try:
            install_toolchain(progress=lambda _t: None)  # serialised on the install lock
        except FluxcError as e:
            raise FluxcError(f"{_where(me)} has no TPU-MLIR toolchain and could not install it: "
                             f"{str(e).splitlines()[0]}") from None
        how = "installed"
    _ready.add(key)
    return {**me, "toolchain": how}


def check_all_nodes(ray, nodes: list[dict[str, Any]], export_dir: str, manifest_sha: str,
                    token_path: str | None, say) -> list[dict[str, Any]]:
    """ensure_ready on every alive node at once (a zero-CPU task pinned to each node). A node
    that fails stops the build with its one-line error."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(ensure_ready)
    refs = {n["node_id"]: task.options(num_cpus=0, max_retries=0, name="fluxc node check",
                                       scheduling_strategy=NodeAffinitySchedulingStrategy(n["node_id"], soft=False)
                                       ).remote(export_dir, manifest_sha, token_path) for n in nodes}
    out, errors = [], []
    for n in nodes:
        try:
            out.append(ray.get(refs[n["node_id"]]))
        except Exception as e:  # noqa: BLE001  (the task's FluxcError, wrapped by Ray)
            errors.append(one_line(e))
    if errors:
        raise FluxcError("; ".join(errors))
    for r in out:
        say(f"  node {r['ip']} {r['node_id'][:8]} ({r['host']}): export manifest sha256 matches, build cache shared, "
            f"toolchain {'installed now' if r['toolchain'] == 'installed' else 'present'}")
    return out


def one_line(e: BaseException) -> str:
    """The user-facing first line of an error raised in a Ray task (Ray wraps it in a
    RayTaskError whose text starts with a traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
