"""Checkpoints as users have them: the Hub's sharded layout, a Hugging Face cache folder, and
broken downloads (missing shard, corrupt index), plus out-of-range export options.

The sharded tiny checkpoint (tests/fixtures_tiny.py) holds the same tensors as `tiny_schnell`;
one `fluxc export` of it through a Hub id (offline, from a cache folder in the real
models--ORG--NAME layout) must give exactly the ONNX files of the unsharded export fixture.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixtures_export import EXPORT_ARGS

HUB_ID = "fluxc-test/FLUX.1-tiny-sharded"
COMMIT = "3f1c0ffee0123456789abcdef0123456789abcde"


# ----------------------------------------------------------------------------- helpers
def fluxc_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process (huggingface_hub reads its env at import)."""
    full_env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fluxc.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode != 0, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    print(lines[0])
    return lines[0]


def fill_hub_cache(cache: Path, repo_id: str, model: Path, commit: str = COMMIT) -> Path:
    """Put `model` into a Hugging Face cache folder as huggingface_hub lays it out:
    models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(model.rglob("*")):
        if not f.is_file():
            continue
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / h
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def hub_env(cache: Path, home: Path, offline: bool = True, endpoint: str | None = None) -> dict[str, str]:
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0"}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


# ----------------------------------------------------------------------------- sharded layout
def test_sharded_tiny_has_the_hub_layout(tiny_schnell_sharded: Path, tiny_schnell: Path) -> None:
    from safetensors import safe_open

    for comp, stem, n in (("transformer", "diffusion_pytorch_model", 3), ("text_encoder_2", "model", 2)):
        folder = tiny_schnell_sharded / comp
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        assert names == [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((folder / f"{stem}.safetensors.index.json").read_text())
        wm = index["weight_map"]
        assert sorted(set(wm.values())) == names  # every shard used
        whole = tiny_schnell / comp / f"{stem}.safetensors"
        with safe_open(str(whole), "pt") as ref:
            assert sorted(wm) == sorted(ref.keys())
            total = 0
            for name in names:
                with safe_open(str(folder / name), "pt") as sh:
                    assert sorted(sh.keys()) == sorted(k for k, v in wm.items() if v == name)
                    for k in sh.keys():
                        t = sh.get_tensor(k)
                        assert t.equal(ref.get_tensor(k)), k
                        total += t.numel() * t.element_size()
        assert index["metadata"]["total_size"] == total
    # the other components and configs are byte-identical
    for comp in ("text_encoder", "vae", "tiny_vae", "scheduler", "tokenizer", "tokenizer_2"):
        assert files_of(tiny_schnell_sharded / comp) == files_of(tiny_schnell / comp), comp


def test_diffusers_loads_the_sharded_tiny(tiny_schnell_sharded: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_schnell_sharded / "transformer")
    t5 = T5EncoderModel.from_pretrained(tiny_schnell_sharded / "text_encoder_2")
    assert tr.config.num_layers == 3 and t5.config.num_layers == 2


# ----------------------------------------------------------------------------- Hub cache path
@pytest.fixture(scope="module")
def hub_export(tiny_schnell_sharded: Path, tmp_path_factory: pytest.TempPathFactory):
    """`fluxc export fluxc-test/FLUX.1-tiny-sharded` offline from a filled cache folder."""
    root = tmp_path_factory.mktemp("hub")
    snap = fill_hub_cache(root / "cache", HUB_ID, tiny_schnell_sharded)
    out = root / "onnx"
    res = fluxc_cli(["export", HUB_ID, "--out", str(out), *EXPORT_ARGS, "--tiny-vae", str(snap / "tiny_vae"),
                     "--image-input"],  # as export_schnell_tinyvae
                    env=hub_env(root / "cache", root / "home"))
    return res, out, snap


def test_hub_id_exports_offline_from_the_cache(hub_export) -> None:
    res, out, snap = hub_export
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True
    assert m["source"]["model"] == HUB_ID and m["source"]["kind"] == "hub"
    assert m["source"]["revision"] == COMMIT
    assert m["source"]["path"] is None  # a Hub export is tied to its id and commit, not the cache path
    assert (snap / "transformer" / "diffusion_pytorch_model-00003-of-00003.safetensors").is_symlink()


def _onnx_with_inline_weights(path: Path):
    """The ONNX model with every external-data initializer replaced by its bytes (so two
    exports referencing different files - shards vs one file - compare by content)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in init.external_data}
            with open(path.parent / ext["location"], "rb") as f:
                f.seek(int(ext.get("offset", 0)))
                raw = f.read(int(ext["length"]))
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = raw
    return model


