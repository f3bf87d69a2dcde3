"""The generation request of the API and the page: one parser, one-line errors naming the field.

JSON object (OpenAI's images API, plus fluxc's extras):
  prompt (str, not empty), n (1-4, default 1), size ("WxH", one of the build's; default its first),
  response_format ("b64_json" only: no request names or gets a file on the server),
  seed (int >= 0, default random; image k uses seed + k), steps (1-100, default per flux type),
  guidance_scale (number > 0, default 3.5; dev builds only use it). Other OpenAI fields (model,
  quality, style, user) are accepted and ignored.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

MAX_BODY = 1 << 20  # bytes; a larger body is refused before it is parsed
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

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "n": self.n, "size": self.size, "seed": self.seed, "steps": self.steps,
                "guidance_scale": self.guidance}


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


def parse_request(doc: dict, sizes: list[tuple[int, int]], default_steps: int) -> GenerationRequest:
    """Check every field of a request against the build (its sizes as (height, width))."""
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
