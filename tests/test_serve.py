"""`fluxc serve` as users meet it: the real command in a subprocess on the suite's tiny builds
(onnx on the export fixture, sail-sim on the compiled W4BF16 build), driven over HTTP and in
Debian's headless Chromium. Images are checked bit for bit against `fluxc run --out`.

One server per backend for the module (loading is the expensive part); the SIGTERM test is
last and ends the sail-sim server itself.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_runtime import RUNTIME_PROMPT, RUNTIME_SEED, RUNTIME_STEPS, invoke

REPO = Path(__file__).resolve().parents[1]
SIZE = "128x128"  # the export fixture's size (fixtures_export.py)
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fluxc serve` in a subprocess, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.api_key = api_key
        full = dict(os.environ, COLUMNS="160", **(env or {}))
        self.out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "fluxc.cli", "serve", "--port", str(self.port), *args],
                                     cwd=REPO, env=full, stdout=self.out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, key: str | None | bool = True,
                timeout: float = 600) -> tuple[int, dict]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        k = self.api_key if key is True else key
        if k:
            req.add_header("Authorization", f"Bearer {k}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self, timeout: float = 900) -> None:
        t0 = time.time()
        seen = set()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"fluxc serve exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            try:
                code, doc = self.request("GET", "/health", timeout=5)
                seen.add(doc.get("status"))
                if doc.get("status") == "ready":
                    self.statuses = seen
                    return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.2)
        raise AssertionError(f"fluxc serve not ready in {timeout} s:\n{self.text()[-3000:]}")

    def edit(self, fields: dict, image: bytes | None, path: str = "/v1/images/edits", name: str = "in.png",
             key: str | None | bool = True) -> tuple[int, dict]:
        """OpenAI's edit form: multipart/form-data with the image file and text fields."""
        boundary = "fluxc-test-boundary-7f3a"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        if image is not None:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                         f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + path, data=body, method="POST")
        req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
        k = self.api_key if key is True else key
        if k:
            req.add_header("Authorization", f"Bearer {k}")
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def generate(self, **fields) -> tuple[int, dict]:
        return self.request("POST", "/v1/images/generations", fields)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def png_of(doc: dict, k: int = 0) -> bytes:
    return base64.b64decode(doc["data"][k]["b64_json"])


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(png)).convert("RGB"))


def run_png(res: dict) -> bytes:
    """The PNG file `fluxc run --out` wrote for a fixtures_runtime result (its path is the last line)."""
    path = next(Path(m) for m in reversed(re.findall(r"(\S+result\.png)", res["output"])))
    return path.read_bytes()


REQ = dict(prompt=RUNTIME_PROMPT, seed=RUNTIME_SEED, steps=RUNTIME_STEPS, size=SIZE, response_format="b64_json")
STRENGTH = 0.5  # with 2 steps: 1 step runs, from the image noised at the second sigma (at 1.0 the image would not show)


def input_png(path: Path) -> Path:
    """An input image for img2img (a gradient and a disc, 96x80: the build's 128x128 needs a resize)."""
    from PIL import Image

    y, x = np.mgrid[0:80, 0:96].astype(np.float32)
    rgb = np.stack([255 * x / 95, 255 * y / 79, np.where((x - 48) ** 2 + (y - 40) ** 2 < 600, 230.0, 30.0)], -1)
    Image.fromarray(rgb.round().astype(np.uint8), "RGB").save(path)
    return path


def run_img2img(ws: Path, backend: str, image: Path, out: Path, *extra: str) -> bytes:
    """`fluxc run --image --strength` (the command users run) -> the PNG bytes it wrote."""
    r = invoke(["run", "--models", str(ws), "--backend", backend, "--prompt", RUNTIME_PROMPT, "--seed",
                str(RUNTIME_SEED), "--steps", str(RUNTIME_STEPS), "--image", str(image), "--strength", str(STRENGTH),
                "--out", str(out), *extra])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "img2img from" in r.output, r.output
    return out.read_bytes()


