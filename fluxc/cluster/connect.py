"""The one door to Ray: a one-line error when it is not installed, connecting to a cluster,
and the nodes that are alive."""
from __future__ import annotations

import os
from typing import Any

from fluxc.errors import FluxcError

INSTALL_HINT = 'pip install "fluxc[cluster]"'


def require_ray():
    """The ray module, or the one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise FluxcError(f"--cluster needs Ray, which is not installed; install it with: {INSTALL_HINT} "
                         f"(or pip install ray)") from None
    return ray


def connect(address: str):
    """Connect this process to the Ray cluster at `address` ("auto": the one started on this
    machine with `ray start`). Returns the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if not address:
        raise FluxcError("--cluster needs an address (host:port of `ray start --head`) or auto")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        ray.init(address=address, namespace="fluxc", log_to_driver=False, logging_level="ERROR",
                 configure_logging=True)
    except Exception as e:  # noqa: BLE001  (Ray raises ConnectionError, RuntimeError, ValueError ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FluxcError(f"cannot reach the Ray cluster at {address} ({first}); start one with "
                         f"`ray start --head` and pass its address (or auto on that machine)") from None
    return ray


def alive_nodes(ray) -> list[dict[str, Any]]:
    """The alive nodes: id, address and resources (CPU, memory in bytes)."""
    out = []
    for n in ray.nodes():
        if n.get("Alive"):
            res = n.get("Resources", {})
            out.append({"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"),
                        "host": n.get("NodeManagerHostname", "?"), "cpus": res.get("CPU", 0),
                        "memory": int(res.get("memory", 0))})
    return out


def disconnect(ray) -> None:
    if ray.is_initialized():
        ray.shutdown()
