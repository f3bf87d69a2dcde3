"""Session fixtures for the runtime area.

- ``onnx_workspace_schnell`` / ``onnx_workspace_dev``: a models workspace (folder holding
  ``onnx/``) around the export fixtures, for `fluxc run --backend onnx`.
- ``diffusers_reference``: a function (flux_type) -> dict with diffusers' FluxPipeline output
  (uint8 image and packed latents) for RUNTIME_PROMPT / RUNTIME_SEED / RUNTIME_STEPS,
  cached per session.
- ``onnx_run``: a function (flux_type) -> dict with `fluxc run --backend onnx`'s image and
  latents, cached per session (the reference for the cmodel backend).
- ``bmodel_run``: a function (backend, quant) -> dict with `fluxc run --backend B` on the
  compiled tiny build of that quantisation (W4BF16: compiled_schnell_w4, one chip; BF16:
  compiled_dev_bf16, 3 chips): image, latents, output, cached per session.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

RUNTIME_PROMPT = "a photo of an astronaut riding a horse on the moon"
RUNTIME_SEED = 42
RUNTIME_STEPS = 2
RUNTIME_GUIDANCE = 3.5


def invoke(args: list[str]):
    """Run the fluxc CLI in-process; returns typer's Result (exit_code, output, exception)."""
    from typer.testing import CliRunner

    from fluxc.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=True)


def cli_main(args: list[str]):
    """Run through fluxc.cli.main (the FluxcError -> `error:` + exit 2 path)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fluxc.cli", *args], capture_output=True, text=True,
                          timeout=900)


def _workspace(tmp_path_factory, export: Path, name: str) -> Path:
    """A workspace whose onnx/ is the (read-only) export fixture, linked not copied."""
    export = Path(export)
    if export.name == "onnx":
        return export.parent
    ws = tmp_path_factory.mktemp(name)
    (ws / "onnx").symlink_to(export.resolve(), target_is_directory=True)
    return ws


@pytest.fixture(scope="session")
def onnx_workspace_schnell(export_schnell_tinyvae, tmp_path_factory) -> Path:
    return _workspace(tmp_path_factory, export_schnell_tinyvae, "ws_schnell")


@pytest.fixture(scope="session")
def onnx_workspace_dev(export_dev, tmp_path_factory) -> Path:
    return _workspace(tmp_path_factory, export_dev, "ws_dev")


@pytest.fixture(scope="session")
def diffusers_reference(request):
    cache: dict[str, dict] = {}

    def get(flux_type: str) -> dict:
        if flux_type in cache:
            return cache[flux_type]
        import torch
        from diffusers import AutoencoderTiny, FluxPipeline

        from fluxc.export.manifest import load_manifest

        model = Path(request.getfixturevalue(f"tiny_{flux_type}"))
        export = Path(request.getfixturevalue("export_schnell_tinyvae" if flux_type == "schnell" else "export_dev"))
        d = load_manifest(export).dims
        kw = {"vae": AutoencoderTiny.from_pretrained(str(model / "tiny_vae"))} if d.tiny_vae else {}
        pipe = FluxPipeline.from_pretrained(str(model), local_files_only=True, **kw).to(torch.float32)
        pipe.set_progress_bar_config(disable=True)
        common = dict(height=d.height, width=d.width, num_inference_steps=RUNTIME_STEPS,
                      guidance_scale=RUNTIME_GUIDANCE, max_sequence_length=d.t5_len)
        with torch.no_grad():
            lat = pipe(RUNTIME_PROMPT, generator=torch.Generator("cpu").manual_seed(RUNTIME_SEED),
                       output_type="latent", **common).images
            img = pipe(RUNTIME_PROMPT, generator=torch.Generator("cpu").manual_seed(RUNTIME_SEED),
                       output_type="pil", **common).images[0]
        cache[flux_type] = {"image": np.array(img), "latents": lat.numpy()}
        return cache[flux_type]

    return get


@pytest.fixture(scope="session")
def onnx_run(request, tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(flux_type: str) -> dict:
        if flux_type in cache:
            return cache[flux_type]
        from PIL import Image

        ws = request.getfixturevalue(f"onnx_workspace_{flux_type}")
        out = tmp_path_factory.mktemp(f"onnx_run_{flux_type}")
        r = invoke(["run", "--models", str(ws), "--backend", "onnx", "--prompt", RUNTIME_PROMPT,
                    "--seed", str(RUNTIME_SEED), "--steps", str(RUNTIME_STEPS), "--guidance",
                    str(RUNTIME_GUIDANCE), "--out", str(out / "result.png"),
                    "--save-latents", str(out / "latents.npy")])
        assert r.exit_code == 0, (r.output, r.exception)
        cache[flux_type] = {"image": np.array(Image.open(out / "result.png").convert("RGB")),
                            "latents": np.load(out / "latents.npy"), "output": r.output}
        return cache[flux_type]

    return get


BUILD_FIXTURE = {"W4BF16": "compiled_schnell_w4", "BF16": "compiled_dev_bf16"}


@pytest.fixture(scope="session")
def bmodel_run(request, tmp_path_factory):
    cache: dict[tuple[str, str], dict] = {}

    def get(backend: str, quant: str, extra: tuple[str, ...] = ()) -> dict:
        key = (backend, quant, *extra)
        if key in cache:
            return cache[key]
        from PIL import Image

        ws = Path(request.getfixturevalue(BUILD_FIXTURE[quant]))
        out = tmp_path_factory.mktemp(f"run_{backend}_{quant}")
        if backend == "sail-sim":
            from fluxc.runtime import sail_sim

            sail_sim.reset()  # counters of this run only
        r = invoke(["run", "--models", str(ws), "--backend", backend, "--quantize", quant, "--prompt", RUNTIME_PROMPT,
                    "--seed", str(RUNTIME_SEED), "--steps", str(RUNTIME_STEPS), "--guidance", str(RUNTIME_GUIDANCE),
                    "--out", str(out / "result.png"), "--save-latents", str(out / "latents.npy"), *extra])
        assert r.exit_code == 0, (r.output, r.exception)
        res = {"image": np.array(Image.open(out / "result.png").convert("RGB")),
               "latents": np.load(out / "latents.npy"), "output": r.output, "ws": ws}
        if backend == "sail-sim":
            from fluxc.runtime import sail_sim

            res["chips"] = {d: c.to_dict() for d, c in sail_sim.stats().items()}
            res["tensor_log"] = {d: list(c.tensor_log) for d, c in sail_sim.stats().items()}
        cache[key] = res
        return res

    return get