@pytest.fixture(scope="module")
def onnx_server(onnx_workspace_schnell, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_onnx") / "serve.log"
    # the API key from the environment (FLUXC_API_KEY), as a deployment would set it
    s = Server(["--models", str(onnx_workspace_schnell), "--backend", "onnx", "--queue-size", "4"], log,
               env={"FLUXC_API_KEY": "test-key-1"}, api_key="test-key-1")
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sail_server(compiled_schnell_w4, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_sail") / "serve.log"
    s = Server(["--models", str(compiled_schnell_w4), "--backend", "sail-sim", "--queue-size", "2"], log)
    s.wait_ready()
    yield s
    s.stop()


# ---------------- onnx ----------------

def test_onnx_start_health_models_and_bit_identical(onnx_server, onnx_run):
    s = onnx_server
    out = s.text()
    assert "on 127.0.0.1 only" in out and "loading models (onnx)" in out
    assert "ready" in s.statuses
    code, doc = s.request("GET", "/v1/models")
    assert code == 200, doc
    m = doc["data"][0]
    assert (m["flux_type"], m["backend"], m["sizes"], m["default_steps"]) == ("schnell", "onnx", [SIZE], 4)
    code, doc = s.generate(**REQ)
    assert code == 200, doc
    assert doc["data"][0]["seed"] == RUNTIME_SEED and isinstance(doc["created"], int)
    ref = onnx_run("schnell")
    assert np.array_equal(pixels(png_of(doc)), ref["image"])
    assert png_of(doc) == run_png(ref)  # the same PNG file as fluxc run --out


def test_onnx_three_clients_and_seed_plus_k(onnx_server):
    s = onnx_server
    asks = [dict(REQ, prompt=p, seed=sd) for p, sd in
            (("a red fox in the snow", 1), ("a lighthouse at night", 2), ("a bowl of ramen", 3))]
    alone = []
    for a in asks:
        code, doc = s.generate(**a)
        assert code == 200, doc
        alone.append(png_of(doc))
    assert len(set(alone)) == 3  # different prompts and seeds give different images
    results: list = [None] * 3

    def client(i):
        results[i] = s.generate(**asks[i])

    ts = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i, (code, doc) in enumerate(results):
        assert code == 200, doc
        assert png_of(doc) == alone[i], f"client {i} got another image than alone"
    # n=2: image k uses seed + k
    code, doc = s.generate(**dict(asks[0], n=2))
    assert code == 200, doc
    assert [d["seed"] for d in doc["data"]] == [1, 2]
    assert png_of(doc, 0) == alone[0]
    code, doc1 = s.generate(**dict(asks[0], seed=2))
    assert png_of(doc, 1) == png_of(doc1)


BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"n": 1}, "prompt"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 101}, "steps"),
    ({"prompt": "x", "size": "1024x1024"}, "size"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
]


def test_onnx_bad_input_400_then_healthy(onnx_server):
    s = onnx_server
    for body, field in BAD:
        code, doc = s.request("POST", "/v1/images/generations", body)
        assert code == 400, (body, doc)
        assert doc["error"]["param"] == field and field in doc["error"]["message"], (body, doc)
    code, doc = s.request("POST", "/v1/images/generations", {"prompt": "x", "size": "64x64"})
    assert SIZE in doc["error"]["message"]  # the sizes the build has are listed
    code, doc = s.request("POST", "/v1/images/generations", raw=b'{"prompt": "x", ')
    assert code == 400 and doc["error"]["param"] == "body" and "JSON" in doc["error"]["message"]
    code, doc = s.request("POST", "/v1/images/generations", raw=json.dumps({"prompt": "x" * (1 << 20)}).encode())
    assert code == 400 and doc["error"]["param"] == "body" and "limit" in doc["error"]["message"]
    code, doc = s.request("POST", "/v1/images/jobs", {"prompt": "x", "steps": 500})
    assert code == 400 and doc["error"]["param"] == "steps"
    assert s.request("GET", "/health") == (200, {"status": "ready", "queue": 0, "running": 0})
    code, doc = s.generate(**dict(REQ, steps=1))
    assert code == 200, doc


def test_onnx_api_key(onnx_server):
    s = onnx_server
    for key in (None, "wrong"):
        code, doc = s.request("POST", "/v1/images/generations", REQ, key=key)
        assert code == 401 and doc["error"]["type"] == "authentication_error", doc
        assert s.request("GET", "/v1/models", key=key)[0] == 401
        assert s.request("GET", "/v1/images/jobs/job-x", key=key)[0] == 401
    assert s.request("GET", "/health", key=None)[0] == 200  # health stays open for probes
    assert s.request("GET", "/v1/models")[0] == 200


def test_onnx_jobs(onnx_server):
    s = onnx_server
    code, job = s.request("POST", "/v1/images/jobs", REQ)
    assert code == 202 and job["status"] in ("queued", "generating") and job["id"].startswith("job-"), job
    t0 = time.time()
    while job["status"] not in ("completed", "failed", "cancelled") and time.time() - t0 < 300:
        time.sleep(0.1)
        code, job = s.request("GET", f"/v1/images/jobs/{job['id']}")
    assert job["status"] == "completed", job
    code, direct = s.generate(**REQ)
    assert base64.b64decode(job["data"][0]["b64_json"]) == png_of(direct)
    assert s.request("GET", "/v1/images/jobs/job-nope")[0] == 404


