"""The build record, BM1684X/fluxc_build.json: what `fluxc compile` built, written last and
atomically next to the bmodels. `fluxc run` and `fluxc verify` learn what was compiled from
this record and nothing else (no file-name globbing, no copy of the recipe).

Schema (format 1; docs/DESIGN.md "Build record"):

    {"format": 1, "complete": true,
     "chip": "bm1684x", "toolchain": "<tpu-mlir version>", "flux_type": "dev"|"schnell",
     "quantize": "BF16"|"W4BF16" (the transformer blocks, as --quantize), "tiny_vae": bool,
     "check": bool (pieces checked on the simulator at compile),
     "devices": N (devices of the build: the BF16 transformer split; 1 otherwise),
     "device_split": compile's split table or null,
     "recipe": {"source": path, "sha256": of the file or null, "thresholds": {quant: [cos, euclid]}},
     "export": {"dir": path, "manifest_sha256": sha256 of the export's manifest.json},
     "files": [{"file": "clip.bmodel", "family": "clip", "device": 0, "sha256": ..., "size": bytes,
                "nets": [net, ...], "memory": {"device", "weight", "instruct", "runtime"}}],
     "pieces": [{"spec": PieceSpec.to_dict(), "file": "clip.bmodel", "net": "clip_head",
                 "quantize": "F16", "options": {...}, "tolerance": [cos, euclid], "checked": bool,
                 "similarity": {...} | null, "device": 0, "memory": {...}}],
     ["resolutions": [{"size": "WxH", "height", "width", "pieces": [rows as "pieces", for the pieces
                       whose spec differs at that size: stages of the same nets in the same files]}],
                       the first size being the one "pieces" describes; absent in a one-size build]
     "record_sha256": sha256 of the record without this key (json, sorted keys): a hand edit shows}

Devices are logical indices 0..N-1 of the build; the runtime maps them onto chip ids.
Placement (decided here, once): CLIP and VAE on device 0, T5 on the last device, transformer
file i on device i.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxc.errors import FluxcError
from fluxc.fsutil import sha256_file, sha256_json, write_json_atomic
from fluxc.specs import PieceSpec

RECORD = "fluxc_build.json"
FORMAT = 1
RECOMPILE = "run fluxc compile again"


def placement(family: str, index: int, n_devices: int) -> int:
    """Logical device of the index-th file of a family (the only placement rule)."""
    if family == "t5":
        return n_devices - 1
    if family == "transformer":
        return min(index, n_devices - 1)
    return 0


def write_record(out_dir: Path, *, exp, recipe, chip: str, toolchain: str, quantize: str, check: bool,
                 combined: list, results: dict, split_info: dict | None, extra_results: dict | None = None) -> Path:
    """Write OUT/fluxc_build.json (last step of fluxc compile).

    exp: fluxc.compile.export_in.ExportIn; recipe: Recipe; combined: CombinedResult list (in
    family order); results: piece name -> PieceResult."""
    out_dir = Path(out_dir)
    n_dev = split_info["devices"] if split_info else 1
    spec_of = {p.spec.name: p.spec for p in exp.pieces}
    files: list[dict[str, Any]] = []
    piece_rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    where: dict[str, tuple[str, int]] = {}
    for c in combined:
        fam = spec_of[c.data["pieces"][0]].family
        idx = seen.get(fam, 0)
        seen[fam] = idx + 1
        dev = placement(fam, idx, n_dev)
        path = out_dir / c.name
        # a net at several image sizes appears once (its stages are listed under "resolutions")
        unique = list(dict.fromkeys(c.data["pieces"]))
        nets = [spec_of[n].net_name for n in unique]
        files.append({"file": c.name, "family": fam, "device": dev, "sha256": sha256_file(path),
                      "size": path.stat().st_size, "nets": nets, "memory": c.data["memory"]})
        for n in unique:
            where[n] = (c.name, dev)
            piece_rows.append(_row(spec_of[n], results[n], c.name, dev, recipe))
    order = {p.spec.name: i for i, p in enumerate(exp.pieces)}
    piece_rows.sort(key=lambda row: order[row["spec"]["name"]])
    sizes = None
    if len(getattr(exp, "sizes", [])) > 1:
        sizes = []
        extra = {id(p) for _, p in exp.extra}
        for z in exp.sizes:
            rows = []
            for p in z.pieces:
                if id(p) in extra:
                    f, dev = where[p.spec.name]
                    rows.append(_row(p.spec, extra_results[f"{p.spec.name} @{z.label}"], f, dev, recipe))
            sizes.append({"size": z.label, "height": z.height, "width": z.width, "pieces": rows})
    rsrc = Path(recipe.source)
    record = {
        "format": FORMAT, "complete": True, "chip": chip, "toolchain": toolchain,
        "flux_type": exp.dims.flux_type, "quantize": quantize, "tiny_vae": exp.dims.tiny_vae,
        "check": check, "devices": n_dev, "device_split": split_info,
        "recipe": {"source": str(rsrc), "sha256": sha256_file(rsrc) if rsrc.is_file() else None,
                   "thresholds": {q: list(v) for q, v in recipe.thresholds.items()}},
        "export": {"dir": str(exp.folder), "manifest_sha256": sha256_file(Path(exp.folder) / "manifest.json")},
        "files": files, "pieces": piece_rows,
    }
    if sizes is not None:
        record["resolutions"] = sizes
    record["record_sha256"] = sha256_json(record)  # written last; a hand edit breaks it
    dest = out_dir / RECORD
    write_json_atomic(dest, record)
    return dest


def _row(spec, r, file: str, dev: int, recipe) -> dict[str, Any]:
    return {"spec": spec.to_dict(), "file": file, "net": spec.net_name,
            "quantize": r.data["quantize"], "options": r.data["options"],
            # the recipe's threshold for this quantisation (a cached result may
            # have been checked against a stricter one: checked_tolerance)
            "tolerance": list(recipe.thresholds[r.data["quantize"]]),
            "checked_tolerance": r.data["tolerance"], "checked": r.data["checked"],
            "similarity": r.data["similarity"], "device": dev, "memory": r.data["memory"]}


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class BuiltFile:
    path: Path
    family: str
    device: int
    sha256: str
    size: int
    nets: tuple[str, ...]
    memory: dict[str, Any]


@dataclass(frozen=True)
class BuiltPiece:
    spec: PieceSpec
    file: str
    net: str
    quantize: str
    options: dict[str, Any]
    tolerance: tuple[float, float]
    checked: bool
    similarity: dict[str, Any] | None
    device: int
    memory: dict[str, Any]


@dataclass
class BuildRecord:
    path: Path
    raw: dict[str, Any]
    files: list[BuiltFile]
    pieces: list[BuiltPiece]

    @property
    def chip_dir(self) -> Path:
        return self.path.parent

    @property
    def flux_type(self) -> str:
        return self.raw["flux_type"]

    @property
    def quantize(self) -> str:
        return self.raw["quantize"]

    @property
    def tiny_vae(self) -> bool:
        return bool(self.raw["tiny_vae"])

    @property
    def devices(self) -> int:
        return int(self.raw["devices"])

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image size the build holds, the first (default) one first."""
        rows = self.raw.get("resolutions")
        if rows:
            return [(int(r["height"]), int(r["width"])) for r in rows]
        for p in self.pieces:  # one size: the VAE decoder's output is the image
            if p.spec.family == "vae":
                return [(int(p.spec.outputs[0].shape[2]), int(p.spec.outputs[0].shape[3]))]
        return []

    @property
    def size_labels(self) -> list[str]:
        return [f"{w}x{h}" for h, w in self.sizes]

    def pieces_at(self, height: int, width: int) -> list["BuiltPiece"]:
        """Every piece of the build at one of its sizes (the size's own stages, the shared ones)."""
        if (height, width) not in self.sizes:
            raise FluxcError(f"this build has no {width}x{height} (width x height); it holds "
                             f"{', '.join(self.size_labels)}: run with one of those or export and compile that size")
        rows = self.raw.get("resolutions") or []
        own = {}
        for r in rows:
            if (int(r["height"]), int(r["width"])) == (height, width):
                own = {b.spec.name: b for b in (_built(x) for x in r.get("pieces", []))}
        return [own.get(p.spec.name, p) for p in self.pieces]

    @property
    def recipe_thresholds(self) -> dict[str, list[float]]:
        return self.raw["recipe"]["thresholds"]

    def piece(self, name: str) -> BuiltPiece:
        for p in self.pieces:
            if p.spec.name == name:
                return p
        raise FluxcError(f"{self.path} has no piece {name!r}; {RECOMPILE}")

    def files_of(self, family: str) -> list[BuiltFile]:
        return [f for f in self.files if f.family == family]

    def on_device(self, device: int) -> list[BuiltFile]:
        return [f for f in self.files if f.device == device]

    def mismatched_files(self) -> list[tuple[BuiltFile, str]]:
        """(file, what is wrong) for every file whose bytes differ from the record."""
        bad = []
        for f in self.files:
            if not f.path.is_file():
                bad.append((f, "missing"))
            elif f.path.stat().st_size != f.size:
                bad.append((f, f"size {f.path.stat().st_size} bytes, the record says {f.size}"))
            elif sha256_file(f.path) != f.sha256:
                bad.append((f, "sha256 differs from the build record (changed or swapped after compile)"))
        return bad

    def check_files(self) -> None:
        """FluxcError naming the first file that does not match the record."""
        bad = self.mismatched_files()
        if bad:
            f, why = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise FluxcError(f"{f.path}: {why}{more}; {RECOMPILE}")

    def check_export(self, export_dir: Path) -> None:
        """FluxcError if the export's manifest is not the one this build was compiled from."""
        m = Path(export_dir) / "manifest.json"
        if not m.is_file() or sha256_file(m) != self.raw["export"]["manifest_sha256"]:
            raise FluxcError(f"the bmodels in {self.chip_dir} were compiled from another export than {export_dir} "
                             f"(manifest.json differs); {RECOMPILE}")


