"""Splitting the BF16 transformer over several chips.

Each piece's device memory comes from `model_tool --info` of its own bmodel: weight,
instruct(ions) and runtime (activations and scratch). When bmodels are combined into one
file, `model_tool --info` of the combined file shows weight and instruct summed over the
nets and runtime as the largest of the nets (the nets of one file run one after another
and share one runtime area; checked on the outputs of every compile, see
device_split.json `measured_mb`). So a device holding pieces P costs

    sum(weight_i + instruct_i for i in P) + max(runtime_i for i in P)

Pieces stay in pipeline order (head, double blocks, single blocks, tail) and each device
takes a contiguous range, so the head lands on the first device and the tail on the last;
an exact dynamic programme over the cut points minimises the largest device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fluxc.specs import KINDS, piece_name

MB = 1024 * 1024


@dataclass(frozen=True)
class PieceMem:
    name: str
    static: int  # weight + instructions, bytes
    runtime: int  # bytes, shared within one combined bmodel
    kind: str = ""  # fluxc.specs.KINDS (for summaries)
    index: int | None = None  # block index within its kind

    @property
    def alone(self) -> int:
        return self.static + self.runtime


def device_cost(pieces: Sequence[PieceMem]) -> int:
    if not pieces:
        return 0
    return sum(p.static for p in pieces) + max(p.runtime for p in pieces)


def split_contiguous(pieces: Sequence[PieceMem], n_devices: int) -> list[list[PieceMem]]:
    """Exact min-max contiguous partition of `pieces` into `n_devices` non-empty ranges."""
    n = len(pieces)
    if n_devices < 1:
        raise ValueError("n_devices must be >= 1")
    if n_devices > n:
        raise ValueError(f"cannot split {n} pieces over {n_devices} devices")
    # cost[i][j] = device_cost(pieces[i:j]), built incrementally
    INF = float("inf")
    # best[k][j] = minimal largest-device cost for the first j pieces on k devices
    best = [[INF] * (n + 1) for _ in range(n_devices + 1)]
    cut = [[0] * (n + 1) for _ in range(n_devices + 1)]
    best[0][0] = 0
    for k in range(1, n_devices + 1):
        for j in range(k, n - (n_devices - k) + 1):
            static = 0
            rt = 0
            # last device holds pieces[i:j]
            for i in range(j - 1, k - 2, -1):
                static += pieces[i].static
                rt = max(rt, pieces[i].runtime)
                c = max(best[k - 1][i], static + rt)
                # ties: prefer the earlier devices fuller (i larger), like a greedy fill
                if c < best[k][j] or (c == best[k][j] and i > cut[k][j]):
                    best[k][j] = c
                    cut[k][j] = i
    parts: list[list[PieceMem]] = []
    j = n
    for k in range(n_devices, 0, -1):
        i = cut[k][j]
        parts.append(list(pieces[i:j]))
        j = i
    parts.reverse()
    return parts


def split_table(parts: list[list[PieceMem]]) -> list[dict]:
    rows = []
    for d, part in enumerate(parts):
        rows.append({
            "device": d,
            "pieces": [p.name for p in part],
            "summary": describe_range(part),
            "weight_mb": round(sum(p.static for p in part) / MB, 3),
            "runtime_mb": round(max(p.runtime for p in part) / MB, 3),
            "total_mb": round(device_cost(part) / MB, 3),
        })
    return rows


def describe_range(pieces: Sequence[PieceMem]) -> str:
    """'head + double 0..12 + single 0..27' style summary of a device's pieces (by their kinds)."""
    out: list[str] = []
    run_kind, run_lo, run_hi = None, None, None

    def flush() -> None:
        if run_kind is not None:
            label = KINDS[run_kind].label
            out.append(f"{label} {run_lo}" if run_lo == run_hi else f"{label} {run_lo}..{run_hi}")

    for p in pieces:
        if p.kind not in KINDS or not KINDS[p.kind].repeated:
            flush()
            run_kind = None
            out.append(KINDS[p.kind].label if p.kind in KINDS else p.name)
            continue
        if p.kind == run_kind and p.index == run_hi + 1:
            run_hi = p.index
        else:
            flush()
            run_kind, run_lo, run_hi = p.kind, p.index, p.index
    flush()
    return " + ".join(out)


