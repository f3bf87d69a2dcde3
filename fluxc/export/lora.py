"""LoRAs fused into the weights at export time (`fluxc export --lora FILE[:SCALE]`, repeatable).

A bmodel holds its weights, so a LoRA cannot be switched at run time: it is fused into the
weights at export, W' = W + SCALE * scaling * (B @ A) (plus SCALE * scaling * lora_B.bias on
the bias when the LoRA has one); several LoRAs add up. The export references checkpoint
tensors in place (fluxc/export/weights.py), so the fused tensors are written, one at a time,
into one safetensors file of the export per component, and the component's weight store
points at that file for those tensors (`fuse_loras`, called once before the pieces are
planned): every piece, traced or rebound, then reads the fused weights, and the content key
of exactly the touched pieces changes.

Reading a LoRA is diffusers' job, not ours: `FluxLoraLoaderMixin.lora_state_dict` reads the
file and converts the kohya, ComfyUI, xlabs ... key formats to diffusers names; then each
component's part is normalised the way FluxPipeline.load_lora_weights does it (peft key
format, ranks, network alphas or the file's adapter metadata) and diffusers'
`_create_lora_config` + peft's pattern lookup give each module's `scaling` (alpha / r, or
alpha / sqrt(r) with rsLoRA), exactly as peft computes it when it injects the layers. Like
diffusers' FluxPipeline, only the transformer and the CLIP text encoder are touched; a T5
part of a LoRA is ignored (and reported).

Memory: the converted factors go to a temporary safetensors file and are read back per
tensor; one fused tensor (float32) is in memory at a time.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxc.errors import FluxcError
from fluxc.export.loading import _ckpt_key
from fluxc.export.source import WeightStore, _read_header
from fluxc.export.weights import WEIGHTS_DIR
from fluxc.fsutil import atomic_path, sha256_file, sha256_json

# diffusers' key prefix -> fluxc component (FluxPipeline loads LoRAs into these two only)
COMPONENTS = {"transformer": "transformer", "text_encoder": "text_encoder"}
IGNORED_PREFIXES = ("text_encoder_2.",)
# FluxPipeline.load_lora_weights reads a text-encoder rank only for these layers.
_TE_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


@dataclass(frozen=True)
class LoraArg:
    path: Path
    scale: float = 1.0


def parse_lora_arg(text: str) -> LoraArg:
    """'FILE' or 'FILE:SCALE' -> LoraArg (a path that exists as given wins over a split)."""
    if Path(text).expanduser().is_file() or ":" not in text:
        return LoraArg(Path(text).expanduser(), 1.0)
    file, _, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        raise FluxcError(f"--lora {text}: scale {scale!r} is not a number; write FILE or FILE:SCALE, "
                         f"e.g. style.safetensors:0.8") from None
    if not math.isfinite(value):
        raise FluxcError(f"--lora {text}: scale {scale!r} is not a finite number; e.g. style.safetensors:0.8")
    return LoraArg(Path(file).expanduser(), value)


@dataclass
class _Module:
    """One LoRA-adapted Linear of one component, from one LoRA file."""

    name: str  # module name inside the component's model
    scaling: float  # user scale * alpha / r
    has_bias: bool


@dataclass
class _Lora:
    arg: LoraArg
    sha256: str
    store: Path  # temporary safetensors file with the converted factors
    modules: dict[str, dict[str, _Module]] = field(default_factory=dict)  # component -> name -> module
    ignored: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"file": self.arg.path.name, "path": str(self.arg.path.resolve()), "sha256": self.sha256,
                "scale": self.arg.scale, "modules": {c: len(m) for c, m in self.modules.items() if m}}


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FluxcError(f"--lora {path}: no such file; give a LoRA .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FluxcError(f"--lora {path}: not a safetensors file ({first}); fluxc reads LoRAs in .safetensors "
                         f"format only (convert a .bin/.pt with safetensors.torch.save_file)") from None


def _read_diffusers(path: Path) -> tuple[dict, dict | None, dict | None]:
    """(state dict with diffusers names, network alphas, adapter metadata) via diffusers."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        sd, alphas, meta = FluxLoraLoaderMixin.lora_state_dict(
            str(path.parent), weight_name=path.name, use_safetensors=True, local_files_only=True,
            return_alphas=True, return_lora_metadata=True)
    except (ValueError, KeyError, AssertionError, IndexError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FluxcError(f"--lora {path}: diffusers cannot read it as a FLUX.1 LoRA ({first}); "
                         f"give a FLUX.1 LoRA in diffusers, kohya or ComfyUI format") from None
    return sd, alphas, meta


def _component_part(sd: dict, alphas: dict | None, meta: dict | None, prefix: str):
    """The component's state dict in peft format, its LoraConfig, as FluxPipeline builds them."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    part = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    if prefix == "transformer":
        part = {k: v for k, v in part.items() if "lora" in k}
    if not part:
        return {}, None
    meta_c = None if meta is None else {k[len(prefix) + 1:]: v for k, v in meta.items()
                                        if k.startswith(prefix + ".")}
    alphas_c = None
    if alphas:
        alphas_c = {k[len(prefix) + 1:]: v for k, v in alphas.items() if k.split(".")[0] == prefix}
    if prefix == "transformer":
        if "lora_A" not in next(iter(part)):
            part = convert_unet_state_dict_to_peft(part)
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
        cfg = _create_lora_config(part, alphas_c, meta_c or None, rank)
    else:
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
        rank = {k: v.shape[1] for k, v in part.items()
                if k.endswith(".lora_B.weight") and k[: -len(".lora_B.weight")].endswith(_TE_RANKED)}
        if not rank:
            rank = {k: v.shape[1] for k, v in part.items() if k.endswith(".lora_B.weight")}
        cfg = _create_lora_config(part, alphas_c, meta_c or None, rank, is_unet=False)
    return part, cfg


def _scaling(cfg, name: str) -> float:
    """peft's own per-module scaling (LoraModel._create_and_replace + LoraLayer.update_layer)."""
    from peft.utils.other import get_pattern_key

    r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), name), cfg.r)
    alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), name), cfg.lora_alpha)
    return alpha / math.sqrt(r) if getattr(cfg, "use_rslora", False) else alpha / r


