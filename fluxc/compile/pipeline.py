"""`fluxc compile`: every piece of an export through TPU-MLIR (in parallel, cached), then
the combined files of the sophon-demo layout, the device split, the cost estimate and
compile_report.json."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxc.compile import tools as toolmod
from fluxc.compile.build import PieceResult, compile_piece
from fluxc.compile.combine import CombinedResult, combine, publish
from fluxc.compile.export_in import ExportIn, read_export
from fluxc.compile.recipe import QUANTIZE_CLI, Recipe, load_recipe, piece_plan
from fluxc.compile.split import MB, PieceMem, device_cost, split_contiguous, split_table
from fluxc.compile.tools import Tools
from fluxc.errors import FluxcError
from fluxc.fsutil import write_json_atomic

REPORT_FORMAT = 1
MAX_DEVICES = 8


@dataclass
class CompileOptions:
    export_dir: Path
    out_dir: Path
    build_dir: Path
    quantize: str
    flux_type: str | None = None
    tiny_vae: bool | None = None
    chip: str = "bm1684x"
    devices: int = 3
    jobs: int | None = None
    recipe: Path | None = None
    check: bool = True


def normalize_quantize(q: str) -> str:
    u = q.strip().upper()
    if u not in QUANTIZE_CLI:
        raise FluxcError(f"unknown quantisation {q!r}; use --quantize {' or '.join(QUANTIZE_CLI)}")
    return u


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_jobs(onnx_bytes: list[int]) -> int:
    """min(cores, available memory / the memory of the biggest piece's compile). model_transform
    is the memory peak: measured ~14.7x the ONNX size for a full-size single block
    (8.3 GB for 566 MB) and ~10.4x for a double block (14.1 GB for 1.36 GB); we plan 15x + 1 GB."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    per_piece = 15 * max(onnx_bytes or [0]) + (1 << 30)
    return max(1, min(cores, _mem_available() // per_piece))


def output_files(flux_type: str, quantize: str, devices: int, tiny_vae: bool) -> dict[str, str]:
    """Family -> output file name (transformer: per device for BF16)."""
    return {
        "clip": "clip.bmodel",
        "t5": "w4bf16_t5.bmodel",
        "transformer": (f"{flux_type}_w4bf16_transformer.bmodel" if quantize == "W4BF16"
                        else f"{flux_type}_bf16_transformer_on_device{{i}}.bmodel"),
        "vae": "tiny_vae_decoder_bf16.bmodel" if tiny_vae else "vae_decoder_bf16.bmodel",
    }


class _Progress:
    """A rich progress bar with done/total and the names of the pieces being compiled;
    plain lines when the output is not a terminal."""

    def __init__(self, total: int, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.running: list[str] = []
        self.lock = threading.Lock()
        self.progress = Progress(TextColumn("[bold]compile"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"),
                                 console=console, transient=False)
        self.task = self.progress.add_task("", total=total)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *a):
        self.progress.__exit__(*a)

    def _desc(self) -> str:
        return ("running: " + ", ".join(self.running[:4]) + (" ..." if len(self.running) > 4 else "")) \
            if self.running else ""

    def start(self, name: str) -> None:
        with self.lock:
            self.running.append(name)
            self.progress.update(self.task, description=self._desc())

    def done(self, name: str, line: str) -> None:
        with self.lock:
            if name in self.running:
                self.running.remove(name)
            self.progress.update(self.task, advance=1, description=self._desc())
            self.progress.console.print(line, highlight=False)


def _piece_line(r: PieceResult) -> str:
    d = r.data
    sim = (d.get("similarity") or {}).get("quantized")
    s = f"cos {sim['cosine']:.5f}" if sim else "unchecked"
    est = f"{d['estimate_ms']:.3f} ms" if d.get("estimate_ms") is not None else "-"
    how = "cached" if r.cache_hit else f"{r.seconds:.0f} s"
    return f"{r.name:<28} {d['quantize']:<6} {s:<12} est {est:<11} {how}"


def run_compile(opts: CompileOptions, console=None) -> dict[str, Any]:
    from rich.console import Console

    console = console or Console(stderr=False)
    t0 = time.monotonic()
    quantize = normalize_quantize(opts.quantize)
    chip = opts.chip.lower()
    if not 1 <= opts.devices <= MAX_DEVICES:
        raise FluxcError(f"--devices {opts.devices} is out of range; use 1..{MAX_DEVICES}")
    if opts.jobs is not None and opts.jobs < 1:
        raise FluxcError(f"--jobs {opts.jobs} is invalid; use 1 or more")
    recipe: Recipe = load_recipe(opts.recipe, chip)
    if recipe.chip != chip:
        raise FluxcError(f"recipe {recipe.source} is for {recipe.chip}, not {chip}; pass a recipe for {chip}")
    exp: ExportIn = read_export(opts.export_dir, opts.flux_type, opts.tiny_vae)
    dims = exp.dims
    toolmod.require()
    toolchain = toolmod.version()
    tools = Tools()
    # Tools run with their own working folders: every path handed to them must be absolute.
    build_root = Path(opts.build_dir).resolve()
    build_root.mkdir(parents=True, exist_ok=True)
    plans = {p.spec.name: piece_plan(recipe, p.spec, quantize) for p in exp.pieces}
    jobs = opts.jobs or default_jobs([p.path.stat().st_size for p in exp.pieces])

    console.print(f"fluxc compile: FLUX.1-{dims.flux_type}, transformer {quantize}, chip {chip}, "
                  f"{len(exp.pieces)} pieces, {jobs} job(s), check {'on' if opts.check else 'off'}; "
                  f"export {exp.folder}, build cache {build_root}", highlight=False)

    results: dict[str, PieceResult] = {}
    errors: list[BaseException] = []
    with _Progress(len(exp.pieces), console) as prog, ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = list(exp.pieces)
        running: dict[Future, str] = {}

        def submit(p) -> None:
            prog.start(p.spec.name)
            fut = pool.submit(compile_piece, p.spec, p.path, p.sha256, plans[p.spec.name], chip, toolchain,
                              build_root, tools, opts.check)
            running[fut] = p.spec.name

        while pending and len(running) < jobs:
            submit(pending.pop(0))
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                try:
                    r = fut.result()
                except BaseException as e:  # stop scheduling; let the running ones finish
                    errors.append(e)
                    prog.done(name, f"{name:<28} FAILED")
                    continue
                results[name] = r
                prog.done(name, _piece_line(r))
            while pending and len(running) < jobs and not errors:
                submit(pending.pop(0))
    if errors:
        raise errors[0]

    ordered = [results[p.spec.name] for p in exp.pieces]
    by_family: dict[str, list[PieceResult]] = {}
    for p, r in zip(exp.pieces, ordered):
        by_family.setdefault(p.spec.family, []).append(r)

    names = output_files(dims.flux_type, quantize, opts.devices, dims.tiny_vae)
    out_dir = Path(opts.out_dir).resolve()
    combined: list[CombinedResult] = []
    split_info: dict[str, Any] | None = None
    for fam in ("clip", "t5", "transformer", "vae"):
        prs = by_family[fam]
        if fam == "transformer" and quantize == "BF16":
            n = min(opts.devices, len(prs))
            mems = [PieceMem(r.name, r.memory["weight"] + r.memory["instruct"], r.memory["runtime"]) for r in prs]
            parts = split_contiguous(mems, n)
            table = split_table(parts)
            start = 0
            for i, part in enumerate(parts):
                chunk = prs[start:start + len(part)]
                start += len(part)
                c = combine(names[fam].format(i=i), chunk, build_root, tools, chip, toolchain)
                combined.append(c)
                table[i]["file"] = c.name
                table[i]["measured_mb"] = round(c.data["memory"]["device"] / MB, 3)
                table[i]["modeled_mb"] = round(device_cost(part) / MB, 3)
            split_info = {"flux_type": dims.flux_type, "devices": n, "model": "sum(weight+instruct) + max(runtime)",
                          "max_device_mb": max(r["total_mb"] for r in table), "split": table}
            # drop files of a previous run with more devices
            for i in range(n, MAX_DEVICES):
                for stale in (out_dir / names[fam].format(i=i), out_dir / (names[fam].format(i=i) + ".info.txt")):
                    stale.unlink(missing_ok=True)
        else:
            combined.append(combine(names[fam], prs, build_root, tools, chip, toolchain))
    for c in combined:
        publish(c, out_dir)
    if split_info is not None:
        write_json_atomic(out_dir / "device_split.json", split_info)
        _print_split(console, split_info)

    estimate = _estimate(exp, results)
    report = {
        "format": REPORT_FORMAT,
        "flux_type": dims.flux_type, "quantize": quantize, "chip": chip, "tiny_vae": dims.tiny_vae,
        "devices": split_info["devices"] if split_info else 1, "check": opts.check,
        "recipe": recipe.source, "toolchain": toolchain, "export_dir": str(exp.folder),
        "build_dir": str(build_root), "jobs": jobs,
        "tool_runs": len(tools.runs), "tool_commands": tools.runs,
        "seconds": round(time.monotonic() - t0, 2),
        "estimate_ms": estimate,
        "outputs": [{"file": c.name, "pieces": c.data["pieces"], "cache_hit": c.cache_hit,
                     "memory": c.data["memory"]} for c in combined],
        "device_split": split_info,
        "pieces": {r.name: {
            "quantize": r.data["quantize"], "options": r.data["options"], "tolerance": r.data["tolerance"],
            "checked": r.data["checked"], "similarity": r.data["similarity"],
            "estimate_ms": r.data["estimate_ms"], "memory": r.data["memory"],
            "cache_hit": r.cache_hit, "seconds": round(r.seconds, 2),
            "build_seconds": r.data.get("seconds"), "build_dir": str(r.folder),
        } for r in ordered},
    }
    write_json_atomic(out_dir / "compile_report.json", report)
    # Last: the build record run and verify read (fluxc/build_record.py).
    from fluxc.build_record import write_record
    write_record(out_dir, exp=exp, recipe=recipe, chip=chip, toolchain=toolchain, quantize=quantize,
                 check=opts.check, combined=combined, results=results, split_info=split_info)
    _print_estimate(console, estimate)
    console.print(f"wrote {len(combined)} bmodel(s) to {out_dir} in {report['seconds']:.1f} s "
                  f"({report['tool_runs']} TPU-MLIR tool run(s)); report: {out_dir / 'compile_report.json'}",
                  highlight=False)
    return report


def _estimate(exp: ExportIn, results: dict[str, PieceResult]) -> dict[str, Any]:
    def total(fams: tuple[str, ...]) -> float | None:
        vals = [results[p.spec.name].data.get("estimate_ms") for p in exp.pieces if p.spec.family in fams]
        return None if any(v is None for v in vals) else round(sum(vals), 4)

    return {"denoising_step_ms": total(("transformer",)), "clip_ms": total(("clip",)), "t5_ms": total(("t5",)),
            "text_encoders_ms": total(("clip", "t5")), "vae_ms": total(("vae",)),
            "source": "compiler cost model (compiler_profile_0.txt of each piece), not a board measurement"}


def _print_split(console, split: dict[str, Any]) -> None:
    from rich.table import Table

    from fluxc.compile.split import describe_range

    t = Table(title=f"BF16 transformer over {split['devices']} device(s)")
    for col in ("device", "pieces", "weight MB", "runtime MB", "total MB", "model_tool MB"):
        t.add_column(col)
    for r in split["split"]:
        t.add_row(str(r["device"]), describe_range(r["pieces"]), f"{r['weight_mb']:.2f}",
                  f"{r['runtime_mb']:.2f}", f"{r['total_mb']:.2f}", f"{r.get('measured_mb', 0):.2f}")
    console.print(t)


def _print_estimate(console, e: dict[str, Any]) -> None:
    def f(v):
        return "-" if v is None else f"{v:.3f} ms"

    console.print(f"estimated on-chip time (compiler cost model): one denoising step {f(e['denoising_step_ms'])}, "
                  f"text encoders {f(e['text_encoders_ms'])} (CLIP {f(e['clip_ms'])}, T5 {f(e['t5_ms'])}), "
                  f"VAE {f(e['vae_ms'])}", highlight=False)