def test_onnx_edits_img2img(onnx_server, onnx_workspace_schnell, tmp_path):
    """POST /v1/images/edits (OpenAI's multipart form) on an image-input build: img2img, bit-identical
    to `fluxc run --image --strength`; as a job too; every bad field a 400 naming it; still healthy."""
    s = onnx_server
    src = input_png(tmp_path / "in.png")
    want = run_img2img(onnx_workspace_schnell, "onnx", src, tmp_path / "run.png")
    fields = {k: str(v) for k, v in REQ.items()} | {"strength": str(STRENGTH)}
    code, doc = s.edit(fields, src.read_bytes())
    assert code == 200, doc
    assert png_of(doc) == want  # the same PNG as fluxc run --image --strength --out
    code, gen = s.generate(**REQ)
    assert png_of(gen) != want  # the image went in: text to image differs
    code, job = s.edit(fields, src.read_bytes(), path="/v1/images/jobs")
    assert code == 202, job
    assert job["request"]["strength"] == STRENGTH and job["request"]["image"] == "96x80 upload", job
    st = wait_job(s, job["id"], lambda st: st["status"] in ("completed", "failed", "cancelled"), timeout=300)
    assert st["status"] == "completed" and base64.b64decode(st["data"][0]["b64_json"]) == want, st
    from PIL import Image

    big = io.BytesIO()
    Image.new("RGB", (4097, 8)).save(big, "PNG")
    bad = [
        (fields, None, "image"),
        (fields, b"not an image at all", "image"),
        (fields, big.getvalue(), "image"),
        (fields | {"strength": "1.5"}, src.read_bytes(), "strength"),
        (fields | {"strength": "0"}, src.read_bytes(), "strength"),
        (fields | {"mask": "x"}, src.read_bytes(), "mask"),
        (fields | {"steps": "many"}, src.read_bytes(), "steps"),
        (fields | {"prompt": ""}, src.read_bytes(), "prompt"),
        (fields | {"size": "64x64"}, src.read_bytes(), "size"),
    ]
    for f, img, field in bad:
        code, doc = s.edit(f, img)
        assert code == 400 and doc["error"]["param"] == field and field in doc["error"]["message"], (field, doc)
    code, doc = s.request("POST", "/v1/images/edits", REQ)  # JSON where the form is expected
    assert code == 400 and doc["error"]["param"] == "body" and "multipart" in doc["error"]["message"], doc
    code, doc = s.edit(fields, src.read_bytes(), key=None)
    assert code == 401, doc
    assert s.request("GET", "/health") == (200, {"status": "ready", "queue": 0, "running": 0})
    assert s.request("GET", "/v1/models")[1]["data"][0]["image_input"] == "img2img"


