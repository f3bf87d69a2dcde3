"""Where the weights come from: a local diffusers FLUX.1 folder or a Hugging Face Hub id.

Nothing here loads a whole model. `WeightStore` maps tensor names to safetensors files
(through the *.safetensors.index.json of sharded checkpoints) and reads only the tensors
asked for, converted to float32.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fluxc.errors import FluxcError

HUB_IDS = {"schnell": "black-forest-labs/FLUX.1-schnell", "dev": "black-forest-labs/FLUX.1-dev",
           "kontext": "black-forest-labs/FLUX.1-Kontext-dev"}
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
# Only what export needs from a Hub repo (no fp16 variants, no single-file checkpoints).
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "*/*.safetensors.index.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "scheduler/*",
]  # never the root *.safetensors: FLUX repos hold a 23 GB single-file copy there
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# ---------------------------------------------------------------------------------------------
# Resolving MODEL

@dataclass
class Source:
    """A resolved model: a local folder plus what the manifest records about its origin."""

    folder: Path
    model: str  # as given by the user (path or Hub id)
    kind: str  # "local" or "hub"
    revision: str | None = None  # Hub commit if known


def looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "/", "~"))


def resolve(model: str, *, what: str = "model", patterns: list[str] | None = None) -> Source:
    """A local folder as is; a Hub id through huggingface_hub.snapshot_download (cached)."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FluxcError(f"{what} {model} is a file; give a diffusers folder (or a Hub id)")
        return Source(p.resolve(), model, "local")
    if not looks_like_hub_id(model):
        raise FluxcError(f"{what} folder {model} does not exist; give an existing diffusers folder or a Hub id")
    return _download(model, what, patterns or HUB_PATTERNS)


def _download(repo_id: str, what: str, patterns: list[str]) -> Source:
    """snapshot_download with every failure turned into a one-line FluxcError saying what to do.
    Offline (HF_HUB_OFFLINE=1) a repo is served from the cache (HF_HUB_CACHE, or HF_HOME/hub)
    or raises LocalEntryNotFoundError; online the Hub answers gated / not found itself."""
    try:  # deferred: only a Hub id needs it; local folders never load it
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FluxcError("huggingface_hub is not installed; pip install huggingface_hub") from None
    cache = getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False)) or \
        os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local = "or pass a local diffusers folder instead"
    incomplete = getattr(hf_errors, "IncompleteSnapshotError", None)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except hf_errors.GatedRepoError:
        raise FluxcError(f"{what} {repo_id} is gated on the Hugging Face Hub: accept its licence on "
                         f"https://huggingface.co/{repo_id}, log in (`hf auth login` or HF_TOKEN) and retry, "
                         f"{local}") from None
    except hf_errors.RepositoryNotFoundError:
        raise FluxcError(f"{what} {repo_id!r} is neither a local folder nor a Hugging Face Hub repository "
                         f"(or it is private: log in with `hf auth login`); check the id, {local}") from None
    except hf_errors.RevisionNotFoundError:
        raise FluxcError(f"{what} {repo_id}: the Hub has no such revision; check the id, {local}") from None
    except hf_errors.LocalEntryNotFoundError as e:
        if incomplete is not None and isinstance(e, incomplete):
            raise FluxcError(f"the cached copy of {what} {repo_id} in {cache} is incomplete: download it again "
                             f"with network access (unset HF_HUB_OFFLINE), {local}") from None
        if offline:
            raise FluxcError(f"{what} {repo_id} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                             f"forbids downloading it: unset HF_HUB_OFFLINE, point HF_HUB_CACHE/HF_HOME at the "
                             f"cache that holds it, {local}") from None
        raise FluxcError(f"cannot reach the Hugging Face Hub to download {what} {repo_id} and it is not in the "
                         f"local cache ({cache}): check the network (or HF_ENDPOINT) and retry, {local}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FluxcError(f"disk full while downloading {what} {repo_id} into {cache}: free space there "
                             f"(FLUX.1 needs about 34 GB) or set HF_HUB_CACHE to a bigger disk") from None
        raise FluxcError(f"cannot download {what} {repo_id!r} from the Hugging Face Hub "
                         f"({type(e).__name__}: {_first_line(e)}); {local}") from None
    except Exception as e:  # network, bad id, anything else from the Hub client
        raise FluxcError(f"cannot download {what} {repo_id!r} from the Hugging Face Hub "
                         f"({type(e).__name__}: {_first_line(e)}); {local}") from None
    revision = None
    parts = folder.parts
    if len(parts) >= 2 and parts[-2] == "snapshots":
        revision = parts[-1]
    return Source(folder, repo_id, "hub", revision)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else ""


