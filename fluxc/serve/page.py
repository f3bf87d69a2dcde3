"""The web page of `fluxc serve` (Gradio, mounted at / of the API's app).

Prompt, steps, guidance (dev builds), seed (or a random one) and size (the build's sizes); on a
build that takes images (issue 19) an image upload (img2img with a strength, or the image a
FLUX.1 Kontext build edits), checked by the API's own parser; a
per-step progress bar read from the job's state (the same queue and jobs as the API), then the
image: the PNG bytes the worker wrote, handed over unchanged. Above it, the build in words.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import gradio as gr

from fluxc.serve.jobs import NotReady, QueueFull, Worker
from fluxc.serve.request import DEFAULT_STRENGTH, BadRequest, parse_edit, parse_request

# No web fonts: the page works on a machine without internet access.
THEME = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_in_words(worker: Worker) -> str:
    m = worker.model
    if m is None:
        if worker.status == "failed":
            return f"**The model did not open:** {worker.error}"
        return "**Loading the model ...** reload this page in a moment."
    i = m.info()
    lora = ", ".join(f"{r['file']} x{r['scale']}" for r in i["loras"]) or "none"
    step = f"{worker.last_step_s:.2f} s (last image)" if worker.last_step_s else "not measured yet"
    return (f"**FLUX.1 {i['flux_type']}**, transformer {i['quantize']}{', tiny VAE' if i['tiny_vae'] else ''} · "
            f"chip {i['chip'].upper()} · backend `{i['backend']}`"
            f"{' (devices ' + ','.join(map(str, i['devices'])) + ')' if i['devices'] else ''} · "
            f"sizes {', '.join(i['sizes'])}  \n"
            f"LoRAs: {lora} · load {i['load_s']:.2f} s · time per step {step}")


def build_page(worker: Worker, out_dir: Path) -> gr.Blocks:
    with gr.Blocks(title="fluxc serve", analytics_enabled=False, delete_cache=(600, 1800)) as page:
        gr.Markdown("## FLUX.1 · fluxc serve")
        info = gr.Markdown(build_in_words(worker), elem_id="build-info")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="a photo of an astronaut riding a horse on the moon")
                with gr.Row():
                    steps = gr.Slider(1, 50, value=4, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1, 10, value=3.5, step=0.1, label="Guidance", elem_id="guidance",
                                         visible=False)
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    dice = gr.Button("Random seed", elem_id="random-seed", size="sm")
                size = gr.Dropdown(choices=[], label="Size (width x height)", elem_id="size")
                # images in: hidden until the loaded build says it takes one
                source = gr.Image(label="Input image", type="filepath", image_mode=None, sources=["upload"],
                                  elem_id="input-image",  # image_mode None: the uploaded file as sent, not re-encoded
                                  visible=False)
                strength = gr.Slider(0.05, 1.0, value=DEFAULT_STRENGTH, step=0.05, label="Strength (img2img)",
                                     elem_id="strength", visible=False)
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", format="png", elem_id="image", interactive=False)
                status = gr.Markdown(elem_id="status")

        def on_load():
            m = worker.model
            if m is None:
                return build_in_words(worker), gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
            sizes = m.info()["sizes"]
            label = "Image to edit" if m.image_mode == "kontext" else "Input image (optional: img2img)"
            return (build_in_words(worker), gr.update(value=min(m.default_steps, 50)),
                    gr.update(visible=bool(m.dims.guidance_embeds)), gr.update(choices=sizes, value=sizes[0]),
                    gr.update(visible=m.image_mode is not None, label=label),
                    gr.update(visible=m.image_mode == "img2img"))

        def generate(prompt_text, n_steps, guidance_scale, seed_value, size_label, source_path, strength_value,
                     progress=gr.Progress()):
            m = worker.model
            if m is None:
                raise gr.Error(build_in_words(worker).replace("*", ""))
            try:
                fields = {"prompt": prompt_text, "steps": int(n_steps), "size": size_label,
                          "seed": int(seed_value or 0), "guidance_scale": float(guidance_scale), "n": 1}
                if source_path and m.image_mode is not None:  # the API's edit parser on the uploaded file
                    form = {k: str(v) for k, v in fields.items()}
                    if m.image_mode == "img2img":
                        form["strength"] = str(float(strength_value))
                    req = parse_edit(form, Path(source_path).read_bytes(), m.sizes, m.default_steps, m.image_mode)
                else:
                    req = parse_request(fields, m.sizes, m.default_steps, m.image_mode)
                job = worker.submit(req)
            except (BadRequest, QueueFull, NotReady) as e:
                raise gr.Error(str(e))
            progress(0, desc="queued")
            while not job.done.wait(0.1):
                st = worker.state(job)
                if st["status"] == "queued":
                    progress(0, desc=f"queued: position {st.get('position')}")
                elif st["status"] == "generating":
                    p = st["progress"]
                    progress((p["step"], p["steps"]), desc=f"step {p['step']} of {p['steps']}", unit="steps")
            if job.status != "completed":
                raise gr.Error(f"{job.status}: {job.error}")
            path = out_dir / f"{job.id}.png"
            path.write_bytes(job.images[0]["png"])  # the worker's PNG bytes, as fluxc run writes them
            per = sum(job.step_s) / len(job.step_s) if job.step_s else 0.0
            how = (f" · img2img strength {req.strength if req.strength is not None else DEFAULT_STRENGTH}"
                   if m.image_mode == "img2img" and req.image is not None else
                   " · Kontext edit" if req.image is not None else "")
            return str(path), (f"seed {req.seed} · {req.steps} steps · {req.size}{how} · {job.seconds:.2f} s "
                               f"({per:.2f} s per step)"), build_in_words(worker)

        dice.click(lambda: random.randint(0, 2**32 - 1), outputs=seed, queue=False)
        page.load(on_load, outputs=[info, steps, guidance, size, source, strength], queue=False)
        go.click(generate, inputs=[prompt, steps, guidance, seed, size, source, strength],
                 outputs=[image, status, info],
                 concurrency_limit=None)  # our own queue orders the jobs; gradio's would hide positions
    return page


def mount_page(app, worker: Worker, api_key: str | None = None):
    """The page at / of `app`. With an API key the page asks for it (any user name)."""
    out_dir = Path(tempfile.mkdtemp(prefix="fluxc-serve-"))
    page = build_page(worker, out_dir)
    auth = (lambda _user, password: password == api_key) if api_key else None
    return gr.mount_gradio_app(app, page, path="/", auth=auth, theme=gr.themes.Default(**THEME),
                               allowed_paths=[str(out_dir)])
