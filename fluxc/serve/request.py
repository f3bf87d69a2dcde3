"""The generation request of the API and the page: one parser, one-line errors naming the field.

JSON object (OpenAI's images API, plus fluxc's extras):
  prompt (str, not empty), n (1-4, default 1), size ("WxH", one of the build's; default its first),
  response_format ("b64_json" only: no request names or gets a file on the server),
  seed (int >= 0, default random; image k uses seed + k), steps (1-100, default per flux type),
  guidance_scale (number > 0, default 3.5; dev builds only use it). Other OpenAI fields (model,
  quality, style, user) are accepted and ignored.

The edit request (POST /v1/images/edits, OpenAI's multipart form): the same fields as form fields,
plus `image` (the file: PNG or JPEG, at most 4096x4096, MAX_IMAGE_BODY bytes in all) and, on an
img2img build, `strength` (in (0, 1], default 0.6). On a FLUX.1 Kontext build the image is the one
to edit and there is no strength. `mask` (inpainting) is refused: no FLUX.1 Fill build exists.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

MAX_BODY = 1 << 20  # bytes; a larger body is refused before it is parsed
MAX_IMAGE_BODY = 32 << 20  # bytes of an edit request (the image file and the fields)
DEFAULT_STRENGTH = 0.6  # as `fluxc run --image` without --strength
MAX_N = 4
MAX_STEPS = 100
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any 64-bit seed
RESPONSE_FORMATS = ("b64_json",)


class BadRequest(ValueError):
    """A request field is wrong: HTTP 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = f"{param}: {message}"


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    n: int
    height: int
    width: int
    seed: int
    steps: int
    guidance: float
    image: object = field(default=None, compare=False, repr=False)  # PIL RGB image (edits), or None
    strength: float | None = None  # img2img builds' strength (edits), None otherwise

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_dict(self) -> dict:
        d = {"prompt": self.prompt, "n": self.n, "size": self.size, "seed": self.seed, "steps": self.steps,
             "guidance_scale": self.guidance}
        if self.image is not None:
            d["image"] = f"{self.image.width}x{self.image.height} upload"
        if self.strength is not None:
            d["strength"] = self.strength
        return d

    def pipeline_kwargs(self) -> dict:
        """The image arguments of the pipeline call, as `fluxc run --image [--strength]` passes them."""
        if self.image is None:
            return {}
        return {"image": self.image, "strength": DEFAULT_STRENGTH if self.strength is None else self.strength}


def size_label(hw: tuple[int, int]) -> str:
    return f"{hw[1]}x{hw[0]}"


def parse_json(body: bytes) -> dict:
    if len(body) > MAX_BODY:
        raise BadRequest("body", f"{len(body)} bytes is over the {MAX_BODY}-byte limit")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest("body", f"malformed JSON ({e}); send a JSON object like "
                                 '{"prompt": "a red fox", "size": "128x128"}') from None
    if not isinstance(doc, dict):
        raise BadRequest("body", f"a JSON object is expected, not {type(doc).__name__}")
    return doc


