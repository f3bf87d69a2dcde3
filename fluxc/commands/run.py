"""fluxc run: generate one image with the FLUX pipeline on the simulator, ONNX Runtime or a chip."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fluxc import workspace
from fluxc.compile.chips import get_chip
from fluxc.errors import FluxcError
from fluxc.export.manifest import load_manifest
from fluxc.fsutil import atomic_path
from fluxc.runtime import sail_sim
from fluxc.runtime.device_memory import MB
from fluxc.runtime.models import BACKENDS, open_bmodels, open_onnx, read_build
from fluxc.runtime.pipeline import DEFAULT_PROMPT, FluxPipeline, save_png
from fluxc.runtime.prompt_tokens import TruncationWarning
from fluxc.runtime.reference_layout import open_download
from fluxc.runtime.sail_engine import check_devices, import_sail
from fluxc.runtime.sail_flux import SailFlux
from fluxc.specs import DEFAULT_STEPS


def open_pipeline(models: Path, backend: str, quantize: str | None = None, flux_type: str | None = None,
                  tiny_vae: bool | None = None, devices: list[int] | None = None,
                  height: int | None = None, width: int | None = None, export: Path | None = None,
                  say=None, chip: str = "bm1684x"):
    """(pipeline, model set, quantize used) for one workspace and backend. Shared by verify."""
    backends = tuple(BACKENDS) + tuple(b for b in SAIL_BACKENDS if b not in BACKENDS)
    if backend not in backends:
        raise FluxcError(f"unknown --backend {backend!r}; use one of {', '.join(backends)}")

    c = get_chip(chip)  # models/<CHIP>/ on that chip's simulator (issue 11: BM1688)
    models = Path(models)
    if not models.is_dir():
        raise FluxcError(f"models folder {models} does not exist; run fluxc export and fluxc compile, "
                         "or point --models / FLUXC_MODELS at a workspace")
    loc = workspace.locate(models, c.name)  # a workspace, an export folder or a bmodel folder
    exp = Path(export) if export else loc.export
    if export is None and loc.kind == "workspace" and not (exp / workspace.MANIFEST).is_file():
        # no fluxc export here: a sophon-demo download is run as it is (runtime/reference_layout.py)
        from fluxc.runtime import reference_layout as ref

        if ref.looks_like_download(models, c.folder):
            plan = ref.plan_download(models, c.folder, flux_type, quantize, tiny_vae)
            return _open_download(plan, backend, devices, height, width, say, c.runtime_name)
        raise FluxcError(f"{models} is neither a fluxc workspace (no onnx/manifest.json: run fluxc export and "
                         f"fluxc compile) nor a sophon-demo download (no {c.folder}/*.bmodel, ids_emb.pt, "
                         "tokenizer/, tokenizer_2/); point --models at one")
    man = load_manifest(exp)
    d = man.dims
    d.check_asked(flux_type, tiny_vae, f"the export in {exp}")
    if backend in SAIL_BACKENDS:
        return _open_sail(loc.chip, backend, man, quantize, devices, say, height, width)
    if backend == "onnx":
        if quantize:
            warnings.warn("--quantize is ignored by the onnx backend (it runs the float export)")
        h, w = pick_size(man.sizes, height, width, f"the export in {exp}")
        view = man.at(h, w)
        ms, q = open_onnx(view, progress=say), "F32"
    else:
        # What was built comes from the build record only (fluxc/build_record.py).
        rec = read_build(loc.chip, d, quantize)
        rec.check_export(exp)
        h, w = pick_size(rec.sizes, height, width, "this build")
        view = man.at(h, w)
        want = {s.name: s for s in view.specs}
        got = {p.spec.name: p.spec for p in rec.pieces_at(h, w)}
        if want != got:
            raise FluxcError(f"{rec.path} does not describe this export at {w}x{h}; run fluxc compile again")
        ms, q = open_bmodels(backend, rec.chip_dir, d, quantize, devices, progress=say, record=rec,
                             chip=c.runtime_name)
    return FluxPipeline(ms, view), ms, q


def pick_size(sizes: list[tuple[int, int]], height: int | None, width: int | None, what: str) -> tuple[int, int]:
    """The (height, width) of `sizes` that --height/--width ask for (the first size by default;
    one of the two given: the first size with it). One-line error listing the sizes otherwise."""
    if not height and not width:
        return sizes[0]
    for h, w in sizes:
        if (not height or h == height) and (not width or w == width):
            return h, w
    ask = f"{width or '*'}x{height or '*'}"
    raise FluxcError(f"{what} has no {ask} (width x height); it holds {', '.join(f'{w}x{h}' for h, w in sizes)}: "
                     f"run with one of those (--width W --height H), or re-export with that size "
                     f"(fluxc export --resolution {width or 1024}x{height or 1024}) and compile")


# ---- sail backends (sophon.sail on the chip; sail-sim: its stand-in on the simulator) ----
SAIL_BACKENDS = ("sail", "sail-sim")


def _open_download(plan, backend: str, devices, height, width, say, runtime_chip: str):
    """A sophon-demo download's bmodels, adopted (runtime/reference_layout.py): nets, sizes and
    dtypes from the files, run by the same pipeline / sail runtime as a fluxc build."""
    if backend in SAIL_BACKENDS:
        from fluxc.runtime.sail_engine import check_devices, import_sail

        check_devices(import_sail(backend), list(devices) if devices else list(range(plan.devices)))
    ms, man = open_download(plan, backend, devices, progress=say, runtime_chip=runtime_chip)
    try:
        d = man.dims
        if (height and height != d.height) or (width and width != d.width):
            raise FluxcError(f"the bmodels in {plan.models / plan.chip} are compiled for {d.width}x{d.height} "
                             f"(width x height); drop --height/--width")
        if backend in SAIL_BACKENDS:
            from fluxc.runtime.sail_flux import SailFlux

            ms.device_resident = SailFlux(ms, man)
        pipe = FluxPipeline(ms, man)
    except BaseException:
        rt = getattr(ms, "device_resident", None)
        if rt is not None:
            rt.close()
        ms.close()
        raise
    return pipe, ms, man.quantize


def _open_sail(chip_dir: Path, backend: str, man, quantize, devices, say, height=None, width=None):
    """Check the device ids, open the build's bmodels through sail (or the stand-in) and lay
    out the device tensors of every size of the build (runtime/sail_flux.py); the pipeline runs
    at the size asked for. Nothing runs unless all of it fits."""
    d = man.dims
    sail = import_sail(backend)
    # What was built comes from the build record only (fluxc/build_record.py).
    rec = read_build(chip_dir, d, quantize)
    rec.check_export(man.export_dir)
    h, w = pick_size(rec.sizes, height, width, "this build")
    views = [man.at(*z) for z in rec.sizes]
    for (zh, zw), v in zip(rec.sizes, views):
        if {s.name: s for s in v.specs} != {p.spec.name: p.spec for p in rec.pieces_at(zh, zw)}:
            raise FluxcError(f"{rec.path} does not describe this export at {zw}x{zh}; run fluxc compile again")
    n_tr = rec.devices
    devices = list(devices) if devices else list(range(n_tr))
    if len(devices) < n_tr:
        raise FluxcError(f"the {rec.quantize} transformer is split over {n_tr} chips; give --devices with {n_tr} ids")
    check_devices(sail, devices)
    ms, q = open_bmodels(backend, rec.chip_dir, d, quantize, devices, progress=say, record=rec)
    try:
        ms.device_resident = SailFlux(ms, man, views)
    except BaseException:
        ms.close()
        raise
    return FluxPipeline(ms, views[rec.sizes.index((h, w))]), ms, q


def device_memory_lines(backend: str) -> list[str]:
    """What the sail stand-in measured per chip (peak of models + tensors)."""
    if backend != "sail-sim":
        return []

    return [f"device {c.dev_id}: {c.peak_bytes / MB:.1f} MB peak (models {c.model_bytes / MB:.1f} MB, "
            f"{c.allocations} tensors {c.tensor_bytes / MB:.2f} MB; host->device {c.h2d_bytes / MB:.2f} MB, "
            f"device->host {c.d2h_bytes / MB:.2f} MB, chip->chip in {c.c2c_in_bytes / MB:.2f} MB)"
            for c in sail_sim.stats().values()]


def parse_devices(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        ids = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise FluxcError(f"--devices {text!r}: give chip ids like 0,1,2") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise FluxcError(f"--devices {text!r}: give distinct non-negative chip ids like 0,1,2")
    return ids


# The options that open a pipeline, shared by `fluxc run` and `fluxc serve` (fluxc/commands/serve.py).
MODELS_OPTION = typer.Option(None, "--models", help="Workspace, export folder (fluxc export --out), bmodel "
                             "folder (fluxc compile --out) or a sophon-demo FLUX.1 download's models/ "
                             "folder (default: FLUXC_MODELS or ./models).")
BACKEND_OPTION = typer.Option("cmodel", "--backend", help="cmodel (chip simulator), onnx (float reference), sail (chip) "
                              "or sail-sim (the sail runtime on a stand-in over the chip simulator).")
QUANTIZE_OPTION = typer.Option(None, "--quantize", help="Transformer quantisation: BF16 or W4BF16 (default: what is compiled).")
FLUX_TYPE_OPTION = typer.Option(None, "--flux-type", help="dev, schnell or kontext (checked against the export).")
TINY_VAE_OPTION = typer.Option(None, "--tiny-vae/--full-vae", help="Check which VAE the export holds.")
DEVICES_OPTION = typer.Option(None, "--devices", help='Chip ids for the sail backend, e.g. "0,1,2" or "0 1 2".')
CHIP_OPTION = typer.Option("bm1684x", "--chip", help="bm1684x or bm1688: which models/<CHIP>/ folder and simulator.")


def describe_build(pipe, ms, q: str, backend: str, load_s: float) -> list[str]:
    """What was opened, in words: files, backend, flux type, quantisation, size, load time, the
    download it came from, the LoRAs fused at export (`fluxc run` prints it; `fluxc serve` shows it)."""
    d = pipe.dims
    lines = [f"loaded {len(ms.engines)} model file(s) on {backend} ({d.flux_type}, {q}, "
             f"{d.width}x{d.height}) in {load_s:.2f} s"]
    describe = getattr(pipe.manifest, "describe", None)  # an adopted sophon-demo download
    if describe:
        lines.append(describe())
    if pipe.manifest.options.get("lora"):  # fused at export (fluxc.export.lora)
        from fluxc.export.lora import describe as describe_lora

        lines.append(f"LoRA fused at export: {describe_lora(pipe.manifest.options['lora'])}")
    return lines


def run(
    models: Optional[Path] = MODELS_OPTION,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt (CLIP and, unless --prompt-2, T5)."),
    prompt_2: Optional[str] = typer.Option(None, "--prompt-2", help="Separate prompt for T5."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default 4 schnell, 28 dev)."),
    guidance: float = typer.Option(3.5, "--guidance", help="Guidance scale (dev only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise (torch CPU generator, as diffusers)."),
    backend: str = BACKEND_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    flux_type: Optional[str] = FLUX_TYPE_OPTION,
    tiny_vae: Optional[bool] = TINY_VAE_OPTION,
    devices: Optional[str] = DEVICES_OPTION,
    height: Optional[int] = typer.Option(None, "--height", help="Image height: one of the build's sizes (default: its first)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width: one of the build's sizes (default: its first)."),
    out: Path = typer.Option(Path("result.png"), "--out", help="Output PNG (written atomically)."),
    chip: str = CHIP_OPTION,
    save_latents: Optional[Path] = typer.Option(None, "--save-latents", help="Also save the final packed latents (.npy)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Input image (PNG/JPEG, at most 4096x4096): img2img as "
                                         "diffusers' FluxImg2ImgPipeline, resized to the build's size. The build needs "
                                         "the VAE encoder (fluxc export --image-input)."),
    strength: Optional[float] = typer.Option(None, "--strength", help="img2img: how much of the image is repainted, "
                                             "in (0, 1] (default 0.6; 1 ignores the image's content)."),
) -> None:
    """Generate one image with the compiled (or exported) FLUX.1 pieces.

    Example: fluxc run --backend cmodel --prompt "a red fox in the snow" --steps 4 --seed 42 --out fox.png

    Example (the board's sail runtime, on the simulator): fluxc run --backend sail-sim --devices 0,1,2

    Example (sophon-demo's download as it is: models/BM1684X/*.bmodel, ids_emb.pt, tokenizer/,
    tokenizer_2/): fluxc run --models sophon-demo/sample/FLUX.1/models --quantize W4BF16 --flux-type schnell

    Example (img2img; export with --image-input): fluxc run --image in.png --strength 0.6 --prompt "a watercolour"
    """
    con = Console(stderr=True)
    m = workspace.models_dir(models)
    if steps is not None and steps < 1:
        raise FluxcError("--steps must be at least 1")
    init = None  # img2img input (runtime/image_input.py): checked before any model is loaded
    if strength is not None and image is None:
        raise FluxcError("--strength is for img2img; give --image too")
    if image is not None:
        from fluxc.runtime.image_input import check_strength, read_image

        strength = check_strength(strength) if strength is not None else None
        init = read_image(image)
    t0 = time.perf_counter()
    with con.status(f"loading models ({backend}) ..."):
        pipe, ms, q = open_pipeline(m, backend, quantize, flux_type, tiny_vae, parse_devices(devices),
                                    height, width, chip=chip)
    load_s = time.perf_counter() - t0
    d = pipe.dims
    for line in describe_build(pipe, ms, q, backend, load_s):
        con.print(line)
    n_steps = steps or DEFAULT_STEPS[d.flux_type]
    n_run = n_steps  # the steps run (img2img trims them by strength)
    if d.kontext:  # FLUX.1 Kontext: --image is the image to edit, every step runs
        if init is None or strength is not None:
            if getattr(ms, "device_resident", None) is not None:
                ms.device_resident.close()
            ms.close()
            raise FluxcError("this is a FLUX.1 Kontext build: give the image to edit with --image (and no --strength)"
                             if init is None else "--strength is for img2img; a Kontext build edits the --image as "
                             "the prompt says: drop --strength")
        con.print(f"Kontext: editing {image} (reference {d.ref_width}x{d.ref_height})")
    elif init is not None:
        from fluxc.runtime.image_input import trim_timesteps

        if not any(s.family == "vae_encoder" for s in pipe.manifest.specs):
            if getattr(ms, "device_resident", None) is not None:
                ms.device_resident.close()
            ms.close()
            raise FluxcError("this build has no VAE encoder, so it takes no --image; re-export with "
                             "`fluxc export --image-input` and compile again")
        n_run = n_steps - trim_timesteps(n_steps, 0.6 if strength is None else strength)
        con.print(f"img2img from {image} (strength {0.6 if strength is None else strength}: {n_run} of {n_steps} steps)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        with Progress(TextColumn("denoising"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TimeElapsedColumn(), console=con) as prog:
            task = prog.add_task("steps", total=n_run)
            img_kw = dict(image=init, strength=0.6 if strength is None else strength) if init is not None else {}
            res = pipe(prompt or DEFAULT_PROMPT, prompt_2, n_steps, guidance, seed,
                       on_step=lambda i, n: prog.update(task, completed=i), **img_kw)
    for w in caught:
        con.print(f"[yellow]warning:[/yellow] {w.message}")
    for n in res.notes:
        con.print(f"[yellow]note:[/yellow] {n}")
    save_png(res.image, out)
    if save_latents:
        with atomic_path(Path(save_latents)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, res.latents)
    t = res.timings
    con.print(f"generation {t['generate_s']:.2f} s (text encoders {t['text_encoders_s']:.2f} s, "
              f"{n_run} steps {t['denoise_s']:.2f} s, VAE {t['vae_s']:.2f} s"
              + (f", image encode {t['image_encode_s']:.2f} s" if "image_encode_s" in t else "") + f"); load {load_s:.2f} s",
              soft_wrap=True)  # one line, whatever the terminal's width (scripts grep it)
    steps_s = t.get("step_s") or []
    # the reference's table: load | N-step generation | per step (relative only on a simulator)
    con.print(f"| {backend} | load {load_s:.2f} s | {n_run}-step generation {t['generate_s']:.2f} s | "
              f"per step {min(steps_s) if steps_s else 0:.2f}-{max(steps_s) if steps_s else 0:.2f} s |"
              + (" simulator: relative figures only" if backend in ("sail-sim", "cmodel") else ""))
    for line in device_memory_lines(backend):
        con.print(line)
    typer.echo(str(out))
    rt = getattr(ms, "device_resident", None)
    if rt is not None:
        rt.close()
    ms.close()
