"""fluxc serve: the pipeline opened once, a web page and an OpenAI-style images API on one port."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from fluxc import workspace
from fluxc.commands.run import (BACKEND_OPTION, CHIP_OPTION, DEVICES_OPTION, FLUX_TYPE_OPTION, MODELS_OPTION,
                                QUANTIZE_OPTION, TINY_VAE_OPTION, parse_devices)
from fluxc.errors import FluxcError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _imports():
    """The web stack (the `serve` extra), with a one-line error when it is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page phones nobody
    try:
        import fastapi  # noqa: F401
        import gradio  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise FluxcError(f"fluxc serve needs the web stack ({e.name} is missing): pip install 'fluxc[serve]'") from None
    return uvicorn


def _check_port(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's log line, when the address is taken."""
    if not 0 <= port <= 65535:
        raise FluxcError(f"--port {port}: use 1-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FluxcError(f"--host {host}: {e}; use an address like 127.0.0.1 or 0.0.0.0") from None
    fam, _, _, _, addr = infos[0]
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError as e:
        raise FluxcError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    finally:
        s.close()


def serve(
    models: Optional[Path] = MODELS_OPTION,
    backend: str = BACKEND_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    flux_type: Optional[str] = FLUX_TYPE_OPTION,
    tiny_vae: Optional[bool] = TINY_VAE_OPTION,
    devices: Optional[str] = DEVICES_OPTION,
    chip: str = CHIP_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default serves this machine only; "
                             "another (0.0.0.0: every interface) prints a warning."),
    port: int = typer.Option(7860, "--port", help="TCP port of the page and the API."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FLUXC_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on the API (and KEY as the "
                                               "page's password)."),
    queue_size: int = typer.Option(8, "--queue-size", help="Jobs that may wait; one more gets HTTP 429."),
) -> None:
    """Serve the compiled FLUX.1 model: the pipeline is opened once (as fluxc run opens it), then a web page
    and an OpenAI-style images API answer on one port until SIGTERM or Ctrl-C.

    Example: fluxc serve --backend sail --port 7860, then open http://127.0.0.1:7860/ or

      curl -s http://127.0.0.1:7860/v1/images/generations -H 'Content-Type: application/json'
      -d '{"prompt": "a red fox in the snow", "size": "1024x1024", "seed": 42, "steps": 4}'
    """
    uvicorn = _imports()
    if queue_size < 1:
        raise FluxcError("--queue-size must be at least 1")
    m = workspace.models_dir(models)
    devs = parse_devices(devices)
    _check_port(host, port)

    from fluxc.serve.app import create_app
    from fluxc.serve.jobs import Worker
    from fluxc.serve.model import ServedModel
    from fluxc.serve.page import mount_page

    server_box: dict = {}

    def ready(model) -> None:
        for line in model.lines:
            say(line)
        say(f"ready: http://{host}:{port}/ serves {', '.join(model.info()['sizes'])} (width x height)")

    def failed(msg: str) -> None:
        srv = server_box.get("server")
        if srv is not None:
            srv.should_exit = True

    worker = Worker(lambda: ServedModel(m, backend, quantize, flux_type, tiny_vae, devs, chip), queue_size,
                    on_ready=ready, on_failed=failed)
    app = create_app(worker, api_key)
    app = mount_page(app, worker, api_key)

    class Server(uvicorn.Server):
        # uvicorn re-raises a caught SIGTERM after its shutdown (the process would die of it);
        # fluxc serve shuts down itself: queued jobs cancelled, the running one stopped, model closed, exit 0.
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)

        async def shutdown(self, sockets=None) -> None:
            # Answer the requests that wait on the running job (it stops at its next step boundary)
            # before uvicorn closes the connections; then give the rest (the page's open streams) 3 s.
            while worker.busy():
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
            await super().shutdown(sockets)

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                say(f"{signal.Signals(sig).name}: cancelling queued jobs, stopping the running one, closing the model")
                # not under the signal handler: the queue's lock may be held by the interrupted code
                threading.Thread(target=worker.shutdown, daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3,
                            access_log=False)
    server = Server(config)
    server_box["server"] = server
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if host in LOCAL_HOSTS:
        say(f"fluxc serve: {url} (page) and {url}v1/images/generations (API), on {host} only: this machine "
            f"alone can reach it (--host 0.0.0.0 opens it to the network)")
    else:
        say(f"fluxc serve: {url} (page) and {url}v1/images/generations (API)")
        say(f"warning: listening on {host}: anyone who reaches this machine can use the server and its chip"
            + ("" if api_key else "; set --api-key KEY (or FLUXC_API_KEY) to require a key"))
    say(f"loading models ({backend}) in the background; GET /health says \"loading\" until ready ...")
    worker.start()
    try:
        server.run()
    finally:
        worker.shutdown()
        worker.join()
    if worker.status == "failed" or (worker.error and worker.model is None):
        raise FluxcError(worker.error or "the model did not open")
    say("stopped: model closed")
