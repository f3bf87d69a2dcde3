"""Combined bmodels (model_tool --combine), cached by their inputs, and published to OUT."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxc.compile.build import PieceResult, folder_lock
from fluxc.fsutil import COMPLETE
from fluxc.compile.parse import parse_info
from fluxc.compile.tools import Tools
from fluxc.fsutil import sha256_json, write_json_atomic, write_text_atomic


@dataclass
class CombinedResult:
    name: str  # output file name, e.g. clip.bmodel
    folder: Path
    bmodel: Path
    info_text: str
    data: dict[str, Any]
    cache_hit: bool


def combine(out_name: str, pieces: list[PieceResult], build_root: Path, tools: Tools,
            chip: str, toolchain: str) -> CombinedResult:
    key = sha256_json({"out": out_name, "pieces": [p.data["key"] for p in pieces], "chip": chip,
                       "toolchain": toolchain})
    stem = out_name.removesuffix(".bmodel")
    folder = build_root / "combined" / f"{stem}-{key[:16]}"
    with folder_lock(folder):
        return _combine(out_name, pieces, folder, key, tools)


def _combine(out_name: str, pieces: list[PieceResult], folder: Path, key: str, tools: Tools) -> CombinedResult:
    final = folder / out_name
    info_path = folder / f"{out_name}.info.txt"
    if (folder / COMPLETE).is_file() and final.is_file() and info_path.is_file():
        try:
            data = json.loads((folder / "result.json").read_text())
            return CombinedResult(out_name, folder, final, info_path.read_text(), data, True)
        except (OSError, ValueError):
            pass
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tmp = folder / f"tmp-{out_name}"
    if len(pieces) == 1:
        # one net: nothing to combine, the piece's bmodel is the file
        shutil.copyfile(pieces[0].bmodel, tmp)
    else:
        tools.run("model_tool", ["--combine", *[str(p.bmodel.resolve()) for p in pieces], "-o", tmp.name],
                  folder, folder / "combine.log", out_name)
    os.replace(tmp, final)
    info_text = tools.info(final, folder, folder / "info.log", out_name)
    info = parse_info(info_text)
    # keep only the tool's own output (the log's first line is the command)
    clean = "\n".join(line for line in info_text.splitlines() if not line.startswith("$ ")) + "\n"
    write_text_atomic(info_path, clean)
    data = {"key": key, "pieces": [p.name for p in pieces], "info": info.to_dict(),
            "memory": {"device": info.device_mem, "weight": info.weight, "instruct": info.instruct,
                       "runtime": info.runtime}}
    write_json_atomic(folder / "result.json", data)
    write_text_atomic(folder / COMPLETE, key + "\n")
    return CombinedResult(out_name, folder, final, clean, data, False)


def publish(res: CombinedResult, out_dir: Path) -> Path:
    """Put the combined file (and its .info.txt) into OUT: a hard link when possible
    (no copy of gigabytes), else a copy; written under a temp name, then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / res.name
    for src, dst in ((res.bmodel, dest), (res.folder / f"{res.name}.info.txt", out_dir / f"{res.name}.info.txt")):
        if dst.exists():
            try:
                if os.path.samefile(src, dst):
                    continue
            except OSError:
                pass
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return dest