def test_onnx_page_login_and_upload_img2img_in_chromium(onnx_server, onnx_workspace_schnell, tmp_path):
    """With an API key the page asks for it; then the image upload of an image-input build: upload
    a PNG, set the strength, generate; the image equals `fluxc run --image --strength`'s, bit for bit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    src = input_png(tmp_path / "in.png")
    drv = chromium(tmp_path)
    try:
        drv.get(onnx_server.url + "/")
        wait = WebDriverWait(drv, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=password]"))
        assert not drv.find_elements(By.ID, "prompt")  # nothing but the login before the key
        drv.find_element(By.CSS_SELECTOR, "input[type=text]").send_keys("user")
        drv.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(onnx_server.api_key)
        next(b for b in drv.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() == "login").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#size input"))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#size input").get_attribute("value") == SIZE)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))
        drv.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(src))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
        fill(drv, "#prompt textarea", RUNTIME_PROMPT)
        fill(drv, "#seed input", str(RUNTIME_SEED))
        fill(drv, "#steps input[type=number]", str(RUNTIME_STEPS))
        fill(drv, "#strength input[type=number]", str(STRENGTH))
        drv.find_element(By.CSS_SELECTOR, "#generate").click()
        png, _ = page_image(drv)
        WebDriverWait(drv, 30).until(lambda d: f"img2img strength {STRENGTH}" in d.find_element(By.ID, "status").text)
    finally:
        drv.quit()
    assert png == run_img2img(onnx_workspace_schnell, "onnx", src, tmp_path / "run.png")


# ---------------- sail-sim (the board's runtime on the chip simulator) ----------------

def wait_job(s: Server, job_id: str, until, timeout: float = 600) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        code, st = s.request("GET", f"/v1/images/jobs/{job_id}")
        assert code == 200, st
        if until(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck: {st}")


def chromium(tmp_path: Path):
    """Debian's headless chromium through its driver (selenium); a missing browser fails."""
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), (
        "Debian's chromium and chromium-driver are missing: make setup installs them "
        "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for f in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(f)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)


def page_image(drv, timeout: float = 600) -> tuple[bytes, set]:
    """Wait for the page's image; (its PNG bytes fetched by the browser, the progress texts seen)."""
    from selenium.webdriver.common.by import By

    seen = set()
    t0 = time.time()
    src = None
    while time.time() - t0 < timeout:
        body = drv.find_element(By.TAG_NAME, "body").text
        seen.update(re.findall(r"step \d of \d", body))
        imgs = drv.find_elements(By.CSS_SELECTOR, "#image img")
        if imgs and imgs[0].get_attribute("src"):
            src = imgs[0].get_attribute("src")
            break
        time.sleep(0.1)
    assert src, f"no image on the page: {drv.find_element(By.TAG_NAME, 'body').text[-500:]}"
    b64 = drv.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
        " let s = ''; const u = new Uint8Array(b); for (let i = 0; i < u.length; i++) s += String.fromCharCode(u[i]);"
        " done(btoa(s)); }).catch(e => done('ERROR ' + e));", src)
    assert not b64.startswith("ERROR"), b64
    return base64.b64decode(b64), seen


def fill(drv, css: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    el = drv.find_element(By.CSS_SELECTOR, css)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.BACKSPACE)
    el.send_keys(value)
    el.send_keys(Keys.TAB)


