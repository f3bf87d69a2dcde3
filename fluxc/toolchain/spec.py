"""What goes into one toolchain venv: the install spec (its hash names the venv folder and is
kept in the completion marker) and the default one, tpu_mlir with its pinned companions."""
from __future__ import annotations

from dataclasses import dataclass

from fluxc.fsutil import sha256_json

TPU_MLIR_VERSION = "1.30.2"
TORCH_VERSION = "2.11.0"  # tpu_mlir 1.30.2's own [torch] extra pin


@dataclass(frozen=True)
class InstallSpec:
    """What goes into one toolchain venv. Its hash names the folder and is kept in the marker."""

    name: str
    requirements: tuple[str, ...]
    imports: tuple[str, ...]  # modules the install check imports in the new venv
    report: tuple[str, ...]  # distributions whose versions are recorded and shown
    tpu_mlir: bool = True  # run the tpu_mlir launch check (a compiled tool starts)
    # extra pins given to uv only (uv refuses a yanked release unless it is pinned directly);
    # not part of the hash: pip installs the very same release without being told
    uv_pins: tuple[str, ...] = ()
    python_minor: tuple[int, int] = (3, 10)
    # bump when the layout or the way tools are launched changes incompatibly
    layout: int = 1

    def to_dict(self) -> dict:
        return {"name": self.name, "requirements": list(self.requirements), "imports": list(self.imports),
                "report": list(self.report), "tpu_mlir": self.tpu_mlir,
                "python_minor": list(self.python_minor), "layout": self.layout}

    @property
    def hash(self) -> str:
        return sha256_json(self.to_dict())

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.hash[:12]}"


DEFAULT_SPEC = InstallSpec(
    name=f"tpu_mlir-{TPU_MLIR_VERSION}",
    requirements=(
        f"tpu_mlir[onnx]=={TPU_MLIR_VERSION}",
        # its ONNX front end imports torch (python/transform/OnnxOpt.py); not pulled by [onnx]
        f"torch=={TORCH_VERSION}",
        # imported by tpu_mlir's tools, not declared by the wheel
        "psutil",
    ),
    imports=("tpu_mlir", "torch", "psutil", "onnx"),
    report=("tpu_mlir", "torch", "onnx", "numpy", "psutil"),
    # tpu_mlir 1.30.2 pins opencv-python-headless==4.8.0.74, a yanked release
    uv_pins=("opencv-python-headless==4.8.0.74",),
)
