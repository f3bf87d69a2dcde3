"""`fluxc compile`: every piece of an export through TPU-MLIR (in parallel, cached), then
the combined files of the sophon-demo layout, the device split, the cost estimate and
compile_report.json."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fluxc.build_record import placement, write_record
from fluxc.compile import tools as toolmod
from fluxc.compile.build import PieceResult
from fluxc.compile.chips import chip_record, get_chip
from fluxc.compile.combine import CombinedResult, combine, publish
from fluxc.compile.export_in import ExportIn, read_export
from fluxc.compile.profile_breakdown import breakdown
from fluxc.compile.recipe import QUANTIZE_CLI, Recipe, load_recipe, piece_plan
from fluxc.compile.schedule import Job, plan_jobs, run_local
from fluxc.compile.split import MB, PieceMem, device_cost, split_contiguous, split_table
from fluxc.compile.tools import Tools
from fluxc.errors import FluxcError
from fluxc.fsutil import write_json_atomic
from fluxc.machine import cores
from fluxc.specs import FAMILIES
from fluxc.runtime.device_memory import BUDGET_MB, per_chip_memory

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
    estimate_only: bool = False  # memory and cost figures only: no bmodel kept, nothing combined
    cluster: str | None = None  # a Ray address (or "auto"): pieces compiled as Ray tasks (fluxc/cluster/)


def normalize_quantize(q: str) -> str:
    u = q.strip().upper()
    if u not in QUANTIZE_CLI:
        raise FluxcError(f"unknown quantisation {q!r}; use --quantize {' or '.join(QUANTIZE_CLI)}")
    return u


def output_files(flux_type: str, quantize: str, devices: int, tiny_vae: bool) -> dict[str, str]:
    """Family -> output file name (transformer: per device for BF16)."""
    return {
        "clip": "clip.bmodel",
        "t5": "w4bf16_t5.bmodel",
        "transformer": (f"{flux_type}_w4bf16_transformer.bmodel" if quantize == "W4BF16"
                        else f"{flux_type}_bf16_transformer_on_device{{i}}.bmodel"),
        "vae": "tiny_vae_decoder_bf16.bmodel" if tiny_vae else "vae_decoder_bf16.bmodel",
        # image-input builds (issue 19); the reference has no encoder, so no reference name to follow
        "vae_encoder": "tiny_vae_encoder_bf16.bmodel" if tiny_vae else "vae_encoder_bf16.bmodel",
    }


class _Progress:
    """A rich progress bar with done/total and the names of the pieces being compiled;
    plain lines when the output is not a terminal."""

    def __init__(self, total: int, console) -> None:
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


def _piece_line(r: PieceResult, label: str | None = None) -> str:
    d = r.data
    sim = (d.get("similarity") or {}).get("quantized")
    s = f"cos {sim['cosine']:.5f}" if sim else "unchecked"
    est = f"{d['estimate_ms']:.3f} ms" if d.get("estimate_ms") is not None else "-"
    how = "cached" if r.cache_hit else f"{r.seconds:.0f} s"
    fallback = (d.get("fold") or {}).get("fallback")
    note = f"  (not folded, model_transform simplified it: {fallback})" if fallback else ""
    return f"{label or r.name:<28} {d['quantize']:<6} {s:<12} est {est:<11} {how}{note}"


def run_compile(opts: CompileOptions, console=None) -> dict[str, Any]:
    console = console or Console(stderr=False)
    t0 = time.monotonic()
    quantize = normalize_quantize(opts.quantize)
    chip = get_chip(opts.chip).name  # one-line error listing the supported chips (fluxc/compile/chips.py)
    if not 1 <= opts.devices <= MAX_DEVICES:
        raise FluxcError(f"--num-devices {opts.devices} is out of range; use 1..{MAX_DEVICES}")
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
    jobs = opts.jobs or cores()

    console.print(f"fluxc compile: FLUX.1-{dims.flux_type}, transformer {quantize}, chip {chip}, "
                  f"{len(exp.pieces)} pieces, "
                  f"{f'Ray cluster {opts.cluster}' if opts.cluster else f'{jobs} job(s)'}, check {'on' if opts.check else 'off'}; "
                  f"export {exp.folder}, build cache {build_root}", highlight=False)

    # With probe pieces (a full-size export), the simulator checks them, first, in place of the
    # full-size pieces it cannot run in reasonable time; otherwise every piece is checked.
    probes = exp.probes if opts.check else []
    check_full = opts.check and not probes
    if probes:
        console.print(f"checking {len(probes)} probe pieces ({', '.join(p.spec.name for p in probes)}, same weights "
                      f"at a small shape) on the chip simulator first; the full-size pieces are compiled without "
                      f"the simulator run", highlight=False)
    probe_plans = {p.spec.name: piece_plan(recipe, p.spec, quantize) for p in probes}
    probe_results: dict[str, PieceResult] = {}
    results: dict[str, PieceResult] = {}
    # Further image sizes (issue 11): their own pieces (transformer, VAE at that size) are
    # compiled like any piece, under the same net names; they become stages of the same nets.
    extra = exp.extra
    plans.update({f"{p.spec.name} @{z.label}": piece_plan(recipe, p.spec, quantize) for z, p in extra})
    if len(exp.sizes) > 1:
        console.print(f"image sizes (width x height): {', '.join(z.label for z in exp.sizes)}; "
                      f"{len(extra)} size-dependent piece(s) compiled per further size, merged as stages of "
                      f"the same nets (weights stored once)", highlight=False)
    jobs_list = plan_jobs(probes, exp.pieces, extra, probe_plans, plans, build_root, check_full, opts.estimate_only)
    with _Progress(len(jobs_list), console) as prog:
        def on_start(job: Job) -> None:
            prog.start(job.label)

        def on_done(job: Job, r: PieceResult | None, where: str = "") -> None:
            prog.done(job.label, f"{job.label:<28} FAILED" if r is None else _piece_line(r, job.label) + where)

        if opts.cluster:
            from fluxc.cluster.compile import run_on_cluster  # deferred: Ray is an optional extra

            done, errors = run_on_cluster(opts.cluster, jobs_list, exp, chip, toolchain, tools, build_root,
                                          on_start, on_done,
                                          say=lambda t: prog.progress.console.print(t, highlight=False))
        else:
            done, errors = run_local(jobs_list, jobs, chip, toolchain, tools, on_start, on_done)
    if errors:
        raise errors[0]
    extra_results: dict[str, PieceResult] = {}
    for job in jobs_list:
        r = done[job.label]
        if job.what == "size":
            extra_results[job.label] = r
        else:
            (probe_results if job.what == "probe" else results)[r.name] = r

    ordered = [results[p.spec.name] for p in exp.pieces]
    by_family: dict[str, list[PieceResult]] = {}
    for p, r in zip(exp.pieces, ordered):
        by_family.setdefault(p.spec.family, []).append(r)

    if opts.estimate_only:
        rep = _estimate_only_report(opts, exp, ordered, by_family, quantize, chip, recipe, toolchain, build_root,
                                    jobs, tools, t0, console, probe_results)
        if len(exp.sizes) > 1:  # the estimated step per size (memory: the first size's pieces only)
            rep["resolutions"] = _sizes_report(exp, results, extra_results)
            write_json_atomic(Path(opts.out_dir).resolve() / "estimate_report.json", rep)
        return rep

    # The further sizes' pieces, by net: each joins the combine of its first-size net (one stage
    # per distinct input shape; model_tool --combine refuses the same name at the same shapes).
    # Each net's largest stage goes first: model_tool --info then reports the runtime (activation)
    # area the net needs at its largest size (it reports stage 0's; measured in
    # benchmarks/resolution_merge.py), and the runtime's buffers are sized for it.
    stages: dict[str, list[tuple[int, PieceResult]]] = {}
    seen_shapes = {(p.spec.name, p.spec.inputs) for p in exp.pieces}

    def volume(spec) -> int:
        return sum(math.prod(t.shape) for t in spec.inputs)

    for p in exp.pieces:
        stages[p.spec.name] = [(volume(p.spec), results[p.spec.name])]
    for z, p in extra:
        if (p.spec.name, p.spec.inputs) not in seen_shapes:
            seen_shapes.add((p.spec.name, p.spec.inputs))
            stages[p.spec.name].append((volume(p.spec), extra_results[f"{p.spec.name} @{z.label}"]))

    def with_stages(prs: list[PieceResult]) -> list[PieceResult]:
        return [r for pr in prs for _, r in sorted(stages[pr.name], key=lambda vr: -vr[0])]

    names = output_files(dims.flux_type, quantize, opts.devices, dims.tiny_vae)
    out_dir = Path(opts.out_dir).resolve()
    combined: list[CombinedResult] = []
    split_info: dict[str, Any] | None = None
    for fam in [f for f in FAMILIES if f in by_family]:
        prs = by_family[fam]
        if fam == "transformer" and quantize == "BF16":
            n = min(opts.devices, len(prs))
            parts = split_contiguous(_mems(prs, exp), n)
            table = split_table(parts)
            start = 0
            for i, part in enumerate(parts):
                chunk = prs[start:start + len(part)]
                start += len(part)
                c = combine(names[fam].format(i=i), with_stages(chunk), build_root, tools, chip, toolchain)
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
            combined.append(combine(names[fam], with_stages(prs), build_root, tools, chip, toolchain))
    for c in combined:
        publish(c, out_dir)
    if split_info is not None:
        write_json_atomic(out_dir / "device_split.json", split_info)
        _print_split(console, split_info)

    estimate = _estimate(exp, results)
    estimate["chip"] = chip_record(chip)  # the clock and peak the estimate is read against
    sizes = _sizes_report(exp, results, extra_results)
    report = {
        "format": REPORT_FORMAT,
        "flux_type": dims.flux_type, "quantize": quantize, "chip": chip, "tiny_vae": dims.tiny_vae,
        "devices": split_info["devices"] if split_info else 1, "check": opts.check,
        "checked": _checked(opts.check, probe_results),
        "probe_checks": {n: _probe_entry(r) for n, r in probe_results.items()},
        "recipe": recipe.source, "toolchain": toolchain, "export_dir": str(exp.folder),
        "build_dir": str(build_root), "jobs": jobs, "cluster": opts.cluster,
        "tool_runs": len(tools.runs), "tool_commands": tools.runs,
        "seconds": round(time.monotonic() - t0, 2),
        "estimate_ms": estimate,
        "breakdown": template_breakdowns(exp, results),
        "resolutions": sizes,
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
    report["device_memory"] = _device_memory(exp, combined, split_info["devices"] if split_info else 1, chip)
    write_json_atomic(out_dir / "compile_report.json", report)
    # Last: the build record run and verify read (fluxc/build_record.py).
    write_record(out_dir, exp=exp, recipe=recipe, chip=chip, toolchain=toolchain, quantize=quantize,
                 check=opts.check, combined=combined, results=results, split_info=split_info,
                 extra_results=extra_results)
    _print_summary(console, report, combined, out_dir)
    return report


# The board a chip's build is held against (runtime/device_memory.py has the budgets).
TARGET_BOARD = {"bm1684x": "SE7-32"}


def _device_memory(exp: ExportIn, combined: list[CombinedResult], n_dev: int, chip: str) -> dict[str, Any]:
    """Device memory per chip as the sail runtime will hold it: every combined file's model_tool
    figures (weight + instructions + runtime) plus the I/O tensors the runtime allocates (one
    per role and chip, runtime/sail_flux.io_plan): the same figure the sail stand-in measures
    and `fluxc verify` checks against the board."""
    family = {p.spec.name: p.spec.family for p in exp.pieces}
    seen: dict[str, int] = {}
    files = []
    for c in combined:
        fam = family[c.data["pieces"][0]]
        files.append((placement(fam, seen.get(fam, 0), n_dev), c.info_text))
        seen[fam] = seen.get(fam, 0) + 1
    # the runtime's I/O tensors at every image size (one per role, chip and distinct shape)
    per_chip = per_chip_memory(files, [{p.spec.net_name: p.spec for p in z.pieces} for z in (exp.sizes or [exp])])
    board = TARGET_BOARD.get(chip)
    budget = BUDGET_MB.get(board) if board else None
    return {"board": board, "budget_mb": budget,
            "chips": [{"device": d, "models_mb": round(r["models"] / MB, 1), "io_mb": round(r["io"] / MB, 1),
                       "total_mb": round(r["total"] / MB, 1), "io_tensors": r["tensors"],
                       "fits": None if budget is None else r["total"] <= budget * MB} for d, r in per_chip.items()]}


def _print_summary(console, report: dict[str, Any], combined: list[CombinedResult], out_dir: Path) -> None:
    """What a user needs at the end: files and their size, device memory per chip against the
    board, estimated time per step, and what was checked."""
    t = Table(title=f"{len(combined)} bmodel file(s) in {out_dir}")
    for col in ("file", "nets", "size on disk MB"):
        t.add_column(col)
    for c in combined:
        t.add_row(c.name, str(len(c.data["pieces"])), f"{(out_dir / c.name).stat().st_size / MB:.1f}")
    console.print(t)
    dm = report["device_memory"]
    for c in dm["chips"]:
        verdict = "" if dm["budget_mb"] is None else \
            f" of {dm['budget_mb']:.0f} MB on a {dm['board']}: {'fits' if c['fits'] else 'DOES NOT FIT'}"
        console.print(f"device {c['device']}: {c['total_mb']:.1f} MB (bmodels {c['models_mb']:.1f} + I/O tensors "
                      f"{c['io_mb']:.1f}){verdict}", highlight=False)
    _print_estimate(console, report["estimate_ms"])
    if len(report.get("resolutions") or []) > 1:
        def f(v):
            return "-" if v is None else f"{v:.3f} ms"

        console.print("per image size (width x height), estimated: " + "; ".join(
            f"{z['size']} step {f(z['denoising_step_ms'])}, VAE {f(z['vae_ms'])}" for z in report["resolutions"]),
            highlight=False)
    console.print(f"checked: {report['checked']}", highlight=False)
    console.print(f"wrote {len(combined)} bmodel(s) to {out_dir} in {report['seconds']:.1f} s "
                  f"({report['tool_runs']} TPU-MLIR tool run(s)); report: {out_dir / 'compile_report.json'}",
                  highlight=False)


def template_breakdowns(exp, results: dict[str, PieceResult]) -> dict[str, Any]:
    """Where the estimated time goes, once per graph: for each piece kind, the breakdown of its
    first piece (the template of the kind; the others have the same graph and quantisation),
    from the compiler's profile (fluxc/compile/profile_breakdown.py)."""
    out: dict[str, Any] = {}
    for p in exp.pieces:
        r = results.get(p.spec.name)
        if r is None or p.spec.kind in out:
            continue
        # read from the profile the piece's folder keeps (one home for it: never stale in a cached result)
        b = breakdown(r.folder / "work" / "compiler_profile_0.txt", top_layers=10)
        if b is not None:
            out[p.spec.kind] = {"piece": r.name, "quantize": r.data["quantize"],
                                "estimate_ms": r.data.get("estimate_ms"), **b}
    return out


