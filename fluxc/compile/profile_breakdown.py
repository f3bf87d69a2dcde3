"""Where a compiled piece's estimated time goes, read from the compiler's own cost model.

Every model_deploy writes `compiler_profile_0.txt` in its working folder (parse.parse_profile_ms
reads its last line, the net's estimate). Above that line it lists every command the chip would
run, in two columns: compute (ENGINE_BD, the TIU) on the left and DMA (ENGINE_GDMA) on the
right, one entry per command:

    <Op>_<id>|<unit>|s:<start>|b:<bd id>|g:<gdma id>|e:<end>|t:<cycles>[|dr:<dir>|sz:<bytes>|bw:<GB/s>]

(DMA entries carry direction, size and bandwidth); each subnet ends with `TCYC : <cycles>`. On
BM1684X one cycle is 1 ns (the chip's cost-model clock, fluxc/compile/chips.py).

`breakdown(path)` sums the cycles per op type and per layer (`<Op>_<id>`), TIU and GDMA, as
shares of the piece's total cycles, and how much of the piece each engine is busy, both are, or
only the DMA is (DMA that compute does not hide). Inside a layer group the DMA commands are named
`Load_<id>` / `Store_<id>` after themselves; each is attributed to the compute op it feeds or
drains, by the commands' own dependency ids: a Load to the first TIU command that waits for it
(its `g` at least the Load's), a Store to the TIU command it waits for (`b`). DMA commands a
global op issues itself carry that op's name. Each op's DMA not hidden (`gdma_exposed`) is the
part of its DMA commands' time during which no TIU command runs (DMA commands of one engine
do not overlap each other, so these add up to the piece's `gdma_only`). The shares are the compiler's estimate, not a
measurement on a chip.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ENTRY = re.compile(r"(?P<name>[^\s|]+)\|(?P<unit>[A-Za-z0-9_]+)\|s:(?P<s>-?\d+)\|b:(?P<b>-?\d+)\|g:(?P<g>-?\d+)"
                    r"\|e:(?P<e>-?\d+)\|t:(?P<t>-?\d+)(?:\|dr:(?P<dr>\d+)\|sz:(?P<sz>\d+)\|bw:(?P<bw>[0-9.]+))?")
_TCYC = re.compile(r"^TCYC\s*:\s*(\d+)")
_LAYER = re.compile(r"^(?P<op>.+?)_(?P<id>\d+)$")
DMA_OWN = ("Load", "Store")  # layer-group DMA commands named after themselves


@dataclass
class Cmd:
    layer: str  # "<Op>_<id>" as the profile names it
    op: str  # "<Op>"
    engine: str  # "tiu" or "gdma"
    unit: str
    start: int
    end: int
    bd: int
    gdma: int
    cycles: int
    bytes: int = 0
    section: int = 0  # subnet index (times restart in each)


def op_of(layer: str) -> str:
    m = _LAYER.match(layer)
    return m.group("op") if m else layer


def read_commands(path: Path) -> tuple[list[Cmd], list[int]]:
    """Every command of the profile, and each subnet's total cycles (TCYC)."""
    cmds: list[Cmd] = []
    totals: list[int] = []
    split = None  # column where ENGINE_GDMA starts
    for line in Path(path).read_text(errors="replace").splitlines():
        if split is None and "ENGINE_GDMA" in line:
            split = line.index("ENGINE_GDMA")
            continue
        m = _TCYC.match(line.strip())
        if m:
            totals.append(int(m.group(1)))
            continue
        for e in _ENTRY.finditer(line):
            dma = e.group("dr") is not None or e.group("unit").startswith("GDMA") or \
                (split is not None and e.start() >= split - 1)
            cmds.append(Cmd(e.group("name"), op_of(e.group("name")), "gdma" if dma else "tiu", e.group("unit"),
                            int(e.group("s")), int(e.group("e")), int(e.group("b")), int(e.group("g")),
                            int(e.group("t")), int(e.group("sz") or 0), len(totals)))
    return cmds, totals


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(iv: list[tuple[int, int]]) -> int:
    return sum(e - s for s, e in iv)


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    i = j = n = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            n += e - s
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return n


def _uncovered(s: int, e: int, union: list[tuple[int, int]], starts: list[int]) -> int:
    """Length of [s, e) not covered by the sorted, disjoint intervals `union`."""
    covered = 0
    i = max(bisect.bisect_right(starts, s) - 1, 0)
    while i < len(union) and union[i][0] < e:
        a, b = max(union[i][0], s), min(union[i][1], e)
        if b > a:
            covered += b - a
        i += 1
    return (e - s) - covered