def _bad(path: Path, why: str) -> FluxcError:
    return FluxcError(f"{path} {why}; {RECOMPILE}")


def _built(p: dict[str, Any]) -> BuiltPiece:
    return BuiltPiece(PieceSpec.from_dict(p["spec"]), p["file"], p["net"], p["quantize"],
                      dict(p.get("options") or {}), tuple(float(x) for x in p["tolerance"]),
                      bool(p["checked"]), p.get("similarity"), int(p["device"]), dict(p.get("memory") or {}))


def load_record(chip_dir: Path, check_files: bool = True) -> BuildRecord:
    """Read and validate CHIP_DIR/fluxc_build.json; with check_files, every file's size and
    sha256 too. One-line FluxcError on any problem."""
    chip_dir = Path(chip_dir)
    path = chip_dir / RECORD
    if not chip_dir.is_dir():
        raise FluxcError(f"no compiled models in {chip_dir}; run fluxc compile first (or use --backend onnx)")
    if not path.is_file():
        raise FluxcError(f"{chip_dir} has no {RECORD}: it was compiled by an older fluxc or not at all: {RECOMPILE}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"is truncated or not valid JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict) or not raw.get("complete"):
        raise _bad(path, "is incomplete")
    if raw.get("format") != FORMAT:
        raise _bad(path, f"has format {raw.get('format')!r}, this fluxc reads {FORMAT}")
    body = {k: v for k, v in raw.items() if k != "record_sha256"}
    if raw.get("record_sha256") != sha256_json(body):
        raise _bad(path, "was edited after compile (its checksum record_sha256 does not match its content)")
    try:
        files = [BuiltFile(chip_dir / f["file"], f["family"], int(f["device"]), str(f["sha256"]), int(f["size"]),
                           tuple(f["nets"]), dict(f.get("memory") or {})) for f in raw["files"]]
        pieces = [_built(p) for p in raw["pieces"]]
        for r in raw.get("resolutions") or []:
            int(r["height"]), int(r["width"])
            pieces_extra = [_built(p) for p in r.get("pieces", [])]
            if any(p.file not in {f.path.name for f in files} for p in pieces_extra):
                raise KeyError("resolutions: a piece in a file the record does not list")
        for k in ("flux_type", "quantize", "tiny_vae", "devices", "chip", "toolchain"):
            raw[k]
        raw["recipe"]["thresholds"]
        raw["export"]["manifest_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(path, f"is malformed (bad or missing {e})") from None
    names = {f.path.name for f in files}
    for p in pieces:
        if p.file not in names:
            raise _bad(path, f"is inconsistent (piece {p.spec.name} in {p.file}, which it does not list)")
        if not 0 <= p.device < int(raw["devices"]):
            raise _bad(path, f"is inconsistent (piece {p.spec.name} on device {p.device})")
    rec = BuildRecord(path, raw, files, pieces)
    if check_files:
        rec.check_files()
    return rec