def _linear(model, name: str, component: str, path: Path):
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        mod = None
    w = getattr(mod, "weight", None) if mod is not None else None
    if w is None or w.ndim != 2:
        raise FluxcError(f"--lora {path}: it adapts {component} layer {name!r}, which this model does not have "
                         f"as a Linear; the LoRA was made for another model")
    return mod


def _load_one(arg: LoraArg, models: dict[str, Any], tmpdir: Path, index: int) -> _Lora:
    import torch
    from safetensors.torch import save_file

    path = arg.path
    _check_safetensors(path)
    sd, alphas, meta = _read_diffusers(path)
    lora = _Lora(arg, sha256_file(path), tmpdir / f"lora{index}.safetensors")
    lora.ignored = sorted({k.split(".")[0] for k in sd if k.startswith(IGNORED_PREFIXES)})
    factors: dict[str, torch.Tensor] = {}
    for prefix, comp in COMPONENTS.items():
        part, cfg = _component_part(sd, alphas, meta, prefix)
        if not part:
            continue
        if getattr(cfg, "use_dora", False) or any("lora_magnitude_vector" in k for k in part):
            raise FluxcError(f"--lora {path}: DoRA adapters cannot be fused by fluxc; give a plain LoRA")
        names = sorted({k.split(".lora_")[0] for k in part})
        mods = {}
        for name in names:
            a, b = part.get(f"{name}.lora_A.weight"), part.get(f"{name}.lora_B.weight")
            extra = [k for k in part if k.startswith(name + ".lora_") and not k.endswith(
                (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"))]
            if a is None or b is None or extra or a.ndim != 2 or b.ndim != 2:
                raise FluxcError(f"--lora {path}: {comp} layer {name!r} is not a plain LoRA pair (lora_A/lora_B "
                                 f"matrices); fluxc fuses plain LoRAs only")
            lin = _linear(models[comp], name, comp, path)
            shape = tuple(lin.weight.shape)
            if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != shape:
                raise FluxcError(f"--lora {path}: {comp} layer {name} has weight {list(shape)} but the LoRA's "
                                 f"update is {[b.shape[0], a.shape[1]]}; the LoRA was made for another model")
            bias = part.get(f"{name}.lora_B.bias")
            if bias is not None and (getattr(lin, "bias", None) is None or tuple(bias.shape) != (shape[0],)):
                raise FluxcError(f"--lora {path}: {comp} layer {name} has a LoRA bias that does not fit the "
                                 f"layer; the LoRA was made for another model")
            factors[f"{comp}/{name}/A"] = a.contiguous()
            factors[f"{comp}/{name}/B"] = b.contiguous()
            if bias is not None:
                factors[f"{comp}/{name}/bias"] = bias.contiguous()
            mods[name] = _Module(name, arg.scale * _scaling(cfg, name), bias is not None)
        lora.modules[comp] = mods
    if not factors:
        raise FluxcError(f"--lora {path}: no LoRA layer for the FLUX.1 transformer or CLIP text encoder in it; "
                         f"give a FLUX.1 LoRA")
    save_file(factors, str(lora.store))
    del sd, factors
    return lora


class LoraSet:
    """Every --lora of one export, checked against the meta-built models, ready to fuse."""

    def __init__(self, loras: list[_Lora], tmp: tempfile.TemporaryDirectory):
        self.loras, self._tmp = loras, tmp

    @classmethod
    def open(cls, args: list[LoraArg], models: dict[str, Any]) -> "LoraSet":
        """`models`: component -> its model (meta parameters are enough: names and shapes)."""
        tmp = tempfile.TemporaryDirectory(prefix="fluxc-lora-")
        try:
            loras = [_load_one(a, models, Path(tmp.name), i) for i, a in enumerate(args)]
        except BaseException:
            tmp.cleanup()
            raise
        for lo in loras:
            if lo.ignored:
                warnings.warn(f"--lora {lo.arg.path.name}: its {', '.join(lo.ignored)} part is ignored "
                              f"(FLUX.1 pipelines apply LoRAs to the transformer and CLIP only)")
        return cls(loras, tmp)

    def close(self) -> None:
        self._tmp.cleanup()

    def records(self) -> list[dict[str, Any]]:
        """What the manifest records: file, sha256, scale, adapted layers per component."""
        return [lo.record() for lo in self.loras]

    def _plan(self, component: str, store) -> dict[str, list[tuple[_Lora, _Module, str]]]:
        """Checkpoint tensor -> the LoRA updates to add to it ("weight" or "bias")."""
        plan: dict[str, list[tuple[_Lora, _Module, str]]] = {}
        for lo in self.loras:
            for name, m in sorted(lo.modules.get(component, {}).items()):
                for part in ("weight", "bias") if m.has_bias else ("weight",):
                    key = _ckpt_key(f"{name}.{part}", store)
                    if key is None:
                        raise FluxcError(f"--lora {lo.arg.path}: {component} tensor {name}.{part} is not in the "
                                         f"checkpoint; the LoRA was made for another model")
                    plan.setdefault(key, []).append((lo, m, part))
        return plan

    def fused_stores(self, stores: dict[str, Any], out: Path) -> dict[str, Any]:
        """For each component a LoRA touches: its weight store with the touched tensors
        replaced by their fused versions, written once (one tensor in memory at a time) to
        <out>/weights/<component>/lora-fused-<hash>.safetensors in the checkpoint's dtype.
        The file name hashes the LoRAs (sha256, scale), this code and the base tensors, so a
        piece's content key (which covers its tensors' files) changes exactly when a LoRA
        touching it changes, and a rerun reuses the file."""
        res = {}
        for comp in sorted({c for lo in self.loras for c, m in lo.modules.items() if m}):
            store = stores[comp]
            plan = self._plan(comp, store)
            ident = sha256_json({"loras": [[lo.sha256, lo.arg.scale] for lo in self.loras], "code": _code_hash(),
                                 "component": comp, "base": store.fingerprint(plan)})
            path = Path(out) / WEIGHTS_DIR / comp / f"lora-fused-{ident[:16]}.safetensors"
            if not path.is_file():
                _write_fused(path, store, plan, comp)
            files = dict(store.files)
            files.update({k: path for k in plan})
            headers = dict(store.headers)
            headers[path] = _read_header(path)
            res[comp] = WeightStore(store.folder, files, headers)
        return res


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _write_fused(path: Path, store, plan: dict[str, list[tuple[_Lora, _Module, str]]], component: str) -> None:
    """A safetensors file of W + sum(scale * scaling * B @ A) for every planned tensor, in the
    stored dtype, written tensor by tensor (header first: the sizes are known)."""
    import torch
    from safetensors import safe_open

    keys = sorted(plan)
    header: dict[str, Any] = {}
    off = 0
    for k in keys:
        info = store.info(k)
        if info["dtype"] not in _TORCH_DTYPES:
            raise FluxcError(f"{component} tensor {k} is stored as {info['dtype']}; a LoRA can only be fused into "
                             f"float weights")
        n = int(info["data_offsets"][1]) - int(info["data_offsets"][0])
        header[k] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"fluxc": "LoRA-fused tensors (fluxc.export.lora)"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    used = {id(lo): lo for updates in plan.values() for lo, _, _ in updates}
    factors = {i: safe_open(str(lo.store), framework="pt") for i, lo in used.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f, torch.no_grad():
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in keys:
            w = store.load([k])[k]  # float32
            for lo, m, part in plan[k]:
                fa = factors[id(lo)]
                if part == "weight":
                    a = fa.get_tensor(f"{component}/{m.name}/A").to(torch.float32)
                    b = fa.get_tensor(f"{component}/{m.name}/B").to(torch.float32)
                    w.add_(b @ a, alpha=m.scaling)
                else:
                    w.add_(fa.get_tensor(f"{component}/{m.name}/bias").to(torch.float32), alpha=m.scaling)
            t = w.to(getattr(torch, _TORCH_DTYPES[header[k]["dtype"]])).contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del w, t


def _code_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def open_loras(texts: list[str] | list[LoraArg] | None, models: dict[str, Any]) -> LoraSet | None:
    """LoraSet for the --lora options (strings FILE[:SCALE] or LoraArg), or None without any."""
    if not texts:
        return None
    args = [t if isinstance(t, LoraArg) else parse_lora_arg(str(t)) for t in texts]
    return LoraSet.open(args, models)


def fuse_loras(texts, ckpt, out: Path) -> list[dict[str, Any]] | None:
    """The export's hook: check the --lora files against the checkpoint's models, write the
    fused tensors into the export, point `ckpt.stores` at them. Returns the manifest records
    (None without --lora)."""
    loras = open_loras(texts, {c: ckpt.model(c) for c in COMPONENTS.values()})
    if loras is None:
        return None
    try:
        ckpt.stores.update(loras.fused_stores(ckpt.stores, out))
        return loras.records()
    finally:
        loras.close()


def describe(records: list[dict[str, Any]] | None) -> str:
    """One line for `fluxc run`: 'style.safetensors x0.8 (sha256 1a2b3c4d), ...'."""
    if not records:
        return ""
    return ", ".join(f"{r.get('file')} x{r.get('scale')} (sha256 {str(r.get('sha256'))[:12]})" for r in records)
