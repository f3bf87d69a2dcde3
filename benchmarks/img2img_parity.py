"""img2img parity at tiny size (issue 19): fluxc's numpy runtime on the exported ONNX pieces
(`--image-input`) against diffusers' FluxImg2ImgPipeline on the original weights, same input
image, prompt, seed, strength and steps. dev with AutoencoderKL (the latent distribution sampled
with the generator, then the noise), schnell with taef1 (no sampling draw).

    python benchmarks/img2img_parity.py [--work DIR]

Writes benchmarks/results/img2img_parity.json: per model, the image PSNR (dB) and the latent max
abs error, for strengths 0.3, 0.6 and 1.0. Sizes: the tiny models of `fluxc tiny`, 128x128, T5 32.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from results_file import write_results

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPT = "a photo of an astronaut riding a horse on the moon"
SEED = 42
CASES = {"dev": {"steps": 5, "tiny_vae": False}, "schnell": {"steps": 4, "tiny_vae": True}}
STRENGTHS = (0.3, 0.6, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "img2img_parity.json")
    a = ap.parse_args()
    import torch
    from diffusers import AutoencoderTiny, FluxImg2ImgPipeline

    from fluxc.export.driver import ExportOptions, run_export
    from fluxc.export.manifest import load_manifest
    from fluxc.metrics import psnr
    from fluxc.runtime.models import open_onnx
    from fluxc.runtime.pipeline import FluxPipeline
    from fluxc.tiny import build_tiny
    from fluxc.validation.verify import verify_image

    work = a.work or Path(tempfile.mkdtemp(prefix="fluxc-img2img-"))
    rows = {}
    for flux_type, case in CASES.items():
        model = work / f"tiny_{flux_type}"
        if not (model / "model_index.json").is_file():
            build_tiny(model, flux_type=flux_type, seed=0)
        exp = work / f"onnx_{flux_type}"
        run_export(ExportOptions(model=str(model), out=exp, height=128, width=128, t5_len=32, image_input=True,
                                 tiny_vae=str(model / "tiny_vae") if case["tiny_vae"] else None), show_progress=False)
        man = load_manifest(exp)
        d = man.dims
        img = verify_image(d.width, d.height)
        ms = open_onnx(man)
        kw = {"vae": AutoencoderTiny.from_pretrained(str(model / "tiny_vae"))} if d.tiny_vae else {}
        pipe = FluxImg2ImgPipeline.from_pretrained(str(model), local_files_only=True, **kw).to(torch.float32)
        pipe.set_progress_bar_config(disable=True)
        rows[flux_type] = {"vae": "taef1 (AutoencoderTiny)" if d.tiny_vae else "AutoencoderKL", "steps": case["steps"],
                           "strengths": {}}
        for s in STRENGTHS:
            got = FluxPipeline(ms, man)(PROMPT, None, case["steps"], 3.5, SEED, image=img, strength=s)
            common = dict(image=img, strength=s, height=d.height, width=d.width, num_inference_steps=case["steps"],
                          guidance_scale=3.5, max_sequence_length=d.t5_len)
            with torch.no_grad():
                lat = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
                           **common).images.numpy()
                ref = np.array(pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **common).images[0])
            p = float(psnr(ref, got.image))
            rows[flux_type]["strengths"][str(s)] = {
                "steps_run": len(got.timesteps), "psnr_db": round(p, 2) if np.isfinite(p) else None,
                "images_identical": bool(np.array_equal(ref, got.image)),
                "latent_max_abs_err": float(f"{np.abs(lat - got.latents).max():.3g}"),
                "latent_max_abs": round(float(np.abs(lat).max()), 3)}
            print(flux_type, s, rows[flux_type]["strengths"][str(s)], flush=True)
        ms.close()
    write_results(a.results, {"size": "tiny models (fluxc tiny, seed 0), 128x128, T5 32",
                              "reference": "diffusers FluxImg2ImgPipeline, float32, CPU", "prompt": PROMPT,
                              "seed": SEED, "input": "fluxc.validation.verify.verify_image (192x192, resized)",
                              "models": rows})
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
