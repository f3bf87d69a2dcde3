"""The checkpoint being exported: its configs, its weight stores (safetensors headers only) and
each component's model on the meta device; and the record of where it came from."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fluxc.errors import FluxcError
from fluxc.export.loading import build_on_meta
from fluxc.export.source import Source, WeightStore, check_flux_folder, model_revision, read_json

# diffusers and transformers are imported where a model is built: reading a manifest needs neither

TINY_VAE_PATTERNS = ["config.json", "*.safetensors"]


class Checkpoint:
    def __init__(self, source: Source, tiny: Source | None):
        self.source, self.tiny = source, tiny
        folder = source.folder
        check_flux_folder(folder)
        self.folder = folder
        self.configs: dict[str, dict[str, Any]] = {
            c: read_json(folder / c / "config.json", f"{c} config")
            for c in ("transformer", "text_encoder", "text_encoder_2", "vae")
        }
        self.component_folders = {c: folder / c for c in self.configs}
        if tiny is not None:
            cfg_path = tiny.folder / "config.json"
            if not cfg_path.is_file() and (tiny.folder / "tiny_vae" / "config.json").is_file():
                tiny.folder = tiny.folder / "tiny_vae"
                cfg_path = tiny.folder / "config.json"
            if not cfg_path.is_file():
                raise FluxcError(f"--tiny-vae {tiny.model}: no config.json there; give an AutoencoderTiny folder "
                                 f"(e.g. madebyollin/taef1)")
            tcfg = read_json(cfg_path, "tiny VAE config")
            if tcfg.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
                raise FluxcError(f"--tiny-vae {tiny.model} is a {tcfg.get('_class_name')}, not an AutoencoderTiny")
            self.configs["tiny_vae"] = tcfg
            self.component_folders["tiny_vae"] = tiny.folder
        # Opening the stores reads only the safetensors headers; it validates every file.
        self.stores = {c: WeightStore.open(f, c) for c, f in self.component_folders.items()}
        self._models: dict[str, Any] = {}

    def revision(self) -> str:
        return self.source.revision or model_revision(self.folder, {c: self.stores[c] for c in
                                                                    ("transformer", "text_encoder",
                                                                     "text_encoder_2", "vae")})

    def model(self, component: str):
        """The component's model with every parameter on the meta device (built once)."""
        if component not in self._models:
            self._models[component] = build_on_meta(lambda: construct_model(component, self.configs[component],
                                                                       self.component_folders[component]))
        return self._models[component]


def construct_model(component: str, cfg: dict[str, Any], folder: Path):
    if component == "transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(cfg)
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(cfg)
    if component == "tiny_vae":
        from diffusers import AutoencoderTiny

        return AutoencoderTiny.from_config(cfg)
    if component == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder)))
    if component == "text_encoder_2":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config.from_pretrained(str(folder)))
    raise ValueError(component)


def source_record(ckpt: Checkpoint) -> dict[str, Any]:
    s = ckpt.source
    rec = {"model": s.model, "kind": s.kind, "path": str(ckpt.folder) if s.kind == "local" else None,
           "revision": ckpt.revision()}
    if ckpt.tiny is not None:
        t = ckpt.tiny
        rec["tiny_vae"] = {"model": t.model, "kind": t.kind, "path": str(t.folder) if t.kind == "local" else None,
                           "revision": t.revision or "sha256:" + ckpt.stores["tiny_vae"].identity()[:32]}
    return rec


def same_model(old: dict[str, Any], new: dict[str, Any]) -> bool:
    if old.get("kind") != new.get("kind"):
        return False
    if new.get("kind") == "local":
        return old.get("path") == new.get("path")
    return old.get("model") == new.get("model")


def describe_source(src: dict[str, Any]) -> str:
    return str(src.get("path") or src.get("model"))
