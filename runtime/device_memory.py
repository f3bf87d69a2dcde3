"""Device memory of a build on BM1684X chips: one figure, computed one way.

Per chip = for every bmodel file placed on it, weight + instruct + runtime (what
`model_tool --info` reports and bmruntime allocates when it loads the file; the nets of a
combined file share one runtime area) + the I/O tensors the sail runtime allocates on that
chip (runtime/sail_flux.py `io_plan_sizes`: one tensor per role and distinct shape, shared by
every net of a kind; a build of several image sizes has the size-dependent roles once per
size's shape, all allocated when the build is opened).

This is what the sail stand-in (runtime/sail_sim.py) measures while it runs a build, what
`fluxc compile` can report and what `fluxc verify` checks against a board's budget:

    from fluxc.runtime.device_memory import build_device_memory
    per_chip = build_device_memory(files, io_plan(nets, where, kinds))   # {device index: bytes}

Budgets (MB = 2**20 bytes, as model_tool and the board's memory tools count):
- SE7-32 (SoC): the reference's memory layout `memory_edit.sh -npu 7615 -vpu 2360 -vpp 2360`,
  and "the TPU can use the sum of the three": 12335 MB. The reference measured 11419 MB
  (schnell W4BF16) / 11438 MB (dev W4BF16) on it.
- SC7 (PCIe card, BM1684X chips): the seed README says no memory change is needed on PCIe;
  12 GB per chip is taken here (12288 MB) as the conservative figure. Vendor sheets list
  SC7 cards with 3 BM1684X and 36 or 48 GB (12 or 16 GB per chip), part of which the
  driver keeps for its VPU/VPP heaps; this figure was not confirmed on a card.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from fluxc.build_record import placement as place_family
from fluxc.compile.parse import device_mem_rows, parse_info
from fluxc.errors import FluxcError
from fluxc.runtime.models import bmodel_files
from fluxc.specs import FAMILIES
from fluxc.toolchain import run_tool

MB = 2**20
BUDGET_MB = {"SE7-32": 7615 + 2360 + 2360, "SC7": 12 * 1024}

_NBYTES = {"float32": 4, "int32": 4, "uint32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2,
           "int8": 1, "uint8": 1}


def dtype_bytes(dtype: str) -> int:
    try:
        return _NBYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def bmodel_memory_from_info(text: str) -> dict:
    """weight / instruct / runtime / total bytes from `model_tool --info` text. A file with
    several `device mem size` lines (one per net) shares one runtime area: weights and
    instructions add up, runtime is the largest."""
    rows = device_mem_rows(text)
    if not rows:
        raise ValueError("no 'device mem size' line: not model_tool --info output")
    if len(rows) == 1:
        total, weight, instruct, runtime = rows[0]
    else:
        weight = sum(r[1] for r in rows)
        instruct = sum(r[2] for r in rows)
        runtime = max(r[3] for r in rows)
        total = weight + instruct + runtime
    return {"total": total, "weight": weight, "instruct": instruct, "runtime": runtime}


@dataclass(frozen=True)
class PlannedTensor:
    """One device tensor the runtime allocates: on chip `device` (index into the device
    list), for `role` (e.g. "hid", "clip.hidden"), with the net's shape and dtype."""

    device: int
    role: str
    shape: tuple[int, ...]
    dtype: str
    host: bool  # also has host memory (crosses to the host)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * dtype_bytes(self.dtype)


def build_device_memory(files: list[tuple[int, dict]], tensors: list[PlannedTensor]) -> dict[int, dict]:
    """Per chip: {"models": bytes, "io": bytes, "total": bytes, "files": n, "tensors": n}.
    files: (device index, bmodel_memory_from_info(...)) per bmodel file placed on it."""
    out: dict[int, dict] = {}

    def row(d):
        return out.setdefault(d, {"models": 0, "io": 0, "total": 0, "files": 0, "tensors": 0})

    for d, mem in files:
        r = row(d)
        r["models"] += int(mem["total"])
        r["files"] += 1
    for t in tensors:
        r = row(t.device)
        r["io"] += t.nbytes
        r["tensors"] += 1
    for r in out.values():
        r["total"] = r["models"] + r["io"]
    return dict(sorted(out.items()))


