"""Drop-in both ways with sophon-demo's FLUX.1 sample (issue 10, item 4).

- `fluxc run` takes bmodels laid out as the sample's download gives them (models/BM1684X/ with
  the reference's file names, ids_emb.pt, tokenizer/, tokenize_2/; no manifest, no build
  record): the tiny W4BF16 build, laid out so, gives the same image as its fluxc workspace on
  the chip simulator (cmodel) and on the sail stand-in (sail-sim).
- fluxc's bmodels follow the reference's runtime contract: its file names, and every net,
  read the way the reference's runtime reads it (by position), gives back fluxc's piece
  contract (names in order, shapes, dtypes).
- Bad input: an incomplete download or a folder that is neither gets a one-line error
  naming what is missing; several transformers need --flux-type / --quantize.
- The adoption logic on nets named as the reference's TorchScript / torch.onnx exports name
  them (input.1, onnx::Gather_0, ...) with float32 token ids: sizes from the shapes, token ids
  fed float32, names bound by position, a reordered or misshaped net refused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_runtime import RUNTIME_PROMPT, RUNTIME_SEED, RUNTIME_STEPS, RUNTIME_GUIDANCE, cli_main, invoke

# the reference's file names for a schnell W4BF16 build with the tiny VAE (sample/FLUX.1 README)
REFERENCE_FILES = {"clip.bmodel", "w4bf16_t5.bmodel", "schnell_w4bf16_transformer.bmodel",
                   "tiny_vae_decoder_bf16.bmodel"}


def _lay_out_download(root: Path, ws: Path, tokenizer_2: str = "tokenize_2", rotary: str = "ids_emb.pt") -> Path:
    """A sophon-demo download folder made of a fluxc build: bmodels copied under the reference's
    names (no .info.txt, no record, no manifest), the rotary table torch.save'd, tokenizers."""
    import torch

    models = root / "models"
    cd = models / "BM1684X"
    cd.mkdir(parents=True)
    rec = json.loads((ws / "BM1684X" / "fluxc_build.json").read_text())
    for f in rec["files"]:
        shutil.copyfile(ws / "BM1684X" / f["file"], cd / f["file"])
    torch.save(torch.from_numpy(np.load(ws / "onnx" / "rotary_emb.npy")), models / rotary)
    shutil.copytree(ws / "onnx" / "tokenizer", models / "tokenizer")
    shutil.copytree(ws / "onnx" / "tokenizer_2", models / tokenizer_2)
    return models


@pytest.fixture(scope="module")
def download(compiled_schnell_w4, tmp_path_factory) -> Path:
    return _lay_out_download(tmp_path_factory.mktemp("sophon_demo"), Path(compiled_schnell_w4))


def _run(models: Path, out: Path, backend: str) -> dict:
    from PIL import Image

    r = invoke(["run", "--models", str(models), "--backend", backend, "--prompt", RUNTIME_PROMPT,
                "--seed", str(RUNTIME_SEED), "--steps", str(RUNTIME_STEPS), "--guidance", str(RUNTIME_GUIDANCE),
                "--out", str(out / "result.png"), "--save-latents", str(out / "latents.npy")])
    assert r.exit_code == 0, (r.output, r.exception)
    return {"image": np.array(Image.open(out / "result.png").convert("RGB")),
            "latents": np.load(out / "latents.npy"), "output": r.output}


