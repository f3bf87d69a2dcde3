"""The compile's jobs and the order and memory they are run with, on this machine or on a Ray
cluster (fluxc/cluster/compile.py): one list, one order, one memory figure per job.

Order: probe pieces first (a full-size export's small-shape checks), then every piece of the
export in manifest order, then the further image sizes' own pieces. The first job of each
(stage, kind) is a real model_transform (it makes the template the others of that kind are
rebound from, fluxc/compile/rebind.py), so it is planned at the transform's peak; the others
at the rebound peak."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fluxc.compile.build import PieceResult, compile_piece
from fluxc.compile.recipe import PiecePlan
from fluxc.compile.tools import Tools
from fluxc.machine import mem_available

# Peak memory of compiling one piece, as multiples of its float32 weights, measured on the
# full-size blocks (tpu-mlir-facts.md): model_transform with its own simplification 10.4x
# (double) to 14.7x (single); model_deploy 1.8-2.3x; rebinding a transform (fluxc.compile.rebind)
# about 3x. Since the graph is folded first (fluxc.compile.fold) a template's transform peaks at
# about 5x (benchmarks/results/transform_memory.json); it is still planned at 15x, so that on a
# machine of up to ~25 GB a template transform runs alone and the compile's peak stays one
# transform's, whatever else is queued.
TRANSFORM_X, REBOUND_X, BASE = 15, 3, 1 << 30


def piece_need(weight_bytes: int, first_of_kind: bool) -> int:
    """Planned peak memory (bytes) of compiling one piece: what the local scheduler budgets and
    what a cluster task declares to Ray as `memory=`."""
    return (TRANSFORM_X if first_of_kind else REBOUND_X) * weight_bytes + BASE


@dataclass
class Job:
    what: str  # "probe" | "piece" | "size" (a further image size's own piece)
    piece: object  # fluxc.compile.export_in.ExportPiece
    label: str  # what the progress shows and the results are keyed by
    plan: PiecePlan
    build_root: Path
    check: bool
    keep: bool
    first_of_kind: bool  # the first of its (stage, kind): a real model_transform, the template

    @property
    def kind(self) -> tuple[str, str]:
        return (self.what, self.piece.spec.kind)

    @property
    def need(self) -> int:
        return piece_need(self.piece.weight_bytes, self.first_of_kind)

    def run(self, chip: str, toolchain: str, tools: Tools) -> PieceResult:
        p = self.piece
        return compile_piece(p.spec, p.path, p.sha256, self.plan, chip, toolchain, self.build_root, tools,
                             self.check, self.keep)


def plan_jobs(probes, pieces, extra, probe_plans, plans, build_root: Path, check_full: bool,
              estimate_only: bool) -> list[Job]:
    """Every job of a compile in the order they are started (see the module doc)."""
    items = [("probe", p, f"probe {p.spec.name}") for p in probes] + \
        [("piece", p, p.spec.name) for p in pieces] + \
        [("size", p, f"{p.spec.name} @{z.label}") for z, p in extra]
    seen: set[tuple[str, str]] = set()
    out = []
    for what, p, label in items:
        kind = (what, p.spec.kind)
        first = kind not in seen
        seen.add(kind)
        if what == "probe":
            out.append(Job(what, p, label, probe_plans[p.spec.name], build_root / "probe", True, True, first))
        else:
            out.append(Job(what, p, label, plans[label], build_root, check_full, not estimate_only, first))
    return out


class MemoryBudget:
    """Runs pieces side by side while their planned peaks fit in the memory available at the
    start (80% of it). `--jobs` caps the count."""

    def __init__(self, cap: int) -> None:
        self.cap, self.budget, self.used = cap, int(0.8 * mem_available()), 0

    def fits(self, need: int, running: int) -> bool:
        return running == 0 or (running < self.cap and self.used + need <= self.budget)


def run_local(jobs: list[Job], cap: int, chip: str, toolchain: str, tools: Tools,
              on_start: Callable[[Job], None], on_done: Callable[[Job, PieceResult | None], None]
              ) -> tuple[dict[str, PieceResult], list[BaseException]]:
    """Every job on this machine, in order, as many at once as `cap` and the memory budget allow.
    Returns (label -> result, errors); after an error nothing new starts."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    results: dict[str, PieceResult] = {}
    errors: list[BaseException] = []
    budget = MemoryBudget(cap)
    pending = list(jobs)
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=cap) as pool:
        def submit(job: Job) -> None:
            on_start(job)
            running[pool.submit(job.run, chip, toolchain, tools)] = job
            budget.used += job.need

        while pending and budget.fits(pending[0].need, len(running)):
            submit(pending.pop(0))
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                budget.used -= job.need
                try:
                    results[job.label] = fut.result()
                except BaseException as e:  # stop scheduling; let the running ones finish
                    errors.append(e)
                    on_done(job, None)
                    continue
                on_done(job, results[job.label])
            while pending and not errors and budget.fits(pending[0].need, len(running)):
                submit(pending.pop(0))
    return results, errors
