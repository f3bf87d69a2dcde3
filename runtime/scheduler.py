"""FlowMatchEulerDiscreteScheduler in numpy, as diffusers' FluxPipeline drives it.

FluxPipeline passes sigmas = linspace(1, 1/steps, steps) and mu computed from the image
sequence length (linear between base_image_seq_len/base_shift and
max_image_seq_len/max_shift). The scheduler then either shifts the sigmas statically
(schnell: shift 1.0) or dynamically (dev: exp(mu) / (exp(mu) + (1/sigma - 1))), appends a
final 0, and each Euler step is x + (sigma_next - sigma) * v. Arithmetic is float32 like
the reference (tests compare against diffusers' own scheduler).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError

# diffusers' FlowMatchEulerDiscreteScheduler defaults, for keys a scheduler config lacks
_DEFAULTS = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential",
    # dynamic shifting's mu, linear in the image sequence length (calculate_shift)
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
    # options FLUX.1 leaves off; __init__ refuses those the runtime does not implement
    "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "stochastic_sampling": False,
}


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int,
                    base_shift: float, max_shift: float) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class FlowMatchEulerScheduler:
    def __init__(self, config: dict | None = None):
        cfg = dict(_DEFAULTS)
        cfg.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                  "stochastic_sampling"):
            if cfg.get(k):
                raise FluxcError(f"scheduler option {k}=true is not supported by the fluxc runtime; "
                                 "re-export a FLUX.1 dev/schnell checkpoint with its own scheduler config")
        if cfg["time_shift_type"] not in ("exponential", "linear"):
            raise FluxcError(f"unknown time_shift_type {cfg['time_shift_type']!r} in the scheduler config")
        self.config = cfg
        self.timesteps = np.zeros(0, np.float32)
        self.sigmas = np.zeros(0, np.float32)

    @classmethod
    def from_file(cls, path: Path) -> "FlowMatchEulerScheduler":
        try:
            return cls(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise FluxcError(f"scheduler config {path} is missing; re-run fluxc export") from None
        except ValueError as e:
            raise FluxcError(f"scheduler config {path} is unreadable ({e}); re-run fluxc export") from None

    def mu_for(self, image_seq_len: int) -> float:
        c = self.config
        return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"],
                               c["base_shift"], c["max_shift"])

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        if self.config["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
        return mu / (mu + (1 / t - 1) ** 1.0)

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int) -> None:
        """FluxPipeline's call: sigmas = linspace(1, 1/steps, steps), mu from the sequence length."""
        if num_inference_steps < 1:
            raise FluxcError("--steps must be at least 1")
        c = self.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        sigmas = np.array(sigmas).astype(np.float32)
        if c["use_dynamic_shifting"]:
            sigmas = self._time_shift(self.mu_for(image_seq_len), sigmas)
        else:
            shift = float(c["shift"])
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        sigmas = np.asarray(sigmas, dtype=np.float32)
        if c.get("shift_terminal"):
            one_minus_z = 1 - sigmas
            scale = one_minus_z[-1] / (1 - c["shift_terminal"])
            sigmas = (1 - one_minus_z / scale).astype(np.float32)
        self.timesteps = (sigmas * np.float32(c["num_train_timesteps"])).astype(np.float32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)]).astype(np.float32)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        sample = sample.astype(np.float32)
        dt = np.float32(self.sigmas[index + 1] - self.sigmas[index])
        return (sample + dt * model_output.astype(np.float32)).astype(np.float32)