def _checked(check: bool, probe_results: dict) -> str:
    if not check:
        return "nothing on the simulator (--no-check)"
    if probe_results:
        return f"probe pieces on the simulator ({len(probe_results)}: one per full-width kind, small shape, same weights)"
    return "every piece on the simulator"


def _probe_entry(r: PieceResult) -> dict[str, Any]:
    return {"quantize": r.data["quantize"], "similarity": r.data["similarity"], "tolerance": r.data["tolerance"],
            "cache_hit": r.cache_hit, "seconds": round(r.seconds, 2), "build_dir": str(r.folder)}


def _mems(results: list[PieceResult], exp) -> list[PieceMem]:
    """Each compiled piece's device memory (weight + instructions, runtime) with its kind."""
    spec = {p.spec.name: p.spec for p in exp.pieces}
    return [PieceMem(r.name, r.memory["weight"] + r.memory["instruct"], r.memory["runtime"],
                     spec[r.name].kind, spec[r.name].index) for r in results]


def _estimate_only_report(opts, exp, ordered, by_family, quantize, chip, recipe, toolchain, build_root, jobs, tools,
                          t0, console, probe_results) -> dict[str, Any]:
    """What a build would take, from every piece compiled for real (bmodels not kept): device
    memory per chip modelled as in the BF16 split (sum of weight + instructions, plus the largest
    runtime area of the nets on that chip; exact on the combined files of every tiny build),
    the cost-model time per step, and the split itself."""
    tr = by_family["transformer"]
    if quantize == "BF16":
        parts = split_contiguous(_mems(tr, exp), min(opts.devices, len(tr)))
    else:
        parts = [_mems(tr, exp)]
    # the reference's placement: CLIP and the VAE with the first transformer part, T5 with the last
    chips = [list(p) for p in parts]
    chips[0] = _mems(by_family["clip"], exp) + chips[0] + _mems(by_family["vae"], exp) \
        + _mems(by_family.get("vae_encoder", []), exp)
    chips[-1] = chips[-1] + _mems(by_family["t5"], exp)
    per_chip = [{"device": i, "pieces": [m.name for m in c], "modeled_mb": round(device_cost(c) / MB, 1)}
                for i, c in enumerate(chips)]
    estimate = _estimate(exp, {r.name: r for r in ordered})
    out_dir = Path(opts.out_dir).resolve()
    report = {
        "format": REPORT_FORMAT, "estimate_only": True,
        "flux_type": exp.dims.flux_type, "quantize": quantize, "chip": chip, "tiny_vae": exp.dims.tiny_vae,
        "devices": len(parts), "check": opts.check, "recipe": recipe.source, "toolchain": toolchain,
        "checked": _checked(opts.check, probe_results),
        "probe_checks": {n: _probe_entry(r) for n, r in probe_results.items()},
        "export_dir": str(exp.folder), "build_dir": str(build_root), "jobs": jobs,
        "tool_runs": len(tools.runs), "seconds": round(time.monotonic() - t0, 2), "estimate_ms": estimate,
        "breakdown": template_breakdowns(exp, {r.name: r for r in ordered}),
        "device_memory": per_chip,
        "pieces": {r.name: {"quantize": r.data["quantize"], "estimate_ms": r.data["estimate_ms"],
                            "memory": r.data["memory"], "cache_hit": r.cache_hit,
                            "seconds": round(r.seconds, 2), "build_dir": str(r.folder)} for r in ordered},
    }
    write_json_atomic(out_dir / "estimate_report.json", report)
    for c in per_chip:
        console.print(f"device {c['device']}: {len(c['pieces'])} nets, modelled device memory {c['modeled_mb']:.0f} MB",
                      highlight=False)
    _print_estimate(console, estimate)
    console.print(f"estimate only: no bmodel kept; report: {out_dir / 'estimate_report.json'}", highlight=False)
    return report


