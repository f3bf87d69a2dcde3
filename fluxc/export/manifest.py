"""manifest.json of an export folder: written last and atomically by `fluxc export`, read by
compile, verify and run through `load_manifest`.

Layout (format 1):
    {"format": 1, "complete": true,
     "source": {"model": <path or hub id>, "kind": "local"|"hub", "revision": ...},
     "options": {...}, "versions": {"torch": ..., ...},
     "dims": FluxDims.to_dict(),
     "pieces": [PieceSpec.to_dict() + {"file", "sha256", "key", ["external_data", "external_sha256"]}],
     "files": {"rotary_emb": "rotary_emb.npy", "tokenizer": "tokenizer", ...},
     ["resolutions": [{"size": "WxH", "height", "width", "dir": "" (the first: the top-level pieces),
                       "pieces": []},
                      {"size": "WxH", "height", "width", "dir": "res/WxH", "rotary_emb": "rotary_emb.npy",
                       "pieces": [entries as above, files relative to dir: only the pieces whose
                                  spec differs from the first size's]}, ...]]}
A one-size export has no "resolutions" key. `Manifest.at(height, width)` is the export seen at
one of its sizes (dims, specs, piece files, rotary table), what run and compile use per size.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxc.errors import FluxcError
from fluxc.fsutil import write_json_atomic
from fluxc.specs import FluxDims, PieceSpec

MANIFEST = "manifest.json"
# The export's side files (key in the manifest's "files" -> path in the export folder)
SIDE_FILES = {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2", "rotary_emb": "rotary_emb.npy",
              "vae_config": "vae_config.json", "scheduler_config": "scheduler/scheduler_config.json",
              "tiny_vae_config": "tiny_vae_config.json"}
FORMAT = 1


@dataclass
class Manifest:
    export_dir: Path
    dims: FluxDims
    specs: list[PieceSpec]
    source: dict[str, Any]
    options: dict[str, Any]
    versions: dict[str, Any]
    entries: dict[str, dict[str, Any]]  # piece name -> raw manifest entry (file, sha256, ...)
    files: dict[str, str] = field(default_factory=dict)
    probe: dict[str, Any] | None = None  # {"dims", "pieces"}: small-shape pieces in probe/
    resolutions: list[dict[str, Any]] | None = None  # several image sizes (see module doc)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image size of the export, the first (default) one first."""
        if not self.resolutions:
            return [(self.dims.height, self.dims.width)]
        return [(int(r["height"]), int(r["width"])) for r in self.resolutions]

    @property
    def size_labels(self) -> list[str]:
        return [f"{w}x{h}" for h, w in self.sizes]

    def at(self, height: int, width: int) -> "Manifest":
        """The export at one of its sizes: its dims, the specs and files of every piece at that size
        (the size's own pieces, the shared ones from the top level) and its rotary table."""
        if (height, width) == (self.dims.height, self.dims.width):
            return self
        if (height, width) not in self.sizes:
            raise FluxcError(f"the export in {self.export_dir} has no {width}x{height} (width x height); "
                             f"it holds {', '.join(self.size_labels)}")
        row = next(r for r in self.resolutions if (int(r["height"]), int(r["width"])) == (height, width))
        own = {e["name"]: e for e in row.get("pieces", [])}
        d = row["dir"]
        entries, specs = {}, []
        for s in self.specs:
            if s.name in own:
                e = dict(own[s.name])
                e["file"] = f"{d}/{e['file']}"
                entries[s.name] = e
                specs.append(PieceSpec.from_dict(e))
            else:
                entries[s.name] = self.entries[s.name]
                specs.append(s)
        files = dict(self.files)
        files["rotary_emb"] = f"{d}/{row.get('rotary_emb', 'rotary_emb.npy')}"
        return Manifest(self.export_dir, dataclasses.replace(self.dims, height=height, width=width), specs,
                        self.source, self.options, self.versions, entries, files, None, self.resolutions)

    def path(self, piece: str) -> Path:
        """ONNX file of one piece."""
        try:
            return self.export_dir / self.entries[piece]["file"]
        except KeyError:
            raise FluxcError(f"piece {piece!r} is not in the export {self.export_dir}; "
                             f"re-run `fluxc export`") from None

    def spec(self, piece: str) -> PieceSpec:
        for s in self.specs:
            if s.name == piece:
                return s
        raise FluxcError(f"piece {piece!r} is not in the export {self.export_dir}; re-run `fluxc export`")

    def sha256(self, piece: str) -> str:
        return self.entries[piece]["sha256"]

    def side_file(self, key: str) -> Path:
        """Where one of the export's side files (SIDE_FILES) is."""
        return self.export_dir / self.files.get(key, SIDE_FILES[key])

    rotary_path = property(lambda self: self.side_file("rotary_emb"))
    tokenizer_dir = property(lambda self: self.side_file("tokenizer"))
    tokenizer_2_dir = property(lambda self: self.side_file("tokenizer_2"))
    vae_config_path = property(lambda self: self.side_file("vae_config"))
    scheduler_config_path = property(lambda self: self.side_file("scheduler_config"))


