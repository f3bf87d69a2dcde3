"""Running sophon-demo's FLUX.1 bmodels as its download lays them out ("adoption").

The download of Sophgo's sophon-demo sample (sample/FLUX.1: scripts/download.sh, the README's
listing, python/flux_pipeline.py) is a folder

    models/
      BM1684X/   clip.bmodel, w4bf16_t5.bmodel,
                 {dev,schnell}_w4bf16_transformer.bmodel (one chip) or
                 {dev,schnell}_bf16_transformer_on_device{0,1,2}.bmodel (three chips),
                 vae_decoder_bf16.bmodel and/or tiny_vae_decoder_bf16.bmodel
      ids_emb.pt               the rotary table, a pickled torch tensor [1,S,1,64,2,2]
                               (newer runtimes: ids_emb_1024.pt on BM1684X, ids_emb_512.pt on BM1688)
      tokenizer/               CLIP tokenizer
      tokenizer_2/             T5 tokenizer (the runtime and download.sh; the README lists it as tokenize_2/)

with no fluxc manifest and no build record. Everything `fluxc run` needs is read from these
files, never guessed:
- which files: by the reference's file names, narrowed by --flux-type / --quantize /
  --tiny-vae when the folder holds several (one-line error when it stays ambiguous);
- nets, input/output shapes and dtypes: from the opened bmodels themselves (the engine lists
  them as the reference's runtime reads them: get_input_tensors_addrmode0(net)[i].shape() /
  .dtype()), so the same code works on the board (sail), the simulator (cmodel) and the
  stand-in (sail-sim), without TPU-MLIR's model_tool;
- every size (image height/width, CLIP/T5 lengths and widths, blocks, head dim, latent
  channels, VAE scale): from those shapes; the flux type from the net names ({type}_head),
  guidance from the head's input count, the tiny VAE from the VAE file's name;
- the rotary table from ids_emb.pt, checked against the blocks' rotary input;
- the scheduler config from the flux type (the published FLUX.1 configs, which are the
  reference runtime's SCHEDULE_CONFIG; fluxc.tiny.SCHEDULER_CONFIGS holds them).

Inputs are bound by position, which is the reference runtime's contract (it fills
`{0: ..., 1: ...}` maps): its nets carry whatever tensor names TorchScript / torch.onnx gave
them. Every net's shapes are checked position by position against fluxc's piece specs for the
derived sizes, and when a net's own input names are fluxc's names in another order the
adoption refuses (a positional bind would swap them). Dtypes are the nets' own: token ids go
in as the net declares them (float32 in the reference's bmodels, which its runtime feeds as
`ids.astype(np.float32)`, and fluxc's alike; int32 in fluxc builds made before the switch); any other input must be float32.

The result is an in-memory manifest (dims, specs with the nets' dtypes, rotary table,
scheduler config, tokenizer folders) and a ModelSet whose engines present every net under
fluxc's piece names, so the pipeline and the sail runtime (runtime/sail_flux.py) run it as
they run a fluxc build.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxc.build_record import placement
from fluxc.errors import FluxcError
from fluxc.runtime.backends import open_engine
from fluxc.runtime.engine import Engine, NetInfo, TensorInfo
from fluxc.runtime.models import ModelSet
from fluxc.specs import FluxDims, PieceSpec, TensorSpec, piece_specs
from fluxc.tiny import SCHEDULER_CONFIGS

FLUX_TYPES = ("dev", "schnell")
CLIP_FILE = "clip.bmodel"
T5_FILE = "w4bf16_t5.bmodel"
VAE_FILES = {False: "vae_decoder_bf16.bmodel", True: "tiny_vae_decoder_bf16.bmodel"}  # tiny_vae -> file
BF16_DEVICES = 3  # the reference splits the BF16 transformer over three chips
ROTARY_FILES = {"BM1684X": ("ids_emb.pt", "ids_emb_1024.pt"), "BM1688": ("ids_emb.pt", "ids_emb_512.pt")}
TOKENIZER_DIRS = ("tokenizer",)
TOKENIZER_2_DIRS = ("tokenizer_2", "tokenize_2")  # the runtime's name, the README's spelling
ID_INPUTS = {("clip_head", 0), ("clip_tail", 1), ("t5_head", 0)}  # (piece, input position): token ids
ID_DTYPES = ("float32", "int32")
DOWNLOAD_HINT = "fetch them with the sample's scripts/download.sh, or point --models at a fluxc workspace"


def transformer_files(flux_type: str, quantize: str) -> list[str]:
    if quantize == "W4BF16":
        return [f"{flux_type}_w4bf16_transformer.bmodel"]
    return [f"{flux_type}_bf16_transformer_on_device{i}.bmodel" for i in range(BF16_DEVICES)]


def _rotary_names(chip: str) -> tuple[str, ...]:
    return ROTARY_FILES.get(chip.upper(), ("ids_emb.pt",))


def _first_dir(models: Path, names) -> Path | None:
    for n in names:
        if (models / n).is_dir():
            return models / n
    return None


def looks_like_download(models: Path, chip: str = "BM1684X") -> bool:
    """Whether MODELS has any part of a sophon-demo download (and is no fluxc export)."""
    models = Path(models)
    cd = models / chip.upper()
    names = {CLIP_FILE, T5_FILE, *VAE_FILES.values()}
    names |= {f for t in FLUX_TYPES for q in ("W4BF16", "BF16") for f in transformer_files(t, q)}
    if cd.is_dir() and not (cd / "fluxc_build.json").is_file() and any((cd / n).is_file() for n in names):
        return True
    return any((models / n).is_file() for n in _rotary_names(chip)) or (models / "tokenize_2").is_dir()


@dataclass
class DownloadPlan:
    """The files of one sophon-demo build chosen from a download folder."""

    models: Path
    chip: str  # folder name, e.g. BM1684X
    flux_type: str
    quantize: str  # W4BF16 (one chip) or BF16 (three)
    tiny_vae: bool
    files: list[tuple[str, Path, int]]  # (family, path, logical device), in load order
    rotary_candidates: list[Path]
    tokenizer: Path
    tokenizer_2: Path

    @property
    def devices(self) -> int:
        return BF16_DEVICES if self.quantize == "BF16" else 1


def plan_download(models: Path, chip: str = "BM1684X", flux_type: str | None = None, quantize: str | None = None,
                  tiny_vae: bool | None = None) -> DownloadPlan:
    """Choose the files of one build in a download folder. One-line FluxcError naming every
    missing part when the folder is not a complete download, or the choice that is ambiguous."""
    models = Path(models)
    chip = chip.upper()
    cd = models / chip
    q_want = quantize.upper() if quantize else None
    if q_want and q_want not in ("W4BF16", "BF16"):
        raise FluxcError(f"unknown --quantize {quantize}; use W4BF16 or BF16")
    if flux_type and flux_type not in FLUX_TYPES:
        raise FluxcError(f"unknown --flux-type {flux_type}; use dev or schnell")
    missing: list[str] = []
    for n in (CLIP_FILE, T5_FILE):
        if not (cd / n).is_file():
            missing.append(f"{chip}/{n}")
    # transformer: the complete sets present, narrowed by the options
    types = [flux_type] if flux_type else list(FLUX_TYPES)
    quants = [q_want] if q_want else ["W4BF16", "BF16"]
    combos = [(t, q) for t in types for q in quants]
    present = [(t, q) for t, q in combos if all((cd / f).is_file() for f in transformer_files(t, q))]
    if not present:
        partial = [(t, q) for t, q in combos if any((cd / f).is_file() for f in transformer_files(t, q))]
        if partial:
            t, q = partial[0]
            missing += [f"{chip}/{f}" for f in transformer_files(t, q) if not (cd / f).is_file()]
        else:
            t = flux_type or "<dev|schnell>"
            alts = [f"{t}_w4bf16_transformer.bmodel" if q == "W4BF16" else f"{t}_bf16_transformer_on_device0..2.bmodel"
                    for q in quants]
            missing.append(f"{chip}/" + " or ".join(alts))
    # VAE
    vae_present = [tv for tv in (True, False) if (cd / VAE_FILES[tv]).is_file()]
    if tiny_vae is not None and tiny_vae not in vae_present:
        missing.append(f"{chip}/{VAE_FILES[tiny_vae]}")
    elif not vae_present:
        missing.append(f"{chip}/{VAE_FILES[False]} or {VAE_FILES[True]}")
    rot = [models / n for n in _rotary_names(chip) if (models / n).is_file()]
    if not rot:
        missing.append(" or ".join(_rotary_names(chip)))
    tok = _first_dir(models, TOKENIZER_DIRS)
    tok2 = _first_dir(models, TOKENIZER_2_DIRS)
    if tok is None:
        missing.append("tokenizer/")
    if tok2 is None:
        missing.append("tokenizer_2/ (or tokenize_2/)")
    if missing:
        raise FluxcError(f"{models} is not a complete sophon-demo download: missing {', '.join(missing)}; "
                         f"{DOWNLOAD_HINT}")
    if len(present) > 1:
        names = ", ".join(transformer_files(t, q)[0] for t, q in present)
        raise FluxcError(f"{cd} holds several transformers ({names}); choose one with --flux-type and --quantize")
    t, q = present[0]
    if tiny_vae is None:
        # both VAEs: the reference's choice (download.sh) - the tiny one with the one-chip W4BF16
        # transformer, the full one with the three-chip BF16 split
        tiny_vae = vae_present[0] if len(vae_present) == 1 else q == "W4BF16"
    n_dev = BF16_DEVICES if q == "BF16" else 1
    # placement: the reference's (CLIP and VAE on device 0, T5 on the last, transformer part i on i)

    files = [("clip", cd / CLIP_FILE, placement("clip", 0, n_dev)), ("t5", cd / T5_FILE, placement("t5", 0, n_dev))]
    files += [("transformer", cd / f, placement("transformer", i, n_dev)) for i, f in enumerate(transformer_files(t, q))]
    files.append(("vae", cd / VAE_FILES[tiny_vae], placement("vae", 0, n_dev)))
    return DownloadPlan(models, chip, t, q, bool(tiny_vae), files, rot, tok, tok2)


# ------------------------------------------------------------------------------------------
# sizes from the nets


def _net(nets: dict[str, NetInfo], name: str, where: str) -> NetInfo:
    if name not in nets:
        raise FluxcError(f"{where} has no net {name!r} (the reference's runtime opens it); "
                         "not a sophon-demo FLUX.1 build")
    return nets[name]


def _shape(net: NetInfo, kind: str, i: int, ndim: int) -> tuple[int, ...]:
    ios = net.inputs if kind == "input" else net.outputs
    if i >= len(ios):
        raise FluxcError(f"net {net.name} has {len(ios)} {kind}s, the reference's runtime uses {kind} {i}")
    s = tuple(int(x) for x in ios[i].shape)
    if len(s) != ndim or s[0] != 1:
        raise FluxcError(f"net {net.name} {kind} {i} has shape {list(s)}; the reference's contract has a "
                         f"{ndim}-d batch-1 tensor there")
    return s


def _count(nets: dict[str, NetInfo], prefix: str) -> int:
    idx = sorted(int(n[len(prefix):]) for n in nets if n.startswith(prefix) and n[len(prefix):].isdigit())
    if not idx or idx != list(range(len(idx))):
        raise FluxcError(f"the {prefix}<i> nets are {idx or 'missing'}, not 0..n-1; not a complete FLUX.1 build")
    return len(idx)


def _vocab_size(folder: Path) -> int:
    """Tokenizer vocabulary size (only sizes the sample inputs of a spec; run does not use it)."""
    for name in ("tokenizer.json", "vocab.json"):
        p = folder / name
        if p.is_file():
            try:
                d = json.loads(p.read_text())
            except ValueError:
                continue
            v = d.get("model", {}).get("vocab") if name == "tokenizer.json" else d
            if isinstance(v, (dict, list)):
                return len(v)
    return 1


def dims_from_nets(nets: dict[str, NetInfo], flux_type: str, tiny_vae: bool, tokenizer: Path | None = None,
                   tokenizer_2: Path | None = None):
    """FluxDims of a build from its nets' shapes (nets by the reference's net names; inputs in
    the reference's order). One-line FluxcError when a net the runtime opens is missing."""
    w = "the bmodels"
    p = flux_type
    ch = _net(nets, "clip_head", w)
    L = _shape(ch, "input", 0, 2)[1]
    C = _shape(ch, "output", 0, 3)[2]
    th = _net(nets, "t5_head", w)
    S = _shape(th, "input", 0, 2)[1]
    T = _shape(th, "output", 0, 3)[2]
    head = _net(nets, f"{p}_head", w)
    n_in = len(head.inputs)
    guidance = n_in == 5
    if n_in not in (4, 5) or (p == "dev") != guidance:
        raise FluxcError(f"net {p}_head has {n_in} inputs; the reference's {p} head takes "
                         f"{5 if p == 'dev' else 4} (latents, timestep, {'guidance, ' if p == 'dev' else ''}pooled, t5)")
    _, N, cin = _shape(head, "input", 0, 3)
    P = _shape(head, "input", 3 if guidance else 2, 2)[1]
    J = _shape(head, "input", 4 if guidance else 3, 3)[2]
    D = _shape(head, "output", 0, 2)[1]
    blk = _net(nets, f"{p}_trans_block_0", w)
    rot = _shape(blk, "input", 3, 6)
    tail = _net(nets, f"{p}_tail", w)
    cout = _shape(tail, "output", 0, 3)[2]
    if "vae_decoder" not in nets and "tiny_vae_decoder" in nets:
        raise FluxcError("the VAE file holds net 'tiny_vae_decoder', but the reference's runtime opens 'vae_decoder' "
                         "(the sample's gen_bmodel.sh names the tiny one otherwise, a defect); recompile it with "
                         "--model_name vae_decoder")
    vae = _net(nets, "vae_decoder", w)
    _, lc, lh, lw = _shape(vae, "input", 0, 4)
    _, _, H, W = _shape(vae, "output", 0, 4)
    if lh <= 0 or H % lh or W % lw or H // lh != W // lw:
        raise FluxcError(f"net vae_decoder maps {lh}x{lw} latents to {H}x{W} images: no whole scale factor")
    dims = FluxDims(flux_type=p, height=H, width=W,
                    clip_vocab=_vocab_size(tokenizer) if tokenizer else 1, clip_dim=C,
                    clip_layers=_count(nets, "clip_block_"), clip_len=L,
                    t5_vocab=_vocab_size(tokenizer_2) if tokenizer_2 else 1, t5_dim=T,
                    t5_layers=_count(nets, "t5_block_"), t5_len=S,
                    inner_dim=D, head_dim=2 * rot[3], in_channels=cin, out_channels=cout,
                    num_double=_count(nets, f"{p}_trans_block_"), num_single=_count(nets, f"{p}_single_trans_block_"),
                    joint_attention_dim=J, pooled_projection_dim=P, guidance_embeds=guidance,
                    latent_channels=lc, vae_scale=H // lh, tiny_vae=bool(tiny_vae))
    if dims.image_tokens != N or dims.rotary_shape != rot:
        raise FluxcError(f"the transformer nets take {N} image tokens and a rotary table {list(rot)}, the VAE "
                         f"decodes {H}x{W} ({dims.image_tokens} tokens, table {list(dims.rotary_shape)}): "
                         "the files are not of one build")
    return dims


@dataclass
class Binding:
    """One net of an adopted build: fluxc's input/output names by position -> the net's own."""

    inputs: list[tuple[str, str]]  # (spec name, net's name)
    outputs: list[tuple[str, str]]  # (net's name, spec name)


def adopt_specs(nets: dict[str, NetInfo], dims, files: dict[str, str] | None = None):
    """fluxc's piece specs for DIMS with every dtype taken from the net, and the positional
    binding of each net. Checks every net the pipeline runs against the spec, position by
    position (count, shape; dtype: token ids float32 or int32, everything else float32)."""
    files = files or {}
    specs, binds = [], {}
    for s in piece_specs(dims):
        net = _net(nets, s.net_name, files.get(s.net_name, "the bmodels"))
        where = f"{files[s.net_name]}: net {s.net_name}" if s.net_name in files else f"net {s.net_name}"
        for kind, want, got in (("inputs", s.inputs, net.inputs), ("outputs", s.outputs, net.outputs)):
            if len(got) != len(want):
                raise FluxcError(f"{where} has {len(got)} {kind}, the reference's runtime binds {len(want)} "
                                 f"({', '.join(t.name for t in want)})")
            for i, (w, g) in enumerate(zip(want, got)):
                if tuple(g.shape) != tuple(w.shape):
                    raise FluxcError(f"{where} {kind[:-1]} {i} ({g.name}) has shape {list(g.shape)}, the other nets "
                                     f"of the build make it {list(w.shape)} ({w.name}); the files are not of one build")
        own = [t.name for t in net.inputs]
        if sorted(own) == sorted(t.name for t in s.inputs) and own != [t.name for t in s.inputs]:
            raise FluxcError(f"{where} takes its inputs in the order {', '.join(own)}; the reference's runtime "
                             f"feeds them by position as {', '.join(t.name for t in s.inputs)}")
        ins = []
        for i, (w, g) in enumerate(zip(s.inputs, net.inputs)):
            ok = ID_DTYPES if (s.name, i) in ID_INPUTS else ("float32",)
            if g.dtype not in ok:
                raise FluxcError(f"{where} input {i} ({g.name}) is {g.dtype}; this runtime feeds "
                                 f"{' or '.join(ok)} there")
            ins.append(TensorSpec(w.name, w.shape, g.dtype))
        outs = [TensorSpec(w.name, w.shape, g.dtype) for w, g in zip(s.outputs, net.outputs)]
        specs.append(PieceSpec(s.name, s.kind, s.index, tuple(ins), tuple(outs), dict(s.int_high)))
        binds[s.net_name] = Binding([(w.name, g.name) for w, g in zip(s.inputs, net.inputs)],
                                    [(g.name, w.name) for w, g in zip(s.outputs, net.outputs)])
    return specs, binds


class AdoptedEngine(Engine):
    """An opened reference bmodel seen under fluxc's piece names: its nets list the spec names
    (in the net's own order, with the net's shapes and dtypes) and `process` renames inputs and
    outputs by position. Anything else (the sail engine, device id, ...) is the inner engine's,
    so the sail runtime binds the net's own tensors positionally as the reference does."""

    def __init__(self, inner: Engine, binds: dict[str, Binding]):
        self.inner = inner
        self.path = inner.path
        self.binds = {n: b for n, b in binds.items() if n in inner.nets}
        self.nets = {}
        for n, ni in inner.nets.items():
            b = self.binds.get(n)
            if b is None:  # a net the pipeline does not run keeps its own names
                self.nets[n] = ni
                continue
            self.nets[n] = NetInfo(n, [TensorInfo(sn, t.shape, t.dtype) for (sn, _), t in zip(b.inputs, ni.inputs)],
                                   [TensorInfo(sn, t.shape, t.dtype) for (_, sn), t in zip(b.outputs, ni.outputs)])

    def __getattr__(self, name):  # engine, device_id, sail, sail_dtype, last_forward_s ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self.binds.get(net)
        if b is None:
            return self.inner.process(net, inputs)
        feed = {}
        for spec_name, own in b.inputs:
            if spec_name not in inputs:
                raise FluxcError(f"net {net}: input {spec_name!r} not given")
            feed[own] = inputs[spec_name]
        out = self.inner.process(net, feed)
        ren = dict(b.outputs)
        return {ren.get(k, k): v for k, v in out.items()}

    def close(self) -> None:
        self.inner.close()


# ------------------------------------------------------------------------------------------
# rotary table, scheduler, manifest


def read_rotary_files(candidates: list[Path]) -> list[tuple[Path, np.ndarray]]:
    """Every rotary table candidate (a pickled torch tensor) as a float32 array. Read before
    the (slow) bmodel loads, so a broken file fails fast."""
    try:
        import torch
    except ImportError:
        raise FluxcError(f"reading {candidates[0].name} (a pickled torch tensor) needs torch; "
                         "pip install torch (the CPU build is enough)") from None
    out = []
    for p in candidates:
        try:
            t = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable pickle is the same user error
            raise FluxcError(f"{p} is not a readable torch tensor file ({type(e).__name__}); download it again") from None
        if not isinstance(t, torch.Tensor):
            raise FluxcError(f"{p} holds a {type(t).__name__}, not the rotary table tensor; download it again")
        out.append((p, t.detach().to(torch.float32).numpy()))
    return out


def pick_rotary(tables: list[tuple[Path, np.ndarray]], shape: tuple[int, ...]) -> tuple[np.ndarray, Path]:
    """The first table with SHAPE's element count, as float32 SHAPE (the sample's export wrote
    the table 6-d or with an extra leading 1); one-line error otherwise."""
    n = int(np.prod(shape))
    for p, a in tables:
        if a.size == n:
            return np.ascontiguousarray(a.reshape(shape), dtype=np.float32), p
    seen = "; ".join(f"{p.name} {list(a.shape)}" for p, a in tables)
    raise FluxcError(f"the rotary table ({seen}) does not fit the transformer nets, which take {list(shape)}; "
                     "it belongs to another resolution or build")


def scheduler_config(flux_type: str) -> dict:
    """The published FLUX.1 scheduler config of a flux type (= the reference runtime's SCHEDULE_CONFIG)."""
    return dict(SCHEDULER_CONFIGS[flux_type])


@dataclass
class AdoptedManifest:
    """What the pipeline reads from an export's manifest, made from a download's files."""

    export_dir: Path  # the download folder
    dims: object
    specs: list
    tokenizer_dir: Path
    tokenizer_2_dir: Path
    rotary: np.ndarray
    rotary_source: Path
    scheduler_config: dict
    quantize: str
    files: list[Path] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    @property
    def rotary_path(self) -> Path:
        return self.rotary_source

    def spec(self, piece: str):
        for s in self.specs:
            if s.name == piece:
                return s
        raise FluxcError(f"piece {piece!r} is not in the adopted build")

    def describe(self) -> str:
        d = self.dims
        return (f"sophon-demo download {self.export_dir}: {d.flux_type} {self.quantize}"
                f"{' + tiny VAE' if d.tiny_vae else ''}, {d.width}x{d.height}, T5 {d.t5_len}; nets, shapes and "
                f"dtypes from the bmodels (token ids {self.spec('clip_head').inputs[0].dtype}), rotary table from "
                f"{self.rotary_source.name}, {d.flux_type} scheduler config")


def open_download(plan: DownloadPlan, backend: str, devices: list[int] | None = None, progress=None,
                  runtime_chip: str = "BM1684X"):
    """Open a download's bmodels on BACKEND and adopt them: (ModelSet whose engines present
    fluxc's piece names, AdoptedManifest). Nothing runs; engines are closed on any error."""
    if backend == "onnx":
        raise FluxcError(f"{plan.models} is a sophon-demo download (bmodels only); use --backend cmodel, "
                         "sail-sim or sail")
    devices = list(devices) if devices else list(range(plan.devices))
    if len(devices) < plan.devices:
        raise FluxcError(f"the {plan.quantize} transformer is split over {plan.devices} chips; "
                         f"give --devices with {plan.devices} ids")
    tables = read_rotary_files(plan.rotary_candidates)  # before the (slow) bmodel loads
    t0 = time.perf_counter()
    engines: list[Engine] = []
    try:
        for fam, path, dev in plan.files:
            engines.append(open_engine(backend, path, devices[min(dev, len(devices) - 1)], chip=runtime_chip))
            if progress:
                progress(path.name)
        nets, where = {}, {}
        for e in engines:
            for n, ni in e.nets.items():
                if n in nets:
                    raise FluxcError(f"net {n} is in both {where[n]} and {e.path.name}; not one sophon-demo build")
                nets[n], where[n] = ni, e.path.name
        dims = dims_from_nets(nets, plan.flux_type, plan.tiny_vae, plan.tokenizer, plan.tokenizer_2)
        specs, binds = adopt_specs(nets, dims, where)
        rotary, src = pick_rotary(tables, dims.rotary_shape)
        ms = ModelSet(backend)
        for e in engines:
            ms.add(AdoptedEngine(e, binds))
        ms.load_seconds = time.perf_counter() - t0
    except BaseException:
        for e in engines:
            e.close()
        raise
    man = AdoptedManifest(plan.models, dims, specs, plan.tokenizer, plan.tokenizer_2, rotary, src,
                          scheduler_config(plan.flux_type), plan.quantize, [p for _, p, _ in plan.files],
                          source={"kind": "sophon-demo", "dir": str(plan.models)})
    return ms, man


__all__ = ["looks_like_download", "plan_download", "open_download", "dims_from_nets", "adopt_specs",
           "AdoptedEngine", "AdoptedManifest", "read_rotary_files", "pick_rotary", "scheduler_config", "DownloadPlan"]