def _attribute(cmds: list[Cmd]) -> dict[int, str]:
    """index of a Load/Store command -> the TIU layer it feeds (Load) or drains (Store)."""
    out: dict[int, str] = {}
    sections = sorted({c.section for c in cmds})
    for sec in sections:
        tiu = [c for c in cmds if c.section == sec and c.engine == "tiu"]
        if not tiu:
            continue
        waits, run = [], -1
        for c in tiu:  # the gdma id each TIU command waits for, made non-decreasing
            run = max(run, c.gdma)
            waits.append(run)
        bds = [c.bd for c in tiu]
        for i, c in enumerate(cmds):
            if c.section != sec or c.engine != "gdma" or c.op not in DMA_OWN:
                continue
            if c.op == "Load":
                k = bisect.bisect_left(waits, c.gdma)
            else:
                k = bisect.bisect_right(bds, c.bd) - 1
            if 0 <= k < len(tiu):
                out[i] = tiu[k].layer
    return out


def breakdown(path: Path, top_layers: int = 25) -> dict[str, Any] | None:
    """Shares of the piece's estimated cycles by op type and by layer, TIU and GDMA (see the
    module docstring); None if there is no profile."""
    path = Path(path)
    if not path.is_file():
        return None
    cmds, totals = read_commands(path)
    if not cmds:
        return None
    total = sum(totals) or max(c.end for c in cmds) + 1
    owner = _attribute(cmds)
    tiu_iv, gdma_iv = [], []
    offset, offsets = 0, []
    for t in totals + [0]:
        offsets.append(offset)
        offset += t
    for c in cmds:
        base = offsets[min(c.section, len(offsets) - 1)]
        (tiu_iv if c.engine == "tiu" else gdma_iv).append((base + c.start, base + c.end + 1))
    tiu_u, gdma_u = _union(tiu_iv), _union(gdma_iv)
    both = _overlap(tiu_u, gdma_u)
    tiu_busy, gdma_busy = _length(tiu_u), _length(gdma_u)

    starts = [a for a, _ in tiu_u]
    layers: dict[str, dict[str, Any]] = {}
    types: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(cmds):
        layer = owner.get(i, c.layer)
        row = layers.setdefault(layer, {"layer": layer, "op": op_of(layer), "tiu_cycles": 0, "gdma_cycles": 0,
                                        "gdma_exposed_cycles": 0, "gdma_bytes": 0})
        trow = types.setdefault(row["op"], {"op": row["op"], "tiu_cycles": 0, "gdma_cycles": 0,
                                            "gdma_exposed_cycles": 0, "gdma_bytes": 0, "layers": set()})
        exposed = 0
        if c.engine == "gdma":  # the part of this DMA command with no compute running
            base = offsets[min(c.section, len(offsets) - 1)]
            exposed = _uncovered(base + c.start, base + c.end + 1, tiu_u, starts)
        for r in (row, trow):
            r[f"{c.engine}_cycles"] += c.cycles
            r["gdma_bytes"] += c.bytes
            r["gdma_exposed_cycles"] += exposed
        trow["layers"].add(layer)

    def share(n: int) -> float:
        return round(n / total, 5)

    def finish(row: dict[str, Any]) -> dict[str, Any]:
        row["tiu"], row["gdma"] = share(row["tiu_cycles"]), share(row["gdma_cycles"])
        row["gdma_exposed"] = share(row["gdma_exposed_cycles"])
        if isinstance(row.get("layers"), set):
            row["layers"] = len(row["layers"])
        return row

    key = lambda r: -(r["tiu_cycles"] + r["gdma_cycles"])  # noqa: E731
    by_type = [finish(r) for r in sorted(types.values(), key=key)]
    by_layer = [finish(r) for r in sorted(layers.values(), key=key)]
    return {
        "total_cycles": total,
        "tiu_busy": share(tiu_busy), "gdma_busy": share(gdma_busy),
        "both_busy": share(both), "gdma_only": share(gdma_busy - both), "tiu_only": share(tiu_busy - both),
        "idle": share(total - tiu_busy - gdma_busy + both),
        "tiu_cycles": sum(c.cycles for c in cmds if c.engine == "tiu"),
        "gdma_cycles": sum(c.cycles for c in cmds if c.engine == "gdma"),
        "gdma_bytes": sum(c.bytes for c in cmds),
        "dma_attributed": len(owner),
        "by_type": by_type,
        "by_layer": by_layer[:top_layers],
        "layers": len(layers),
    }


def table(b: dict[str, Any], rows: int = 12) -> str:
    """A short text table of a breakdown's op types (markdown)."""
    lines = [f"TIU busy {100 * b['tiu_busy']:.1f}%, GDMA busy {100 * b['gdma_busy']:.1f}%, "
             f"GDMA only (not hidden) {100 * b['gdma_only']:.1f}%, idle {100 * b['idle']:.1f}% "
             f"of {b['total_cycles'] / 1e6:.2f} M cycles",
             "", "| op | layers | TIU % | GDMA % | GDMA not hidden % | GDMA MB |", "|---|---|---|---|---|---|"]
    for r in b["by_type"][:rows]:
        lines.append(f"| {r['op']} | {r['layers']} | {100 * r['tiu']:.1f} | {100 * r['gdma']:.1f} | "
                     f"{100 * r['gdma_exposed']:.1f} | {r['gdma_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)
