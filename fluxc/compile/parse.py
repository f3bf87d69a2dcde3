"""Reading what the TPU-MLIR tools print: `model_tool --info`, the similarity figures of
the npz comparisons in model_transform / model_deploy logs, and the compiler's cost
estimate (compiler_profile_0.txt)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluxc.metrics import cosine


@dataclass
class NetIO:
    name: str
    shape: list[int]
    dtype: str


@dataclass
class NetInfo:
    name: str
    stages: list[dict[str, list[NetIO]]] = field(default_factory=list)  # [{"inputs": [...], "outputs": [...]}]


@dataclass
class BmodelInfo:
    nets: list[NetInfo]
    device_mem: int  # bytes
    weight: int
    instruct: int
    runtime: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_NET = re.compile(r"^net \d+: \[(?P<name>[^\]]+)\]")
_IO = re.compile(r"^(?P<kind>input|output): (?P<name>[^,]+), \[(?P<shape>[^\]]*)\], (?P<dtype>\w+)")
# One `device mem size` line per net of a bmodel: total, weight, instruct, runtime (bytes).
DEVICE_MEM = re.compile(r"device mem size:\s*(\d+)\s*\(weight:\s*(\d+),\s*instruct:\s*(\d+),\s*runtime:\s*(\d+)\)")


def device_mem_rows(text: str) -> list[tuple[int, int, int, int]]:
    """(total, weight, instruct, runtime) bytes of every `device mem size` line of
    `model_tool --info` text, in order (one per net)."""
    return [tuple(int(x) for x in m.groups()) for m in DEVICE_MEM.finditer(text)]


def parse_info(text: str) -> BmodelInfo:
    """Parse `model_tool --info` output. Raises ValueError if it is not such output."""
    nets: list[NetInfo] = []
    cur: NetInfo | None = None
    stage: dict[str, list[NetIO]] | None = None
    mem = None
    for line in text.splitlines():
        line = line.strip()
        m = _NET.match(line)
        if m:
            cur = NetInfo(m.group("name"))
            nets.append(cur)
            stage = None
            continue
        if line.startswith("stage ") and cur is not None:
            stage = {"inputs": [], "outputs": []}
            cur.stages.append(stage)
            continue
        m = _IO.match(line)
        if m and cur is not None:
            if stage is None:
                stage = {"inputs": [], "outputs": []}
                cur.stages.append(stage)
            shape = [int(x) for x in m.group("shape").split(",") if x.strip()]
            stage["inputs" if m.group("kind") == "input" else "outputs"].append(
                NetIO(m.group("name").strip(), shape, m.group("dtype")))
            continue
        m = DEVICE_MEM.search(line)
        if m:
            mem = tuple(int(x) for x in m.groups())
    if not nets or mem is None:
        raise ValueError("not model_tool --info output (no net or no device memory line)")
    return BmodelInfo(nets, *mem)


@dataclass
class Similarity:
    cosine: float
    euclidean: float
    sqnr: float

    def to_dict(self) -> dict[str, float]:
        return {"cosine": self.cosine, "euclidean": self.euclidean, "sqnr": self.sqnr}

    @classmethod
    def between(cls, a, b) -> "Similarity":
        """fluxc's own figures for two arrays (where no TPU-MLIR log gives them): cosine,
        1 - |a-b| / mean(|a|, |b|), and the signal-to-error ratio of a in dB."""
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        na, nb, nd = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(a - b)
        cos = cosine(a, b)
        euc = 1.0 - float(nd / ((na + nb) / 2)) if na + nb > 0 else 1.0
        sqnr = float(20 * np.log10(na / nd)) if nd > 0 and na > 0 else float("inf")
        return cls(cos, euc, sqnr)


_RUN_COMPARE = re.compile(r"\[Running\]: npz_tool\.py compare (\S+) (\S+)")
_MIN_SIM = re.compile(r"min_similarity = \(([^,]+), ([^,]+), ([^)]+)\)")


def parse_compares(log_text: str) -> list[tuple[str, str, Similarity]]:
    """Every `npz_tool.py compare A B` in a tool log, with the min similarity it printed."""
    out: list[tuple[str, str, Similarity]] = []
    pending: tuple[str, str] | None = None
    for line in log_text.splitlines():
        m = _RUN_COMPARE.search(line)
        if m:
            pending = (m.group(1), m.group(2))
            continue
        m = _MIN_SIM.search(line)
        if m and pending is not None:
            vals = [float(x) for x in m.groups()]
            out.append((pending[0], pending[1], Similarity(*vals)))
            pending = None
    return out


def deploy_similarities(log_text: str) -> dict[str, Similarity]:
    """From a model_deploy log: `quantized` = the quantised (tpu) MLIR against the float
    (top) reference, i.e. the quantisation error; `simulator` = the bmodel run on the chip
    simulator (cmodel) against the tpu MLIR, i.e. codegen / simulator faithfulness."""
    res: dict[str, Similarity] = {}
    for a, b, s in parse_compares(log_text):
        if "_model_outputs" in a:
            res["simulator"] = s
        elif "_tpu_outputs" in a:
            res["quantized"] = s
    return res


def transform_similarity(log_text: str) -> Similarity | None:
    """From a model_transform log: the top MLIR against ONNX Runtime on the same inputs."""
    for a, b, s in parse_compares(log_text):
        if "_ref_outputs" in b or "_ref_outputs" in a:
            return s
    return None


_PROFILE = re.compile(r"runtime:\s*([0-9.]+)\s*ms")
_TCYC = re.compile(r"^TCYC\s*:\s*(\d+)")


def parse_profile_ms(path: Path, mhz: float = 1000.0) -> float | None:
    """The compiler's estimate of the net's time on the chip: last `runtime: X ms`.
    Nets without arithmetic (a lone Gather: flops 0) get no such line; then the cycle
    counts (`TCYC : n`) are summed at the chip's cost-model clock `mhz` (BM1684X 1 GHz: the
    runtime lines of other nets equal TCYC / 1e6 ms exactly; BM1688 900 MHz, fluxc/compile/chips.py)."""
    if not Path(path).is_file():
        return None
    found = None
    cycles = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _PROFILE.search(line)
        if m:
            found = float(m.group(1))
        m = _TCYC.match(line.strip())
        if m:
            cycles += int(m.group(1))
    if found is None and cycles:
        found = cycles / (mhz * 1e3)
    return found


_MLIR_OP = re.compile(r'^\s*(%\d+)(?::\d+)? = "top\.(\w+)"\(([^)]*)\).*loc\((#loc\d+)\)\s*$')
_MLIR_LOC = re.compile(r'^(#loc\d+) = loc\("([^"]+)"\)')


def f32_ops_from_inputs(mlir_text: str, inputs: list[str]) -> list[str]:
    """Names of the top-level ops fed (directly or not) by the named graph inputs, up to
    (excluding) the first MatMul/Conv on each path: the part of the graph that works on
    the raw input values. For the transformer head these are the sinusoidal timestep and
    guidance projections (t up to 1000 times frequencies, then sin/cos), which bfloat16
    (8 significant bits: 1000 is rounded to a multiple of 4) ruins; listed in a
    quantize table they stay in float32."""
    locs: dict[str, str] = {}
    ops: list[tuple[str, str, list[str], str]] = []
    for line in mlir_text.splitlines():
        m = _MLIR_LOC.match(line)
        if m:
            locs[m.group(1)] = m.group(2)
            continue
        m = _MLIR_OP.match(line)
        if m:
            args = [a.strip().split(":")[0] for a in m.group(3).split(",") if a.strip().startswith("%")]
            ops.append((m.group(1), m.group(2), args, m.group(4)))
    reached: set[str] = set()
    names: list[str] = []
    for res, kind, args, loc in ops:  # the MLIR lists ops in topological order
        name = locs.get(loc, "")
        if kind == "Input":
            if name in inputs:
                reached.add(res)
            continue
        if kind in ("MatMul", "Conv") or not any(a in reached for a in args):
            continue
        reached.add(res)
        if name:
            names.append(name)
    return names