def test_sharded_checkpoint_exports_the_same_onnx(hub_export, export_schnell_tinyvae: Path) -> None:
    """Same tensors in 3 + 2 shards -> the same ONNX pieces: identical graphs, identical weight
    bytes (wherever they are stored), the same weights hash, and identical outputs."""
    import numpy as np

    from fluxc.export.manifest import load_manifest
    from tests.parity import run_onnx

    res, out, _ = hub_export
    assert res.returncode == 0, res.stderr[-3000:]
    ma, mb = load_manifest(out), load_manifest(export_schnell_tinyvae)
    assert [s.to_dict() for s in ma.specs] == [s.to_dict() for s in mb.specs]
    ra = {p["name"]: p for p in json.loads((out / "manifest.json").read_text())["pieces"]}
    rb = {p["name"]: p for p in json.loads((export_schnell_tinyvae / "manifest.json").read_text())["pieces"]}
    assert sorted(ra) == sorted(rb) and len(ra) >= 10
    for name in ra:
        if "weights_sha256" in rb[name]:
            assert ra[name]["weights_sha256"] == rb[name]["weights_sha256"], name
        ga = _onnx_with_inline_weights(ma.path(name))
        gb = _onnx_with_inline_weights(mb.path(name))
        assert ga.graph.SerializeToString() == gb.graph.SerializeToString(), name
    # the shards really are read: the sharded export's weights come from several files
    import onnx

    located: set[str] = set()
    for name in ra:
        for init in onnx.load(str(ma.path(name)), load_external_data=False).graph.initializer:
            located |= {e.value for e in init.external_data if e.key == "location"}
    if located:  # exports that reference checkpoint tensors in place
        assert any("-00002-of-00003" in loc for loc in located), sorted(located)
        assert any("model-00002-of-00002" in loc for loc in located), sorted(located)
    # identical outputs on each piece's sample inputs
    for spec in ma.specs:
        inputs = spec.sample_inputs(0)
        oa, ob = run_onnx(ma.path(spec.name), spec, inputs), run_onnx(mb.path(spec.name), spec, inputs)
        for x, y in zip(oa, ob):
            np.testing.assert_array_equal(x, y, err_msg=spec.name)
    # side files (tokenizers, rotary table, configs) are byte-identical
    side = lambda d: {k: v for k, v in files_of(d).items() if not k.endswith(".onnx") and not k.startswith("weights/")
                      and "probe" not in k}
    assert side(out) == side(export_schnell_tinyvae)


