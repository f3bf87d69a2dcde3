"""Reading and checking the export folder that `fluxc compile` starts from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fluxc.errors import FluxcError
from fluxc.export.manifest import load_manifest
from fluxc.specs import FluxDims, PieceSpec, piece_specs


@dataclass
class ExportPiece:
    spec: PieceSpec
    path: Path
    sha256: str  # of the .onnx file, plus its inline-weights file and the content of the checkpoint tensors it references
    weight_bytes: int = 0  # its weights as float32 (what the compiler holds), files included


@dataclass
class ExportIn:
    folder: Path
    dims: FluxDims
    pieces: list[ExportPiece]
    probes: list[ExportPiece] = field(default_factory=list)  # small-shape pieces the simulator checks
    # Every image size of the export (issue 11), the first being `dims`/`pieces` themselves.
    sizes: list["SizeIn"] = field(default_factory=list)

    @property
    def extra(self) -> list[tuple["SizeIn", ExportPiece]]:
        """(size, piece) for the pieces of the further sizes that are not the first size's."""
        first = {id(p) for p in self.pieces}
        return [(z, p) for z in self.sizes[1:] for p in z.pieces if id(p) not in first]


@dataclass
class SizeIn:
    height: int
    width: int
    dims: FluxDims
    pieces: list[ExportPiece]  # every piece at this size (the shared ones are the first size's objects)

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


def read_export(folder: Path, flux_type: str | None, tiny_vae: bool | None) -> ExportIn:
    """Read <folder>/manifest.json (format of docs/DESIGN.md) and check that every piece
    file is there and that the export is of the flux type / VAE asked for."""
    folder = Path(folder).resolve()  # tools run in their own folders: absolute paths only
    m = load_manifest(folder)  # FluxcError if missing / incomplete / malformed / files missing
    dims = m.dims
    pieces = []
    for s in m.specs:
        e = m.entries[s.name]
        sha = e["sha256"] + (f"+{e['external_sha256']}" if e.get("external_sha256") else "") \
            + (f"+w{e['weights_sha256']}" if e.get("weights_sha256") else "")
        onnx_bytes = m.path(s.name).stat().st_size if m.path(s.name).is_file() else 0
        pieces.append(ExportPiece(s, m.path(s.name), sha, 4 * int(e.get("weight_numel", 0)) + onnx_bytes))
    dims.check_asked(flux_type, tiny_vae, f"the export in {folder}")

    expected = [s.name for s in piece_specs(dims)]
    got = [p.spec.name for p in pieces]
    if got != expected:
        missing = [n for n in expected if n not in got]
        what = f"missing pieces {', '.join(missing[:4])}" if missing else "pieces out of order or unexpected"
        raise FluxcError(f"export in {folder}: {what}; re-run `fluxc export`")
    for p in pieces:
        if not p.path.is_file():
            raise FluxcError(f"export in {folder}: piece file {p.path.name} is missing; re-run `fluxc export`")
    sizes = [SizeIn(dims.height, dims.width, dims, pieces)]
    by_name = {p.spec.name: p for p in pieces}
    for h, w in m.sizes[1:]:
        v = m.at(h, w)
        zp = []
        for s in v.specs:
            if v.entries[s.name] is m.entries.get(s.name):
                zp.append(by_name[s.name])
                continue
            e = v.entries[s.name]
            sha = e["sha256"] + (f"+{e['external_sha256']}" if e.get("external_sha256") else "") \
                + (f"+w{e['weights_sha256']}" if e.get("weights_sha256") else "")
            zp.append(ExportPiece(s, v.path(s.name), sha, 4 * int(e.get("weight_numel", 0)) + v.path(s.name).stat().st_size))
        sizes.append(SizeIn(h, w, v.dims, zp))
    return ExportIn(folder, dims, pieces, _probes(folder, m), sizes)


def _probes(folder: Path, m) -> list[ExportPiece]:
    out = []
    for e in (m.probe or {}).get("pieces", []):
        spec = PieceSpec.from_dict(e)
        path = folder / "probe" / e["file"]
        if not path.is_file():
            raise FluxcError(f"export in {folder}: probe piece {e['file']} is missing; re-run `fluxc export`")
        out.append(ExportPiece(spec, path, e["sha256"] + f"+w{e.get('weights_sha256', '')}",
                               4 * int(e.get("weight_numel", 0)) + path.stat().st_size))
    return out