# ---------------------------------------------------------------------------------------------
# Configs and flux type

def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FluxcError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as e:
        raise FluxcError(f"{what}: cannot read {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"the file is damaged: re-download the model") from None


def check_flux_folder(folder: Path) -> None:
    """A one-line error unless `folder` looks like a diffusers FLUX.1 pipeline."""
    missing = [c for c in COMPONENTS if not (folder / c / "config.json").is_file()]
    if missing:
        raise FluxcError(f"{folder} is not a diffusers FLUX.1 checkpoint (no {missing[0]}/config.json); "
                         f"give a folder saved by FluxPipeline.save_pretrained or a FLUX.1 Hub id")
    cfg = read_json(folder / "transformer" / "config.json", "transformer config")
    cls = cfg.get("_class_name", "")
    if cls and cls != "FluxTransformer2DModel":
        raise FluxcError(f"{folder} is not a FLUX.1 checkpoint (transformer is {cls}, expected "
                         f"FluxTransformer2DModel)")
    for tok in ("tokenizer", "tokenizer_2"):
        if not (folder / tok).is_dir():
            raise FluxcError(f"{folder} is not a complete FLUX.1 checkpoint ({tok}/ is missing)")


def pipeline_class(folder: Path) -> str | None:
    """model_index.json's _class_name (None when absent or unreadable)."""
    p = Path(folder) / "model_index.json"
    try:
        return json.loads(p.read_text()).get("_class_name") if p.is_file() else None
    except (OSError, ValueError):
        return None


def detect_flux_type(transformer_cfg: dict[str, Any], given: str | None, folder: Path) -> str:
    # FLUX.1 Kontext has dev's transformer config; its model_index.json names FluxKontextPipeline
    if pipeline_class(folder) == "FluxKontextPipeline":
        if given is not None and given != "kontext":
            raise FluxcError(f"--flux-type {given} contradicts {folder}/model_index.json (FluxKontextPipeline: "
                             f"FLUX.1 Kontext); drop --flux-type or pick the matching model")
        return "kontext"
    detected = "dev" if transformer_cfg.get("guidance_embeds", False) else "schnell"
    if given is not None and given != detected:
        raise FluxcError(f"--flux-type {given} contradicts {folder}/transformer/config.json "
                         f"(guidance_embeds={bool(transformer_cfg.get('guidance_embeds'))} means {detected}); "
                         f"drop --flux-type or pick the matching model")
    return detected


# ---------------------------------------------------------------------------------------------
# Weights

def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FluxcError(f"{path} is not a safetensors file (truncated); re-download the model")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise FluxcError(f"{path} is not a safetensors file; re-download the model")
        try:
            return json.loads(f.read(n))
        except ValueError:
            raise FluxcError(f"{path} is not a safetensors file (bad header); re-download the model") from None


@dataclass
class WeightStore:
    """Tensor name -> safetensors file, for one component folder (e.g. <model>/transformer)."""

    folder: Path
    files: dict[str, Path]  # tensor name -> file
    headers: dict[Path, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, component: str) -> "WeightStore":
        folder = Path(folder)
        indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if not _is_variant(p.name))
        files: dict[str, Path] = {}
        if indexes:
            idx = read_json(indexes[0], f"{component} weights index")
            wm = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise FluxcError(f"{component}: {indexes[0]} has no valid weight_map (tensor name -> file); "
                                 f"re-download the model")
            for k, fn in wm.items():
                if Path(fn).name != fn:
                    raise FluxcError(f"{component}: {indexes[0]} names {fn!r}, not a file in {folder}; "
                                     f"re-download the model")
                files[k] = folder / fn
            missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
            if missing:
                raise FluxcError(f"{component}: {folder}/{missing[0]} is missing (listed in {indexes[0].name}); "
                                 f"re-download the model")
        else:
            shards = sorted(p for p in folder.glob("*.safetensors") if not _is_variant(p.name))
            if not shards:
                raise FluxcError(f"{component}: no .safetensors weights in {folder}; re-download the model "
                                 f"(only safetensors checkpoints are supported)")
            for p in shards:
                for k in _read_header(p):
                    if k != "__metadata__":
                        files[k] = p
        store = cls(folder, files)
        for p in sorted(set(files.values())):
            store.headers[p] = _read_header(p)
            _check_size(p, store.headers[p], component)
        if indexes:
            for k, p in files.items():
                if k not in store.headers[p]:
                    raise FluxcError(f"{component}: {indexes[0].name} puts tensor {k} in {p.name}, which does not "
                                     f"hold it; the index is corrupt: re-download the model")
        return store

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def has(self, key: str) -> bool:
        return key in self.files

    def info(self, key: str) -> dict[str, Any]:
        return self.headers[self.files[key]][key]

    def fingerprint(self, keys: Iterable[str]) -> str:
        """Content key of some tensors without reading them: each tensor's file identity
        (name, size, mtime) and its header entry (dtype, shape, byte offsets)."""
        h = hashlib.sha256()
        for k in sorted(keys):
            p = self.files[k]
            st = p.stat()
            h.update(json.dumps([k, p.name, st.st_size, st.st_mtime_ns, self.info(k)], sort_keys=True).encode())
        return h.hexdigest()

    def identity(self) -> str:
        """Hash of the safetensors headers of every file (names, dtypes, shapes, offsets)."""
        h = hashlib.sha256()
        for p in sorted(self.headers):
            h.update(p.name.encode())
            h.update(json.dumps(self.headers[p], sort_keys=True).encode())
        return h.hexdigest()

    def load(self, keys: Iterable[str], dtype=None) -> dict[str, Any]:
        """Read the named tensors (float tensors converted to `dtype`, default float32).

        Plain positioned reads, one tensor at a time (no memory map), so the only memory
        used is the result plus one tensor in its stored dtype."""
        import torch  # deferred: heavy; reading the index and hashing do not need it

        dtype = dtype or torch.float32
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.files:
                raise FluxcError(f"tensor {k} is missing from the weights in {self.folder}; re-download the model")
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, Any] = {}
        for p, ks in by_file.items():
            header = self.headers[p]
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                base = 8 + n
                for k in sorted(ks, key=lambda k: header[k]["data_offsets"][0]):
                    info = header[k]
                    st = _ST_DTYPES.get(info["dtype"])
                    if st is None:
                        raise FluxcError(f"{p}: tensor {k} has unsupported dtype {info['dtype']}")
                    start, end = info["data_offsets"]
                    f.seek(base + start)
                    buf = bytearray(end - start)
                    if f.readinto(buf) != end - start:
                        raise FluxcError(f"{p} is truncated (tensor {k}); re-download the model")
                    t = torch.frombuffer(buf, dtype=getattr(torch, st)) if buf else torch.empty(0, dtype=getattr(torch, st))
                    t = t.reshape(info["shape"])
                    out[k] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t.clone()
                    del t, buf
        return out


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _check_size(path: Path, header: dict[str, Any], component: str) -> None:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        raise FluxcError(f"{component}: {path} is truncated ({size} bytes, its header needs {8 + n + end}); "
                         f"re-download the model")


def _is_variant(name: str) -> bool:
    # diffusers variants: diffusion_pytorch_model.fp16.safetensors, model.fp16-00001-of-00002.safetensors
    return bool(re.search(r"\.(fp16|bf16|fp32|non_ema|ema)[.\-]", name))


def model_revision(folder: Path, stores: dict[str, WeightStore]) -> str:
    """Hash of every config plus every safetensors header: stands in for a Hub commit."""
    h = hashlib.sha256()
    for cfg in sorted(Path(folder).glob("*/config.json")) + sorted(Path(folder).glob("*/scheduler_config.json")):
        h.update(str(cfg.relative_to(folder)).encode())
        h.update(cfg.read_bytes())
    for name in sorted(stores):
        h.update(name.encode())
        h.update(stores[name].identity().encode())
    return "sha256:" + h.hexdigest()[:32]