def over_budget(per_chip: dict[int, dict], budget_mb: float) -> list[str]:
    """One line per chip whose total exceeds the budget (empty when the build fits)."""
    return [f"device {d}: {r['total'] / MB:.0f} MB (models {r['models'] / MB:.0f} + I/O tensors {r['io'] / MB:.0f}) "
            f"> budget {budget_mb:.0f} MB" for d, r in per_chip.items() if r["total"] > budget_mb * MB]


def placement(files: dict[str, list], n_devices: int) -> list[tuple[object, int]]:
    """(file, device index) for the files of a build by family, by the build record's rule
    (fluxc.build_record.placement: CLIP and VAE on the first chip, T5 on the last,
    transformer part i on chip i)."""
    n = max(1, n_devices)
    return [(f, place_family(fam, i, n)) for fam in FAMILIES for i, f in enumerate(files.get(fam, []))]


def read_info(bmodel) -> str:
    """`model_tool --info` text of a bmodel: the `<file>.bmodel.info.txt` fluxc compile leaves
    next to it, else a fresh model_tool run."""
    p = Path(bmodel)
    side = p.with_name(p.name + ".info.txt")
    if side.is_file() and side.stat().st_mtime >= p.stat().st_mtime:
        return side.read_text(errors="replace")
    with tempfile.TemporaryDirectory(prefix="fluxc-info-") as td:
        log = Path(td) / "info.log"
        run_tool("model_tool", ["--info", str(p.resolve())], cwd=Path(td), log=log, timeout=300)
        return log.read_text(errors="replace")


def _per_size(specs) -> list[dict]:
    """`specs` as one mapping per image size: a mapping (one size) or a list of them."""
    return [specs] if isinstance(specs, dict) else list(specs)


def io_bytes_per_device(specs, where: dict[str, int]) -> dict[int, int]:
    """Bytes of the I/O tensors the sail runtime allocates on each chip, for nets placed `where`.
    `specs`: net name -> piece spec, or a list of those, one per image size of the build."""
    from fluxc.runtime.sail_flux import io_plan_sizes, kinds_of  # deferred: sail_flux imports PlannedTensor from here

    sizes = _per_size(specs)
    tensors, _ = io_plan_sizes(sizes, where, kinds_of(sizes[0]))
    out: dict[int, int] = {}
    for t in tensors:
        out[t.device] = out.get(t.device, 0) + t.nbytes
    return out


def per_chip_memory(files: list[tuple[int, str]], specs) -> dict[int, dict]:
    """Per chip device memory of a build from its files' `model_tool --info` text and their
    chip (`files`: (device, info text)), plus the runtime's I/O tensors. `specs`: net name ->
    piece spec, or a list of those, one per image size (each size's shapes: its stage). The one
    computation behind `fluxc compile`'s report, the stand-in's check and `fluxc verify`."""
    from fluxc.runtime.sail_flux import io_plan_sizes, kinds_of  # deferred: sail_flux imports PlannedTensor from here

    sizes = _per_size(specs)
    where, mems = {}, []
    for dev, text in files:
        mems.append((dev, bmodel_memory_from_info(text)))
        for net in parse_info(text).nets:
            where[net.name] = dev
    missing = [n for n in sizes[0] if n not in where]
    if missing:
        raise FluxcError(f"no bmodel of the build holds net {missing[0]!r}; rebuild with fluxc compile")
    tensors, _ = io_plan_sizes(sizes, where, kinds_of(sizes[0]))
    return build_device_memory(mems, tensors)


def specs_per_size(manifest) -> list[dict]:
    """net name -> piece spec at each image size of an export (Manifest.at), first size first."""
    sizes = getattr(manifest, "sizes", None) or [(manifest.dims.height, manifest.dims.width)]
    return [{s.net_name: s for s in manifest.at(h, w).specs} for h, w in sizes]


def device_memory_for_build(chip_dir, manifest, quantize: str) -> dict[int, dict]:
    """Per chip (index) device memory of a compiled build: its bmodels' model_tool figures
    + the I/O tensors the sail runtime allocates for it at every image size (per_chip_memory).
    `manifest`: the export as load_manifest reads it (all its sizes)."""
    d = manifest.dims
    files = bmodel_files(Path(chip_dir), d.flux_type, quantize, d.tiny_vae)
    plan = placement(files, len(files["transformer"]))
    return per_chip_memory([(dev, read_info(f)) for f, dev in plan], specs_per_size(manifest))