# Full-size FLUX.1 figures (BF16, 1024x1024, BM1684X). Measured (`model_tool --info` of
# full-size blocks compiled with TPU-MLIR; BENCHMARKS.md, "Device split of the BF16
# transformer"): single block weight 283 MB, device 660 MB; double block weight 680 MB.
# Extrapolated: the double block's runtime (it moves the same 4608 tokens as a single block,
# so its non-weight memory is taken equal to the single block's 660-283 = 377 MB); the head
# and tail weights from their parameter counts (head: x_embedder 64x3072, time/guidance/text
# embedders 256->3072->3072 twice + 768->3072->3072, context_embedder 4096x3072 = 45.2 M
# params -> 90 MB in BF16; tail: norm_out 3072->6144 + proj_out 3072->64 = 19.1 M -> 38 MB)
# and their runtime from their largest activations ([1,4096,3072] and [1,512,4096] in f32,
# in and out: ~120 MB, a rough figure).
FULL_SIZE_MB = {
    "single_weight": 283.0, "single_runtime": 660.0 - 283.0,
    "double_weight": 680.0, "double_runtime": 660.0 - 283.0,
    "head_weight": 90.0, "head_runtime": 120.0,
    "tail_weight": 38.0, "tail_runtime": 120.0,
}
REFERENCE_SPLIT = [(0, 13, 0, 0), (13, 19, 0, 28), (19, 19, 28, 38)]  # doubles [a,b), singles [c,d)


def full_size_pieces(flux_type: str = "dev", num_double: int = 19, num_single: int = 38,
                     figures: dict[str, float] | None = None) -> list[PieceMem]:
    f = dict(FULL_SIZE_MB, **(figures or {}))

    def pm(kind: str, fig: str, i: int | None = None) -> PieceMem:
        return PieceMem(piece_name(kind, flux_type, i), int(f[f"{fig}_weight"] * MB), int(f[f"{fig}_runtime"] * MB),
                        kind, i)

    pieces = [pm("transformer_head", "head")]
    pieces += [pm("double_block", "double", i) for i in range(num_double)]
    pieces += [pm("single_block", "single", i) for i in range(num_single)]
    pieces.append(pm("transformer_tail", "tail"))
    return pieces


def reference_split_parts(pieces: list[PieceMem], num_double: int = 19) -> list[list[PieceMem]]:
    """The sophon-demo hand split (head+double 0..12 | double 13..18 + single 0..27 |
    single 28..37 + tail) applied to `pieces` (full-size order)."""
    head, tail = pieces[0], pieces[-1]
    doubles, singles = pieces[1:1 + num_double], pieces[1 + num_double:-1]
    parts = []
    for d, (a, b, c, e) in enumerate(REFERENCE_SPLIT):
        part = doubles[a:b] + singles[c:e]
        if d == 0:
            part = [head] + part
        if d == len(REFERENCE_SPLIT) - 1:
            part = part + [tail]
        parts.append(part)
    return parts


def full_size_comparison(n_devices: int = 3, flux_type: str = "dev") -> dict:
    """Our split vs the reference's hand split on the full-size figures above."""
    pieces = full_size_pieces(flux_type)
    ours = split_contiguous(pieces, n_devices)
    ref = reference_split_parts(pieces)
    return {
        "figures_mb": FULL_SIZE_MB,
        "ours": split_table(ours),
        "reference": split_table(ref),
        "ours_max_mb": round(max(device_cost(p) for p in ours) / MB, 1),
        "reference_max_mb": round(max(device_cost(p) for p in ref) / MB, 1),
    }
