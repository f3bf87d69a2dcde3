"""Block-by-block materialisation of the big models.

A model is built with its parameters on the meta device (no memory; buffers stay real on
the CPU, they are small: position ids and the like). For each piece, only the parameters
under that piece's state-dict prefixes are read from the safetensors files (float32) and
assigned in place; after the piece is exported they are put back on the meta device. The
peak memory is therefore one piece's weights (plus ONNX export overhead), whatever the
number of blocks.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from fluxc.errors import FluxcError
from fluxc.export.source import WeightStore

# Checkpoint names that differ from the module's own names.
#  - transformers 5 CLIPTextModel has no `text_model.` level; checkpoints saved by 4.x do.
#  - T5's input embedding is tied to `shared`; checkpoints often hold only `shared.weight`.
_PREFIX_CANDIDATES = ("", "text_model.")
_ALIASES = {"encoder.embed_tokens.weight": ("shared.weight",), "shared.weight": ("encoder.embed_tokens.weight",)}


@contextmanager
def params_on_meta() -> Iterator[None]:
    """While active, every registered nn.Parameter is moved to the meta device (buffers are
    left on the CPU). Plain torch, in the spirit of accelerate's init_empty_weights."""
    import torch
    from torch import nn

    orig = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        orig(self, name, param)

    nn.Module.register_parameter = register
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = orig


def build_on_meta(factory) -> Any:
    """Call `factory()` (e.g. lambda: FluxTransformer2DModel.from_config(cfg)) with meta params."""
    with params_on_meta():
        model = factory()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ckpt_key(key: str, store: WeightStore) -> str | None:
    for pre in _PREFIX_CANDIDATES:
        if store.has(pre + key):
            return pre + key
    for alias in _ALIASES.get(key, ()):
        for pre in _PREFIX_CANDIDATES:
            if store.has(pre + alias):
                return pre + alias
    return None


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def _param_slots(model, prefixes) -> list[tuple[str, Any, str]]:
    """(full name, owning module, attribute) for every parameter under `prefixes`,
    tied duplicates included."""
    slots = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if _matches(full, prefixes):
                slots.append((full, mod, pname))
    return slots


def materialize(model, prefixes: Iterable[str], store: WeightStore, component: str) -> dict[str, str]:
    """Load the parameters under `prefixes` from `store` as float32 (in place, by assignment).
    Returns {module parameter name: checkpoint tensor name}."""
    import torch
    from torch import nn

    prefixes = list(prefixes)
    slots = _param_slots(model, prefixes)
    if not slots:
        raise FluxcError(f"{component}: no parameters under {prefixes}; the checkpoint does not match its config")
    names: dict[str, str] = {}
    for full, _, _ in slots:
        k = _ckpt_key(full, store)
        if k is None:
            raise FluxcError(f"{component}: tensor {full} is missing from {store.folder}; the safetensors files "
                             f"are incomplete or belong to another model")
        names[full] = k
    tensors = store.load(sorted(set(names.values())))
    for full, mod, pname in slots:
        t = tensors[names[full]]
        old = mod._parameters[pname]
        if tuple(t.shape) != tuple(old.shape):
            raise FluxcError(f"{component}: tensor {names[full]} has shape {tuple(t.shape)}, the config says "
                             f"{tuple(old.shape)}; the weights do not match the config")
        mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    # Tied parameters end up sharing the loaded tensor again (one tensor per checkpoint key).
    del tensors
    return names


def release(model, prefixes: Iterable[str]) -> None:
    """Put the parameters under `prefixes` back on the meta device and free their memory."""
    import torch
    from torch import nn

    for _, mod, pname in _param_slots(model, list(prefixes)):
        p = mod._parameters[pname]
        if p.device.type != "meta":
            mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS reflects what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def loaded_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def checkpoint_keys(model, prefixes: Iterable[str], store: WeightStore, component: str) -> list[str]:
    """Checkpoint tensor names a piece will read (without reading them)."""
    keys = set()
    for full, _, _ in _param_slots(model, list(prefixes)):
        k = _ckpt_key(full, store)
        if k is None:
            raise FluxcError(f"{component}: tensor {full} is missing from {store.folder}; the safetensors files "
                             f"are incomplete or belong to another model")
        keys.add(k)
    return sorted(keys)