def test_sail_page_in_chromium(sail_server, bmodel_run, tmp_path):
    """Type a prompt, set seed and steps, generate, wait, read the image the page shows: it equals
    `fluxc run --backend sail-sim`'s, bit for bit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv = chromium(tmp_path)
    try:
        drv.get(sail_server.url + "/")
        wait = WebDriverWait(drv, 120)
        wait.until(lambda d: "schnell" in d.find_element(By.ID, "build-info").text)
        info = drv.find_element(By.ID, "build-info").text
        assert "W4BF16" in info and "sail-sim" in info and "BM1684X" in info, info
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#size input").get_attribute("value") == SIZE)
        fill(drv, "#prompt textarea", RUNTIME_PROMPT)
        fill(drv, "#seed input", str(RUNTIME_SEED))
        fill(drv, "#steps input[type=number]", str(RUNTIME_STEPS))
        drv.find_element(By.CSS_SELECTOR, "#generate").click()
        png, seen = page_image(drv)
        assert seen & {f"step 1 of {RUNTIME_STEPS}", f"step {RUNTIME_STEPS} of {RUNTIME_STEPS}"}, seen
        WebDriverWait(drv, 30).until(lambda d: "seed 42" in d.find_element(By.ID, "status").text)
        shot = tmp_path / "serve_page.png"
        drv.save_screenshot(str(shot))
        if os.environ.get("FLUXC_UPDATE_DOCS"):  # the README's screenshot (docs/serve_page.png)
            drv.save_screenshot(str(REPO / "docs" / "serve_page.png"))
    finally:
        drv.quit()
    ref = bmodel_run("sail-sim", "W4BF16")
    assert np.array_equal(pixels(png), ref["image"])
    assert png == run_png(ref)


def test_sail_api_queue_positions_429_cancel(sail_server, bmodel_run):
    s = sail_server
    ref = bmodel_run("sail-sim", "W4BF16")
    code, first = s.request("POST", "/v1/images/jobs", REQ)
    assert code == 202, first
    wait_job(s, first["id"], lambda st: st["status"] == "generating")
    q = [s.request("POST", "/v1/images/jobs", dict(REQ, seed=100 + i)) for i in range(2)]
    assert [c for c, _ in q] == [202, 202]
    assert [j["position"] for _, j in q] == [1, 2]  # arrival order
    code, full = s.request("POST", "/v1/images/jobs", REQ)  # --queue-size 2
    assert code == 429 and "queue is full" in full["error"]["message"], full
    code, st = s.request("DELETE", f"/v1/images/jobs/{q[0][1]['id']}")
    assert st["status"] == "cancelled"
    code, st = s.request("GET", f"/v1/images/jobs/{q[1][1]['id']}")
    assert st["status"] in ("queued", "generating") and st.get("position", 1) == 1, st
    g = wait_job(s, first["id"], lambda st: st["status"] == "generating" or st["status"] == "completed")
    assert g["status"] == "completed" or g["progress"]["steps"] == RUNTIME_STEPS
    done = wait_job(s, first["id"], lambda st: st["status"] == "completed")
    png = base64.b64decode(done["data"][0]["b64_json"])
    assert png == run_png(ref)  # ran while others waited: still fluxc run's image
    # the second job: cancelled while it runs, it stops at a step boundary
    wait_job(s, q[1][1]["id"], lambda st: st["status"] == "generating")
    s.request("DELETE", f"/v1/images/jobs/{q[1][1]['id']}")
    st = wait_job(s, q[1][1]["id"], lambda st: st["status"] in ("cancelled", "completed"))
    assert st["status"] == "cancelled", st
    assert s.request("GET", "/health")[1]["status"] == "ready"


def test_sail_sigterm(sail_server):
    """SIGTERM with one job running and one queued: the queued one is cancelled, the running one
    stops at its next step, the server exits 0 and leaves no simulator process behind."""
    import psutil

    s = sail_server
    kids = psutil.Process(s.proc.pid).children(recursive=True)
    assert kids, "sail-sim runs the chip simulator in worker processes"
    res: dict = {}
    # 8 steps: it is still running when SIGTERM comes (it stops at the next step boundary)
    running = threading.Thread(target=lambda: res.setdefault("running", s.generate(**dict(REQ, steps=8))))
    running.start()
    t0 = time.time()
    while s.request("GET", "/health")[1]["running"] == 0 and time.time() - t0 < 120:
        time.sleep(0.05)
    queued = threading.Thread(target=lambda: res.setdefault("queued", s.generate(**dict(REQ, seed=7))))
    queued.start()
    while s.request("GET", "/health")[1]["queue"] < 1 and time.time() - t0 < 120:
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(300) == 0, s.text()[-2000:]
    running.join(60)
    queued.join(60)
    assert res["queued"][0] == 503 and "shutting down" in res["queued"][1]["error"]["message"], res["queued"]
    assert res["running"][0] == 503 and "shutting down" in res["running"][1]["error"]["message"], res["running"]
    out = s.text()
    assert "SIGTERM" in out and "stopped: model closed" in out, out[-2000:]
    alive = [k.pid for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphaned worker processes: {alive}"


def test_sail_pipeline_error(compiled_schnell_w4, tmp_path):
    """The simulator's processes die under a job: that job fails with its message, the next request
    gets a 500 with its message, the server still answers; SIGTERM then still exits 0."""
    import psutil

    s = Server(["--models", str(compiled_schnell_w4), "--backend", "sail-sim"], tmp_path / "serve.log")
    try:
        s.wait_ready()
        kids = psutil.Process(s.proc.pid).children(recursive=True)
        code, job = s.request("POST", "/v1/images/jobs", REQ)
        wait_job(s, job["id"], lambda st: st["status"] == "generating")
        for k in kids:  # every bmodel's simulator dies: this job fails at its next step, the next one at once
            k.kill()
        st = wait_job(s, job["id"], lambda st: st["status"] in ("failed", "completed"))
        assert st["status"] == "failed" and st["error"], st
        code, doc = s.generate(**REQ)
        assert code == 500 and doc["error"]["message"] and doc["error"]["type"] == "server_error", doc
        assert s.request("GET", "/health") == (200, {"status": "ready", "queue": 0, "running": 0})
        assert s.request("GET", "/v1/models")[0] == 200
    finally:
        rc = s.stop()
    assert rc == 0, s.text()[-2000:]
    alive = [k.pid for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphaned worker processes: {alive}"


def test_start_error_host_warning_and_help(tmp_path):
    """No model there: the server warns about a non-local --host, then stops at start with the
    pipeline's one-line error and exit 2 (no traceback); --help has an example."""
    s = Server(["--models", str(tmp_path / "nowhere"), "--backend", "onnx", "--host", "0.0.0.0"], tmp_path / "serve.log")
    rc = s.proc.wait(300)
    s.out.close()
    out = s.text()
    assert rc == 2, out
    assert "warning: listening on 0.0.0.0" in out and "--api-key" in out, out
    assert "error: models folder" in out and "does not exist" in out and "Traceback" not in out, out
    r = invoke(["serve", "--help"])
    assert r.exit_code == 0 and "Example: fluxc serve" in r.output and "curl" in r.output, r.output