def _same(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    from fluxc.metrics import psnr

    same = np.array_equal(a, b)
    return same, float("inf") if same else float(psnr(a, b))


def test_fluxc_files_have_the_reference_names(compiled_schnell_w4):
    rec = json.loads((Path(compiled_schnell_w4) / "BM1684X" / "fluxc_build.json").read_text())
    files = {f["file"] for f in rec["files"]}
    # the reference has no VAE encoder: the session build's (image input, issue 19) is fluxc's own file
    assert files - REFERENCE_FILES == {"tiny_vae_encoder_bf16.bmodel"}
    assert files & REFERENCE_FILES == REFERENCE_FILES
    nets = {n for f in rec["files"] for n in f["nets"]}
    assert {"clip_head", "clip_tail", "t5_head", "t5_tail", "schnell_head", "schnell_tail", "vae_decoder",
            "schnell_trans_block_0", "schnell_single_trans_block_0"} <= nets


@pytest.mark.parametrize("backend", ["cmodel", "sail-sim"])
def test_download_layout_gives_the_workspace_image(backend, download, bmodel_run, tmp_path, record_property):
    """The download laid out from the tiny W4BF16 build: same image as the fluxc workspace."""
    if backend == "sail-sim":
        from fluxc.runtime import sail_sim

        sail_sim.reset()
    ws = bmodel_run("cmodel", "W4BF16")
    got = _run(download, tmp_path, backend)
    same, p = _same(got["image"], ws["image"])
    record_property("psnr_db", p)
    print(f"\n[measure] sophon-demo layout ({backend}) vs fluxc workspace (cmodel): bit-identical {same}, "
          f"PSNR {p} dB, latents max |diff| {np.abs(got['latents'] - ws['latents']).max():.3g}")
    print(got["output"])
    assert ws["image"].std() > 1.0
    assert same or p >= 60.0
    out = " ".join(got["output"].split())  # the console wraps long lines
    assert "sophon-demo download" in out and "schnell W4BF16 + tiny VAE" in out, out
    assert "token ids float32" in out and "rotary table from ids_emb.pt" in out, out
    if backend == "sail-sim":
        from fluxc.runtime import sail_sim

        chips = sail_sim.stats()
        assert list(chips) == [0]
        # the reference's W4BF16 set of device tensors (schnell: no guidance), as for the workspace
        assert chips[0].allocations == 15


def test_fluxc_nets_read_as_the_reference_reads_them(compiled_schnell_w4):
    """Every net of fluxc's build, bound by position the way the reference's runtime binds it,
    gives back exactly the piece contract of the export (names in order, shapes, dtypes)."""
    from fluxc.compile.parse import parse_info
    from fluxc.export.manifest import load_manifest
    from fluxc.runtime.device_memory import read_info
    from fluxc.runtime.engine import NetInfo, TensorInfo
    from fluxc.runtime.reference_layout import adopt_specs, dims_from_nets

    ws = Path(compiled_schnell_w4)
    man = load_manifest(ws / "onnx")
    nets = {}
    for f in sorted((ws / "BM1684X").glob("*.bmodel")):
        for n in parse_info(read_info(f)).nets:
            st = n.stages[0]
            nets[n.name] = NetInfo(n.name, [TensorInfo(t.name, tuple(t.shape), _np_dtype(t.dtype)) for t in st["inputs"]],
                                   [TensorInfo(t.name, tuple(t.shape), _np_dtype(t.dtype)) for t in st["outputs"]])
    d = dims_from_nets(nets, "schnell", True, man.tokenizer_dir, man.tokenizer_2_dir)
    for k in ("height", "width", "clip_len", "clip_dim", "clip_layers", "t5_len", "t5_dim", "t5_layers", "inner_dim",
              "head_dim", "in_channels", "out_channels", "num_double", "num_single", "joint_attention_dim",
              "pooled_projection_dim", "guidance_embeds", "latent_channels", "vae_scale", "tiny_vae"):
        assert getattr(d, k) == getattr(man.dims, k), k
    specs, binds = adopt_specs(nets, d)
    # the VAE encoder (fluxc's own piece) is not a net the reference's runtime reads
    want = {s.name: (s.inputs, s.outputs) for s in man.specs if s.family != "vae_encoder"}
    got = {s.name: (s.inputs, s.outputs) for s in specs}
    assert got == want
    # fluxc's token ids are float32, as the reference's runtime feeds them (docs/DESIGN.md "Token ids")
    assert [t.dtype for t in got["clip_head"][0]] == ["float32"]


def _np_dtype(mlir: str) -> str:
    return {"f32": "float32", "float32": "float32", "si32": "int32", "i32": "int32", "int32": "int32",
            "bf16": "bfloat16", "f16": "float16"}.get(mlir.lower(), mlir.lower())


# ---------------------------------------------------------------- bad input


def _error_line(res) -> str:
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text
    assert res.returncode == 2, text
    err = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, text
    return err[0]


def test_incomplete_download_one_line_error(download, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(download, models)
    (models / "BM1684X" / "w4bf16_t5.bmodel").unlink()
    (models / "ids_emb.pt").unlink()
    out = tmp_path / "x.png"
    err = _error_line(cli_main(["run", "--models", str(models), "--backend", "cmodel", "--steps", "1", "--out", str(out)]))
    assert "not a complete sophon-demo download" in err, err
    assert "BM1684X/w4bf16_t5.bmodel" in err and "ids_emb.pt" in err, err
    assert "clip.bmodel" not in err and "tokenizer/" not in err, err
    assert not out.exists()


def test_neither_workspace_nor_download(tmp_path):
    (tmp_path / "models").mkdir()
    err = _error_line(cli_main(["run", "--models", str(tmp_path / "models"), "--backend", "cmodel", "--steps", "1",
                                "--out", str(tmp_path / "x.png")]))
    assert "neither a fluxc workspace" in err and "onnx/manifest.json" in err and "sophon-demo download" in err, err


def _touch_download(root: Path, files: list[str], rotary: str | None = "ids_emb.pt",
                    tok2: str | None = "tokenizer_2") -> Path:
    cd = root / "BM1684X"
    cd.mkdir(parents=True)
    for f in files:
        (cd / f).write_bytes(b"")
    if rotary:
        (root / rotary).write_bytes(b"")
    (root / "tokenizer").mkdir()
    if tok2:
        (root / tok2).mkdir()
    return root


def test_plan_chooses_files_and_refuses_ambiguity(tmp_path):
    """File choice in a download holding several builds (no file is opened here)."""
    from fluxc.errors import FluxcError
    from fluxc.runtime.reference_layout import looks_like_download, plan_download

    base = ["clip.bmodel", "w4bf16_t5.bmodel", "tiny_vae_decoder_bf16.bmodel", "vae_decoder_bf16.bmodel"]
    bf16 = [f"dev_bf16_transformer_on_device{i}.bmodel" for i in range(3)]
    m = _touch_download(tmp_path / "a", base + ["schnell_w4bf16_transformer.bmodel", "dev_w4bf16_transformer.bmodel"]
                        + bf16, tok2="tokenize_2")
    assert looks_like_download(m)
    with pytest.raises(FluxcError, match="several transformers.*--flux-type and --quantize"):
        plan_download(m)
    p = plan_download(m, flux_type="schnell")
    assert (p.flux_type, p.quantize, p.tiny_vae, p.devices) == ("schnell", "W4BF16", True, 1)
    assert [f.name for _, f, _ in p.files] == ["clip.bmodel", "w4bf16_t5.bmodel", "schnell_w4bf16_transformer.bmodel",
                                               "tiny_vae_decoder_bf16.bmodel"]
    assert p.tokenizer_2.name == "tokenize_2"  # the README's spelling is accepted
    # the BF16 split: three chips, T5 on the last, the full VAE by default (both present)
    p = plan_download(m, flux_type="dev", quantize="BF16")
    assert p.devices == 3 and not p.tiny_vae
    assert [(fam, f.name, dev) for fam, f, dev in p.files] == [
        ("clip", "clip.bmodel", 0), ("t5", "w4bf16_t5.bmodel", 2),
        ("transformer", bf16[0], 0), ("transformer", bf16[1], 1), ("transformer", bf16[2], 2),
        ("vae", "vae_decoder_bf16.bmodel", 0)]
    assert plan_download(m, flux_type="dev", quantize="BF16", tiny_vae=True).tiny_vae
    # a partial BF16 set names the missing part
    m2 = _touch_download(tmp_path / "b", base + bf16[:2], rotary="ids_emb_1024.pt")
    with pytest.raises(FluxcError, match=r"missing BM1684X/dev_bf16_transformer_on_device2.bmodel;"):
        plan_download(m2)
    # asked for what is not there
    with pytest.raises(FluxcError, match=r"missing BM1684X/schnell_w4bf16_transformer.bmodel;"):
        plan_download(m2, flux_type="schnell", quantize="W4BF16")
    m3 = _touch_download(tmp_path / "c", ["clip.bmodel"], rotary=None, tok2=None)
    with pytest.raises(FluxcError) as e:
        plan_download(m3)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("w4bf16_t5.bmodel", "transformer", "vae_decoder_bf16.bmodel", "ids_emb.pt", "tokenizer_2/"):
        assert part in msg, msg


# ---------------------------------------------------------------- the adoption logic on reference-named nets


def _reference_nets(dev: bool = False, ids_dtype: str = "float32", L=7, C=8, S=6, T=10, N=16, D=12, hd=4,
                    lat=(4, 8, 8), H=64):
    """Nets shaped and named as the reference's exports name them (TorchScript / torch.onnx
    defaults), with float32 token ids as its runtime feeds them."""
    from fluxc.runtime.engine import NetInfo, TensorInfo

    def net(name, ins, outs):
        return NetInfo(name, [TensorInfo(f"input.{i}", s, dt) for i, (s, dt) in enumerate(ins)],
                       [TensorInfo(f"{100 + i}", s, "float32") for i, s in enumerate(outs)])

    f = "float32"
    p = "dev" if dev else "schnell"
    J = S + N
    rot = (1, J, 1, hd // 2, 2, 2)
    nets = [net("clip_head", [((1, L), ids_dtype)], [(1, L, C)]),
            net("clip_block_0", [((1, L, C), f)], [(1, L, C)]),
            net("clip_tail", [((1, L, C), f), ((1, L), ids_dtype)], [(1, C)]),
            net("t5_head", [((1, S), ids_dtype)], [(1, S, T)]),
            net("t5_block_0", [((1, S, T), f)], [(1, S, T)]), net("t5_block_1", [((1, S, T), f)], [(1, S, T)]),
            net("t5_tail", [((1, S, T), f)], [(1, S, T)]),
            net(f"{p}_head", [((1, N, 64), f), ((1,), f)] + ([((1,), f)] if dev else []) + [((1, C), f), ((1, S, T), f)],
                [(1, D), (1, S, D), (1, N, D)]),
            net(f"{p}_trans_block_0", [((1, N, D), f), ((1, S, D), f), ((1, D), f), (rot, f)], [(1, S, D), (1, N, D)]),
            net(f"{p}_single_trans_block_0", [((1, J, D), f), ((1, D), f), (rot, f)], [(1, J, D)]),
            net(f"{p}_single_trans_block_1", [((1, J, D), f), ((1, D), f), (rot, f)], [(1, J, D)]),
            net(f"{p}_tail", [((1, N, D), f), ((1, D), f)], [(1, N, 64)]),
            net("vae_decoder", [((1, *lat), f)], [(1, 3, H, H)])]
    return {n.name: n for n in nets}


def test_sizes_and_dtypes_from_reference_named_nets():
    from fluxc.runtime.reference_layout import adopt_specs, dims_from_nets

    nets = _reference_nets(dev=True)
    d = dims_from_nets(nets, "dev", False)
    assert (d.height, d.width, d.clip_len, d.clip_dim, d.clip_layers, d.t5_len, d.t5_dim, d.t5_layers) == \
        (64, 64, 7, 8, 1, 6, 10, 2)
    assert (d.inner_dim, d.head_dim, d.num_double, d.num_single, d.guidance_embeds, d.vae_scale, d.image_tokens) == \
        (12, 4, 1, 2, True, 8, 16)
    specs, binds = adopt_specs(nets, d)
    by = {s.name: s for s in specs}
    # token ids in the dtype the net declares (the reference's: float32), everything else float32
    assert by["clip_head"].inputs[0].dtype == "float32" and by["t5_head"].inputs[0].dtype == "float32"
    assert by["clip_tail"].inputs[1].dtype == "float32"
    # fluxc's names bound to the net's own by position
    assert binds["dev_head"].inputs == [("hidden_states", "input.0"), ("timestep", "input.1"), ("guidance", "input.2"),
                                        ("pooled_projections", "input.3"), ("encoder_hidden_states", "input.4")]
    assert binds["dev_head"].outputs == [("100", "temb"), ("101", "encoder_hidden_states_out"),
                                         ("102", "hidden_states_out")]
    # a schnell head with a guidance input is not a schnell build
    from fluxc.errors import FluxcError

    with pytest.raises(FluxcError, match="schnell_head has 5 inputs"):
        dims_from_nets({k.replace("dev_", "schnell_"): v for k, v in nets.items()}, "schnell", False)


def test_adopted_engine_feeds_by_position_in_the_nets_dtype():
    """The pipeline's call (fluxc names, int32 ids from the tokenizer) reaches the net under its
    own names, ids cast to the dtype the net declares."""
    from fluxc.runtime.engine import Engine
    from fluxc.runtime.models import ModelSet
    from fluxc.runtime.pipeline import FluxPipeline
    from fluxc.runtime.reference_layout import AdoptedEngine, adopt_specs, dims_from_nets

    nets = _reference_nets()
    fed = {}

    class Recorder(Engine):  # stands for an opened bmodel: records what it is fed
        path = Path("clip.bmodel")

        def __init__(self):
            self.nets = {n: nets[n] for n in ("clip_head", "clip_block_0", "clip_tail")}

        def process(self, net, inputs):
            fed[net] = {k: (v.dtype.name, v.shape) for k, v in inputs.items()}
            return {t.name: np.zeros(t.shape, np.float32) for t in self.nets[net].outputs}

    d = dims_from_nets(nets, "schnell", False)
    specs, binds = adopt_specs(nets, d)
    ms = ModelSet("test")
    eng = AdoptedEngine(Recorder(), binds)
    ms.add(eng)
    assert [t.name for t in eng.nets["clip_tail"].inputs] == ["hidden_states", "input_ids"]
    pipe = FluxPipeline.__new__(FluxPipeline)
    pipe.m, pipe.specs = ms, {s.name: s for s in specs}
    ids = np.arange(7, dtype=np.int32)[None]
    (h,) = pipe.run("clip_head", input_ids=ids)
    (pooled,) = pipe.run("clip_tail", hidden_states=h, input_ids=ids)
    assert fed["clip_head"] == {"input.0": ("float32", (1, 7))}
    assert fed["clip_tail"] == {"input.0": ("float32", (1, 7, 8)), "input.1": ("float32", (1, 7))}
    assert pooled.shape == (1, 8)


def test_adoption_refuses_what_does_not_fit():
    from fluxc.errors import FluxcError
    from fluxc.runtime.engine import NetInfo, TensorInfo
    from fluxc.runtime.reference_layout import adopt_specs, dims_from_nets

    nets = _reference_nets()
    d = dims_from_nets(nets, "schnell", False)
    # a block whose inputs carry fluxc's names in another order: a positional bind would swap them
    b = nets["schnell_trans_block_0"]
    names = ["encoder_hidden_states", "hidden_states", "temb", "rotary_emb"]
    sw = dict(nets, schnell_trans_block_0=NetInfo(b.name, [TensorInfo(n, t.shape, t.dtype)
                                                          for n, t in zip(names, b.inputs)], b.outputs))
    with pytest.raises(FluxcError, match="feeds them by position"):
        adopt_specs(sw, d)
    # a single block of another size
    s1 = nets["schnell_single_trans_block_1"]
    bad = dict(nets, schnell_single_trans_block_1=NetInfo(s1.name, [TensorInfo("input.0", (1, 23, 12), "float32")]
                                                          + s1.inputs[1:], s1.outputs))
    with pytest.raises(FluxcError, match=r"schnell_single_trans_block_1 input 0 .* has shape \[1, 23, 12\]"):
        adopt_specs(bad, d)
    # bf16 I/O where the runtime feeds float32
    t = nets["t5_tail"]
    bf = dict(nets, t5_tail=NetInfo(t.name, [TensorInfo("x", t.inputs[0].shape, "bfloat16")], t.outputs))
    with pytest.raises(FluxcError, match="t5_tail input 0 .* is bfloat16; this runtime feeds float32"):
        adopt_specs(bf, d)
    # the sample's gen_bmodel.sh names the tiny VAE net tiny_vae_decoder: its runtime cannot open it
    v = dict(nets)
    v["tiny_vae_decoder"] = v.pop("vae_decoder")
    with pytest.raises(FluxcError, match="opens 'vae_decoder'"):
        dims_from_nets(v, "schnell", True)


def test_rotary_table_from_ids_emb(tmp_path):
    import torch

    from fluxc.errors import FluxcError
    from fluxc.runtime.reference_layout import pick_rotary, read_rotary_files

    a = np.random.default_rng(0).standard_normal((1, 1, 22, 1, 2, 2, 2)).astype(np.float32)  # 7-d, as the sample's dev export
    torch.save(torch.from_numpy(a), tmp_path / "ids_emb.pt")
    (tmp_path / "ids_emb_1024.pt").write_bytes(b"not a pickle")
    tabs = read_rotary_files([tmp_path / "ids_emb.pt"])
    r, src = pick_rotary(tabs, (1, 22, 1, 2, 2, 2))
    assert src.name == "ids_emb.pt" and r.shape == (1, 22, 1, 2, 2, 2) and np.array_equal(r.reshape(-1), a.reshape(-1))
    with pytest.raises(FluxcError, match=r"does not fit the transformer nets, which take \[1, 30, 1, 2, 2, 2\]"):
        pick_rotary(tabs, (1, 30, 1, 2, 2, 2))
    with pytest.raises(FluxcError, match="ids_emb_1024.pt is not a readable torch tensor file"):
        read_rotary_files([tmp_path / "ids_emb_1024.pt"])
