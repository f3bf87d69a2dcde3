"""The model `fluxc serve` holds: the pipeline opened once, as `fluxc run` opens it
(fluxc/commands/run.py open_pipeline), at every size the build has, and the build in words.

The first size is opened at start. Another size of a several-size build is opened on first use,
by the worker thread: on cmodel and the sail backends it is a pipeline over the same opened
bmodels (a net holds one stage per size; sail picks the stage by the input's shape, with the
tensors of every size laid out at load); on onnx that size's pieces are opened.

Images in (issue 19): a build with the VAE encoder takes an image for img2img, a FLUX.1 Kontext
build an image to edit (`image_mode`); /v1/images/edits and the page's upload use it.
"""
from __future__ import annotations

import time
from pathlib import Path

from fluxc.errors import FluxcError
from fluxc.commands.run import SAIL_BACKENDS, describe_build, device_memory_lines, open_pipeline
from fluxc.runtime.models import open_onnx
from fluxc.runtime.pipeline import FluxPipeline
from fluxc.specs import DEFAULT_STEPS


class ServedModel:
    def __init__(self, models: Path, backend: str, quantize=None, flux_type=None, tiny_vae=None, devices=None,
                 chip: str = "bm1684x", say=None):
        t0 = time.perf_counter()
        self.pipe, self.ms, self.quantize = open_pipeline(models, backend, quantize, flux_type, tiny_vae, devices,
                                                          chip=chip, say=say)
        self.load_s = time.perf_counter() - t0
        self.backend, self.chip = backend, chip
        self.devices = devices
        d = self.dims = self.pipe.dims
        man = self.pipe.manifest
        self.sizes: list[tuple[int, int]] = list(getattr(man, "sizes", None) or [(d.height, d.width)])
        self._pipes = {(d.height, d.width): self.pipe}
        self._extra_sets = []
        self.lines = describe_build(self.pipe, self.ms, self.quantize, backend, self.load_s)
        if d.kontext:
            self.image_mode: str | None = "kontext"
        elif any(s.family == "vae_encoder" for s in man.specs):
            self.image_mode = "img2img"
        else:
            self.image_mode = None
        self.loras = [{"file": r.get("file"), "scale": r.get("scale"), "sha256": r.get("sha256")}
                      for r in (man.options.get("lora") or [])]

    @property
    def default_steps(self) -> int:
        return DEFAULT_STEPS[self.dims.flux_type]

    def pipeline(self, height: int, width: int) -> FluxPipeline:
        key = (height, width)
        if key not in self._pipes:
            view = self.pipe.manifest.at(height, width)
            if self.backend == "onnx":
                ms = open_onnx(view)
                self._extra_sets.append(ms)
                self._pipes[key] = FluxPipeline(ms, view)
            else:  # cmodel: the same bmodels, the net's stage for that size
                self._pipes[key] = FluxPipeline(self.ms, view)
        return self._pipes[key]

    def info(self) -> dict:
        d = self.dims
        return {"flux_type": d.flux_type, "quantize": self.quantize, "chip": self.chip, "backend": self.backend,
                "devices": self.devices, "tiny_vae": bool(d.tiny_vae),
                "sizes": [f"{w}x{h}" for h, w in self.sizes], "default_steps": self.default_steps,
                "guidance": bool(d.guidance_embeds), "image_input": self.image_mode, "loras": self.loras, "load_s": round(self.load_s, 3),
                "files": [Path(f).name for f in self.ms.files], "description": self.lines,
                "device_memory": device_memory_lines(self.backend) if self.backend in SAIL_BACKENDS else []}

    def close(self) -> None:
        """Free the device: the device-resident tensors, every engine (the simulator's worker processes end)."""
        errors = []
        rt = getattr(self.ms, "device_resident", None)
        closers = ([rt.close] if rt is not None else []) + [ms.close for ms in self._extra_sets]
        # every engine on its own: one that fails (a crashed simulator) does not keep the others open
        closers += [e.close for e in self.ms.engines]
        for close in closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - reported after the rest is closed
                errors.append(f"{type(e).__name__}: {e}")
        if errors:
            raise FluxcError(f"closing the model: {'; '.join(errors)}")
