"""What `fluxc serve` adds over the bare pipeline, on the tiny build (128x128, tiny VAE).

The model is opened in this process exactly as the server opens it (fluxc/serve/model.py), and
`fluxc serve` runs in a subprocess on the same folder and backend. Then:
1. N images in turn, bare (pipeline call + PNG encoding, as the server does) then through the
   server (POST /v1/images/generations, b64_json, one client): the ratio of the medians is the
   server's added latency per request. Taking them in turn lets the shared machine's load
   drift over both alike.
2. N requests from one client, then N from each of 3 clients at once: requests per minute (one
   chip: the queue serialises them, so 3 clients show the queue's overhead, not a speed-up).
Every response is checked against the bare pipeline's PNG for its seed (bit for bit).
Simulator figures (cmodel, sail-sim) are relative only; the machine's load average is recorded.

Usage: .venv/bin/python benchmarks/serve.py --models WS [--backend sail-sim --backend onnx] [--n 6] [--steps 2]
       writes benchmarks/results/serve.json (--json to change)
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from results_file import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "a photo of an astronaut riding a horse on the moon"


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/images/generations", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, type=Path, help="a compiled tiny workspace (or export for onnx)")
    ap.add_argument("--backend", action="append", help="repeatable (default: sail-sim and onnx)")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    a = ap.parse_args()
    runs = [measure(a.models, b, a.n, a.steps) for b in (a.backend or ["sail-sim", "onnx"])]
    write_results(a.json, {"size": "tiny", "runs": runs})
    print(json.dumps(runs, indent=2))


def measure(models: Path, backend: str, n: int, steps: int) -> dict:
    from fluxc.runtime.pipeline import png_bytes
    from fluxc.serve.model import ServedModel

    m = ServedModel(models, backend)
    d = m.dims
    size = f"{d.width}x{d.height}"
    pipe = m.pipeline(d.height, d.width)

    def bare(seed: int) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        res = pipe(PROMPT, None, steps, 3.5, seed)
        png = png_bytes(res.image)
        return time.perf_counter() - t0, png

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w", prefix="fluxc-serve-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "fluxc.cli", "serve", "--models", str(models), "--backend",
                             backend, "--port", str(port), "--queue-size", "16"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if json.loads(r.read())["status"] == "ready":
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"fluxc serve exited {proc.returncode}; see {log.name}")
            time.sleep(0.2)
        body = dict(prompt=PROMPT, steps=steps, size=size, response_format="b64_json")
        bare(1000)  # warm-up, both sides
        post(url, dict(body, seed=1000))
        ref: dict[int, bytes] = {}
        mismatches = 0

        def one(seed: int) -> float:
            nonlocal mismatches
            t0 = time.perf_counter()
            doc = post(url, dict(body, seed=seed))
            dt = time.perf_counter() - t0
            mismatches += base64.b64decode(doc["data"][0]["b64_json"]) != ref[seed]
            return dt

        # bare and served in turn, so that the shared machine's load drifts over both alike
        bare_t, single = [], []
        for seed in range(n):
            dt, ref[seed] = bare(seed)
            bare_t.append(dt)
            single.append(one(seed))
        t1 = time.perf_counter()
        for seed in range(n):
            one(seed)
        wall1 = time.perf_counter() - t1

        t3 = time.perf_counter()
        threads = [threading.Thread(target=lambda: [one(seed) for seed in range(n)]) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall3 = time.perf_counter() - t3
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(600)
        log.close()
        load_s = m.load_s
        m.close()

    bare_s = statistics.median(bare_t)
    server_s = statistics.median(single)
    doc = {
        "size": "tiny", "what": f"tiny FLUX.1-schnell build ({size}, tiny VAE), {backend}, {steps} steps",
        "backend": backend, "width": d.width, "height": d.height, "steps": steps, "requests_per_client": n,
        "load_s": round(load_s, 3),
        "bare_pipeline_s_median": round(bare_s, 4), "server_request_s_median": round(server_s, 4),
        "bare_pipeline_s": [round(x, 4) for x in bare_t], "server_request_s": [round(x, 4) for x in single],
        "added_latency_ratio": round(server_s / bare_s, 4), "added_latency_s": round(server_s - bare_s, 4),
        "requests_per_min_1_client": round(n / wall1 * 60, 2),
        "requests_per_min_3_clients": round(3 * n / wall3 * 60, 2),
        "bare_images_per_min": round(60 / bare_s, 2),
        "responses_not_bit_identical": mismatches, "server_exit_code": rc,
        "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "note": "simulator backends: relative figures only; the machine was shared (load average above)",
    }
    return doc


if __name__ == "__main__":
    main()