def write_manifest(out: Path, *, source: dict, options: dict, versions: dict, dims: FluxDims, files: dict,
                   pieces: list[dict], probe: dict | None = None, resolutions: list[dict] | None = None) -> None:
    """Write OUT/manifest.json last, atomically, with "complete": true (left alone when unchanged)."""
    manifest = {"format": FORMAT, "complete": True, "source": source, "options": options, "versions": versions,
                "dims": dims.to_dict(), "files": files, "pieces": pieces}
    if probe is not None:
        manifest["probe"] = probe
    if resolutions is not None:
        manifest["resolutions"] = resolutions
    if read_manifest_json(out) != manifest:
        write_json_atomic(out / MANIFEST, manifest)


def mark_incomplete(out: Path, old: dict) -> None:
    """Before the folder changes: the old manifest re-written with "complete": false, so that no
    later run trusts a half-updated export."""
    write_json_atomic(out / MANIFEST, {**old, "complete": False})


def read_manifest_json(export_dir: Path) -> dict[str, Any] | None:
    """The raw manifest, or None if there is none or it cannot be parsed."""
    p = Path(export_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def load_manifest(export_dir: Path) -> Manifest:
    """Read an export folder's manifest; FluxcError if it is missing or incomplete."""
    export_dir = Path(export_dir)
    p = export_dir / MANIFEST
    if not p.is_file():
        raise FluxcError(f"no export found in {export_dir} (missing {MANIFEST}); run `fluxc export` first")
    raw = read_manifest_json(export_dir)
    if raw is None:
        raise FluxcError(f"{p} is unreadable; re-run `fluxc export --force`")
    if not raw.get("complete"):
        raise FluxcError(f"the export in {export_dir} is incomplete; re-run `fluxc export`")
    if raw.get("format") != FORMAT:
        raise FluxcError(f"{p} has format {raw.get('format')!r}, expected {FORMAT}; re-run `fluxc export --force`")
    try:
        dims = FluxDims.from_dict(raw["dims"])
        specs = [PieceSpec.from_dict(d) for d in raw["pieces"]]
        entries = {d["name"]: d for d in raw["pieces"]}
    except (KeyError, TypeError, ValueError) as e:
        raise FluxcError(f"{p} is malformed ({e}); re-run `fluxc export --force`") from None
    m = Manifest(export_dir, dims, specs, raw.get("source", {}), raw.get("options", {}),
                 raw.get("versions", {}), entries, raw.get("files", {}), raw.get("probe"), raw.get("resolutions"))
    try:
        views = [m.at(h, w) for h, w in m.sizes]
    except (KeyError, TypeError, ValueError) as e:
        raise FluxcError(f"{p} is malformed (resolutions: {e}); re-run `fluxc export --force`") from None
    missing = [f"{s.name} ({v.dims.width}x{v.dims.height})" if v is not m else s.name
               for v in views for s in v.specs if not v.path(s.name).is_file()]
    if missing:
        raise FluxcError(f"the export in {export_dir} lacks {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}; re-run `fluxc export`")
    return m
