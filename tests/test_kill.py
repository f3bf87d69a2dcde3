"""kill -9 of a running `fluxc compile`: no TPU-MLIR tool outlives it, and the resumed compile
gives bmodels identical to an uninterrupted build's except for the build time TPU-MLIR writes
into each bmodel (a ctime string such as "Mon Nov 30 17:16:00 2026").

Cheap by construction: the resumed build starts from the session compile cache of the
uninterrupted reference build (`compiled_schnell_w4`, hard links) minus two small pieces, so
only those two are compiled again (one tool at a time, --jobs 1)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures_compile import REPO, compile_into, make_workspace

W4_ARGS = ["--quantize", "W4BF16", "--flux-type", "schnell", "--tiny-vae"]
DROPPED = ("clip_tail", "t5_tail")  # the pieces the resumed build compiles again
TOOLS = ("model_transform", "model_deploy", "model_tool", "tpuc-opt", "model_runner", "npz_tool")
# TPU-MLIR's build time in a bmodel: time.ctime() format, 24 bytes.
CTIME = re.compile(rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                   rb"[ \d]\d \d\d:\d\d:\d\d \d{4}")


def time_spans(data: bytes) -> list[tuple[int, int]]:
    return [m.span() for m in CTIME.finditer(data)]


def differing_outside_time(a: bytes, b: bytes) -> list[int]:
    """Offsets where a and b differ, outside the build-time strings of either file."""
    assert len(a) == len(b)
    spans = time_spans(a) + time_spans(b)
    import numpy as np

    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    return [int(i) for i in diff if not any(s <= i < e for s, e in spans)]


def tool_processes(build_dir: Path) -> list[psutil.Process]:
    """Every live process that works in `build_dir` (cwd or command line), zombies excluded."""
    found = []
    needle = str(build_dir)
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if needle in cmd or (p.info["cwd"] or "").startswith(needle):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_time_mask_finds_exactly_the_build_time() -> None:
    a = b"\x00head Mon Nov 30 17:16:00 2026 \x01body"
    b = b"\x00head Tue Dec  1 09:05:59 2026 \x01body"
    assert time_spans(a) == [(6, 30)]
    assert differing_outside_time(a, b) == []
    assert differing_outside_time(a, a.replace(b"body", b"bodY")) == [len(a) - 1]


def test_kill9_compile_leaves_no_tool_and_resumes_identically(compiled_schnell_w4: Path, tmp_path: Path) -> None:
    ref_ws = compiled_schnell_w4
    report = json.loads((ref_ws / "BM1684X" / "compile_report.json").read_text())
    export_dir = (ref_ws / "onnx").resolve()

    # the build cache of the uninterrupted build, minus the pieces to compile again
    build = tmp_path / "build"
    for name, piece in report["pieces"].items():
        src = Path(piece["build_dir"])
        if name not in DROPPED:
            shutil.copytree(src, build / "pieces" / src.name, copy_function=os.link)
    ws = make_workspace(tmp_path / "ws", export_dir)

    cmd = [sys.executable, "-m", "fluxc.cli", "compile", "--models", str(ws), "--build-dir", str(build),
           *W4_ARGS, "--jobs", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "COLUMNS": "160"})
    # wait until a TPU-MLIR tool (and its own children) run under this compile, then kill -9
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            tools = [k for k in kids if any(t in " ".join(k.cmdline()) for t in TOOLS)]
            if tools:
                time.sleep(1.0)  # let the tool start its own children (python -> tpuc-opt ...)
                for k in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        seen[k.pid] = " ".join(k.cmdline())[:200]
                    except psutil.NoSuchProcess:
                        pass
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the compile ended before any tool could be caught running"
        assert any(any(t in c for t in TOOLS) for c in seen.values()), seen
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # no tool may outlive its fluxc (a short grace period for the launcher to act)
    survivors: list[int] = []
    for _ in range(50):
        survivors = sorted({p.pid for p in tool_processes(build)} | {pid for pid in seen if _alive(pid)})
        if not survivors:
            break
        time.sleep(0.1)
    assert not survivors, [(pid, seen.get(pid, "")) for pid in survivors]
    assert not (ws / "BM1684X" / "compile_report.json").exists()

    # resume: only the dropped pieces are compiled, then everything is combined
    rep2 = compile_into(ws, build, [*W4_ARGS, "--jobs", "1"])
    rebuilt = sorted(n for n, p in rep2["pieces"].items() if not p["cache_hit"])
    assert rebuilt == sorted(DROPPED), rebuilt

    # identical to the uninterrupted build except for the build-time strings
    ref_files = sorted(p.name for p in (ref_ws / "BM1684X").glob("*.bmodel"))
    got_files = sorted(p.name for p in (ws / "BM1684X").glob("*.bmodel"))
    assert got_files == ref_files and ref_files
    for name in ref_files:
        a = (ref_ws / "BM1684X" / name).read_bytes()
        b = (ws / "BM1684X" / name).read_bytes()
        assert len(a) == len(b), name
        assert time_spans(a), f"{name}: no build time found"
        assert differing_outside_time(a, b) == [], name
    for name in DROPPED:
        a = Path(report["pieces"][name]["build_dir"])
        b = Path(rep2["pieces"][name]["build_dir"])
        assert a.name == b.name  # same content key
        ba, bb = (next(a.glob("*.bmodel")).read_bytes(), next(b.glob("*.bmodel")).read_bytes())
        assert differing_outside_time(ba, bb) == [], name


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