# ----------------------------------------------------------------------------- Hub errors
class _FakeHub(BaseHTTPRequestHandler):
    """Answers like huggingface.co for a gated repo (401 + X-Error-Code: GatedRepo) and an
    unknown one (404 + X-Error-Code: RepoNotFound); no network is involved."""

    def _answer(self) -> None:
        if "/fluxc-test/gated" in self.path:
            code, err, msg = 401, "GatedRepo", "Access to model fluxc-test/gated is restricted."
        else:
            code, err, msg = 404, "RepoNotFound", "Repository not found"
        body = json.dumps({"error": msg}).encode()
        self.send_response(code)
        self.send_header("X-Error-Code", err)
        self.send_header("X-Error-Message", msg)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_errors_are_one_line(tmp_path: Path, fake_hub: str) -> None:
    out = ["--out", str(tmp_path / "onnx"), *EXPORT_ARGS]
    cache, home = tmp_path / "cache", tmp_path / "home"
    cache.mkdir()
    # offline, not in the cache
    res = fluxc_cli(["export", "fluxc-test/not-cached", *out], env=hub_env(cache, home))
    assert_one_line_error(res, "fluxc-test/not-cached", "not in the local Hugging Face cache", "HF_HUB_OFFLINE",
                          str(cache), "local diffusers folder")
    # online (against a local stand-in for the Hub): gated, and unknown
    res = fluxc_cli(["export", "fluxc-test/gated", *out], env=hub_env(cache, home, offline=False, endpoint=fake_hub))
    assert_one_line_error(res, "fluxc-test/gated", "gated", "hf auth login")
    res = fluxc_cli(["export", "fluxc-test/no-such-model", *out],
                    env=hub_env(cache, home, offline=False, endpoint=fake_hub))
    assert_one_line_error(res, "fluxc-test/no-such-model", "neither a local folder nor a Hugging Face Hub repository")
    assert not (tmp_path / "onnx" / "manifest.json").exists()


# ----------------------------------------------------------------------------- broken checkpoints
@pytest.fixture
def sharded_copy(tiny_schnell_sharded: Path, tmp_path: Path):
    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(tiny_schnell_sharded, dst)
        return dst
    return make


def _export_local(model: Path, out: Path) -> subprocess.CompletedProcess:
    return fluxc_cli(["export", str(model), "--out", str(out), "--height", "64", "--width", "64",
                      "--t5-seq-len", "8"], env={"HF_HUB_OFFLINE": "1"})


def test_broken_sharded_checkpoints_give_one_line_errors(sharded_copy, tmp_path: Path) -> None:
    tr = "transformer"
    idx_name = "diffusion_pytorch_model.safetensors.index.json"

    m = sharded_copy("missing_shard")
    (m / tr / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    res = _export_local(m, tmp_path / "o1")
    assert_one_line_error(res, "diffusion_pytorch_model-00002-of-00003.safetensors", "missing", idx_name)

    m = sharded_copy("bad_json")
    (m / "text_encoder_2" / "model.safetensors.index.json").write_text('{"weight_map": {"shared.weight": ')
    res = _export_local(m, tmp_path / "o2")
    assert_one_line_error(res, "model.safetensors.index.json", "text_encoder_2")

    m = sharded_copy("wrong_shard")
    idx_path = m / tr / idx_name
    idx = json.loads(idx_path.read_text())
    key = next(k for k, v in idx["weight_map"].items() if v.endswith("00001-of-00003.safetensors"))
    idx["weight_map"][key] = "diffusion_pytorch_model-00003-of-00003.safetensors"
    idx_path.write_text(json.dumps(idx))
    res = _export_local(m, tmp_path / "o3")
    assert_one_line_error(res, key, "diffusion_pytorch_model-00003-of-00003.safetensors", "corrupt")

    m = sharded_copy("no_map")
    (m / tr / idx_name).write_text('{"metadata": {}}')
    res = _export_local(m, tmp_path / "o4")
    assert_one_line_error(res, idx_name, "weight_map")
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o / "manifest.json").exists()


@pytest.mark.parametrize("length", ["513", "0"])
def test_t5_seq_len_out_of_range(tiny_schnell: Path, tmp_path: Path, length: str) -> None:
    res = fluxc_cli(["export", str(tiny_schnell), "--out", str(tmp_path / "o"), "--height", "64", "--width", "64",
                     f"--t5-seq-len={length}"], env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert_one_line_error(res, f"--t5-seq-len {length}", "512")
    assert not (tmp_path / "o").exists()