def _int(doc: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise BadRequest(key, f"an integer from {lo} to {hi} is expected, got {json.dumps(v)[:40]}")
    v = int(v)
    if not lo <= v <= hi:
        raise BadRequest(key, f"{v} is out of range; use {lo} to {hi}")
    return v


def parse_request(doc: dict, sizes: list[tuple[int, int]], default_steps: int,
                  image_mode: str | None = None) -> GenerationRequest:
    """Check every field of a request against the build (its sizes as (height, width)).
    `image_mode`: "kontext" for a FLUX.1 Kontext build, which edits images and makes none from text."""
    if image_mode == "kontext":
        raise BadRequest("image", "this FLUX.1 Kontext build edits an image: POST the image and the prompt to "
                                  "/v1/images/edits (multipart form)")
    prompt = doc.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt", "a non-empty string is required")
    if not prompt.strip():
        raise BadRequest("prompt", "must not be empty")
    n = _int(doc, "n", 1, 1, MAX_N)
    size = doc.get("size")
    labels = [size_label(s) for s in sizes]
    if size is None or size == "auto":
        h, w = sizes[0]
    else:
        if not isinstance(size, str) or size.lower().replace(" ", "") not in labels:
            raise BadRequest("size", f"{json.dumps(size)[:40]} is not a size of this build; it has "
                                     f"{', '.join(labels)} (width x height)")
        h, w = sizes[labels.index(size.lower().replace(" ", ""))]
    fmt = doc.get("response_format")
    if fmt is not None and fmt not in RESPONSE_FORMATS:
        raise BadRequest("response_format", f"{json.dumps(fmt)[:40]} is not served; use \"b64_json\" "
                                            "(the server hands out no files)")
    seed = _int(doc, "seed", random.randint(0, 2**32 - 1), 0, MAX_SEED - MAX_N)
    steps = _int(doc, "steps", default_steps, 1, MAX_STEPS)
    g = doc.get("guidance_scale")
    if g is None:
        guidance = 3.5
    elif isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g <= 100:
        raise BadRequest("guidance_scale", f"a number above 0 and at most 100 is expected, got {json.dumps(g)[:40]}")
    else:
        guidance = float(g)
    return GenerationRequest(prompt, n, h, w, seed, steps, guidance)


def _form_number(form: dict, key: str, kind):
    """A form field as a number (form fields are text), or None when absent or empty."""
    v = form.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if not isinstance(v, str):
        raise BadRequest(key, "a form field with a number is expected, not a file")
    try:
        return kind(v.strip()) if kind is float else int(v.strip())
    except ValueError:
        raise BadRequest(key, f"{v[:40]!r} is not {'a number' if kind is float else 'an integer'}") from None


def parse_edit(form: dict, image_bytes: bytes | None, sizes: list[tuple[int, int]], default_steps: int,
               image_mode: str | None) -> GenerationRequest:
    """An edit request (multipart form fields as text, the image file's bytes) against the build.
    `image_mode`: "img2img" (a build with the VAE encoder), "kontext", or None (takes no image)."""
    from fluxc.errors import FluxcError
    from fluxc.runtime.image_input import open_image

    if image_mode is None:
        raise BadRequest("image", "this build takes no image: re-export with `fluxc export --image-input` (or a "
                                  "FLUX.1 Kontext checkpoint) and compile again; text to image is "
                                  "/v1/images/generations")
    if form.get("mask") is not None:
        raise BadRequest("mask", "inpainting with a mask is not served (no FLUX.1 Fill build); send the image alone")
    if not image_bytes:
        raise BadRequest("image", "an image file is required: the multipart field 'image' (PNG or JPEG)")
    doc = {k: form.get(k) for k in ("prompt", "size", "response_format") if form.get(k) is not None}
    for k in ("n", "seed", "steps"):
        if (v := _form_number(form, k, int)) is not None:
            doc[k] = v
    if (g := _form_number(form, "guidance_scale", float)) is not None:
        doc["guidance_scale"] = g
    strength = _form_number(form, "strength", float)
    if image_mode == "kontext" and strength is not None:
        raise BadRequest("strength", "a FLUX.1 Kontext build edits the image as the prompt says; drop strength "
                                     "(it is for img2img builds)")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise BadRequest("strength", f"{strength} is outside (0, 1]; use e.g. 0.6 (1 repaints everything)")
    req = parse_request(doc, sizes, default_steps)
    if strength is not None or image_mode == "img2img":
        from fluxc.runtime.image_input import trim_timesteps

        try:
            trim_timesteps(req.steps, DEFAULT_STRENGTH if strength is None else strength)
        except FluxcError:
            raise BadRequest("strength", f"strength {strength or DEFAULT_STRENGTH} with {req.steps} steps leaves "
                                         "no denoising step; raise strength or steps") from None
    try:
        image = open_image(bytes(image_bytes), "the uploaded file")
    except FluxcError as e:
        raise BadRequest("image", str(e)) from None
    return GenerationRequest(req.prompt, req.n, req.height, req.width, req.seed, req.steps, req.guidance,
                             image=image, strength=strength if image_mode == "img2img" else None)