def _sizes_report(exp: ExportIn, results: dict[str, PieceResult], extra_results: dict[str, PieceResult]) -> list:
    """Per image size: the cost-model time per step and of the VAE, from that size's pieces."""
    out = []
    for i, z in enumerate(exp.sizes):
        own = {p.spec.name for p in z.pieces if i and any(p is q for _, q in exp.extra)}

        def est(fam: str):
            vals = [(extra_results[f"{p.spec.name} @{z.label}"] if p.spec.name in own else results[p.spec.name])
                    .data.get("estimate_ms") for p in z.pieces if p.spec.family == fam]
            return None if any(v is None for v in vals) else round(sum(vals), 4)

        out.append({"size": z.label, "height": z.height, "width": z.width,
                    "denoising_step_ms": est("transformer"), "vae_ms": est("vae"),
                    "pieces": sorted(own)})
    return out


def _estimate(exp: ExportIn, results: dict[str, PieceResult]) -> dict[str, Any]:
    def total(fams: tuple[str, ...]) -> float | None:
        vals = [results[p.spec.name].data.get("estimate_ms") for p in exp.pieces if p.spec.family in fams]
        return None if any(v is None for v in vals) else round(sum(vals), 4)

    return {"denoising_step_ms": total(("transformer",)), "clip_ms": total(("clip",)), "t5_ms": total(("t5",)),
            "text_encoders_ms": total(("clip", "t5")), "vae_ms": total(("vae",)),
            "vae_encoder_ms": total(("vae_encoder",)) if any(p.spec.family == "vae_encoder" for p in exp.pieces)
            else None,
            "source": "compiler cost model (compiler_profile_0.txt of each piece), not a board measurement"}


def _print_split(console, split: dict[str, Any]) -> None:
    t = Table(title=f"BF16 transformer over {split['devices']} device(s)")
    for col in ("device", "pieces", "weight MB", "runtime MB", "total MB", "model_tool MB"):
        t.add_column(col)
    for r in split["split"]:
        t.add_row(str(r["device"]), r["summary"], f"{r['weight_mb']:.2f}",
                  f"{r['runtime_mb']:.2f}", f"{r['total_mb']:.2f}", f"{r.get('measured_mb', 0):.2f}")
    console.print(t)


def _print_estimate(console, e: dict[str, Any]) -> None:
    def f(v):
        return "-" if v is None else f"{v:.3f} ms"

    console.print(f"estimated on-chip time (compiler cost model): one denoising step {f(e['denoising_step_ms'])}, "
                  f"text encoders {f(e['text_encoders_ms'])} (CLIP {f(e['clip_ms'])}, T5 {f(e['t5_ms'])}), "
                  f"VAE {f(e['vae_ms'])}" + (f", VAE encoder {f(e['vae_encoder_ms'])}" if e.get("vae_encoder_ms")
                                             is not None else ""), highlight=False)
