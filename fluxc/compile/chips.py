"""The chips fluxc compiles for, and the facts about them that fluxc uses.

One home for chip facts: the `--chip` value, the output folder name (the reference's
models/<CHIP>/), the name TPU-MLIR's simulator helpers take (model_runner.link_cmodel_so),
the TPU clock the compiler's cost model runs at, the peak compute, and the reference board.

Sources (facts, read 2026-11-30):
- TPU-MLIR 1.30.2 (installed toolchain): include/tpu_mlir/Backend/Arch.h (A2_1 = 900, the
  BM1688 TIU clock in MHz that BM1688.h hands the cost model), python/profile_helper/
  bm1688_defs.py (TIU 900 MHz, DMA 750 MHz, 2 cores, 32 NPUs per core, 32 GB/s DDR per core).
- TPU-MLIR's LLM profiler (python/llm/LlmProfile.py, sophgo/tpu-mlir on GitHub): BM1684X
  16 TFLOPS at 950 MHz with 64 GB/s; BM1688 1.8 TFLOPS per core (x2 cores) at 900 MHz, 32 GB/s.
- BM1684X cost-model clock: the compiler's `runtime:` line equals TCYC / 1e6 ms (1 GHz),
  measured on our own profiles (fluxc/compile/parse.py).
- Reference boards (sophon-demo FLUX.1 README): SE7-32 (BM1684X) 11.4 GB used by the W4BF16
  1024x1024 build; SE9-16 (BM1688) 10.6 GB used by its W4BF16 512x512, T5-256 build.
"""
from __future__ import annotations

from dataclasses import dataclass

from fluxc.errors import FluxcError


@dataclass(frozen=True)
class Chip:
    name: str  # --chip value, recipe file stem (recipes/<name>.yaml), model_deploy --chip
    folder: str  # output folder in the workspace (models/<folder>/), as the reference names it
    runtime_name: str  # TPU-MLIR's simulator name (model_runner.link_cmodel_so)
    cost_model_mhz: float  # clock at which the compiler's cost model counts cycles
    peak_tflops_bf16: float  # per chip, all cores
    cores: int
    board: str
    board_memory_mb: int | None  # device memory the reference's build uses on that board
    reference_build: str


CHIPS: dict[str, Chip] = {
    "bm1684x": Chip("bm1684x", "BM1684X", "BM1684X", 1000.0, 16.0, 1, "SE7-32", 11419,
                    "W4BF16 transformer, 1024x1024, T5 length 512"),
    "bm1688": Chip("bm1688", "BM1688", "BM1688", 900.0, 3.6, 2, "SE9-16", 10600,
                   "W4BF16 transformer, 512x512, T5 length 256"),
}


def get_chip(name: str) -> Chip:
    """The chip for a --chip value (case-insensitive); a one-line error listing the
    supported chips otherwise."""
    chip = CHIPS.get(str(name).strip().lower())
    if chip is None:
        raise FluxcError(f"unknown chip {name!r}; supported: {', '.join(CHIPS)} (e.g. --chip bm1688)")
    return chip


def chip_record(name: str) -> dict:
    """What compile_report.json records about the chip next to the cost estimate."""
    c = get_chip(name)
    return {"name": c.name, "cost_model_mhz": c.cost_model_mhz, "peak_tflops_bf16": c.peak_tflops_bf16,
            "cores": c.cores, "board": c.board, "reference_board_memory_mb": c.board_memory_mb,
            "reference_build": c.reference_build}


def chip_mhz(name: str) -> float:
    """The clock at which the compiler's cost model counts cycles for this chip (MHz)."""
    return get_chip(name).cost_model_mhz
