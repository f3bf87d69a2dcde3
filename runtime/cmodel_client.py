"""The fluxc side of the chip simulator worker: starts runtime/cmodel_worker.py under the
toolchain Python, parks it between requests, and exchanges runtime/wire.py messages with it."""
from __future__ import annotations

import atexit
import os
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from fluxc import toolchain
from fluxc.errors import FluxcError
from fluxc.runtime.wire import read_message, write_message

WORKER_SCRIPT = Path(__file__).with_name("cmodel_worker.py")


class CmodelWorker:
    """The long-lived simulator process (Python 3.10 toolchain env). One per runtime; it can
    hold any number of loaded bmodels."""

    def __init__(self, python: Path | None = None, env: dict | None = None):
        if python is None or env is None:
            toolchain.require_toolchain()
            python = python or Path(toolchain.toolchain_python())
            if env is None:
                env = dict(toolchain.toolchain_env())
        env = dict(env)
        env.pop("FLUXC_CMODEL_WORKER_READY", None)
        # The simulator's OpenMP threads spin; on a busy machine more threads than free
        # cores made every call many times slower. One thread unless asked otherwise.
        env["OMP_NUM_THREADS"] = os.environ.get("FLUXC_CMODEL_THREADS", "1")
        self._stderr_tail: deque[str] = deque(maxlen=40)
        # Own session: if fluxc dies while this worker is parked (stopped, see _park), the
        # kernel sends the orphaned, stopped process group SIGHUP + SIGCONT and it exits.
        self.proc = subprocess.Popen([str(python), "-u", str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        self._parking = os.environ.get("FLUXC_CMODEL_PARK", "1") != "0" and hasattr(signal, "SIGSTOP")
        self._parked = False
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        self._lock = threading.Lock()
        self._keys = 0
        h, _ = self._recv()
        if not h.get("ready"):
            raise FluxcError(f"chip simulator worker did not start: {self.stderr_tail()}")
        self._park()

    # The simulator's engine threads (TPU_GDE, TPU_SORT, CORE_MAIN) poll even while the
    # process waits for work, and a run keeps one worker per bmodel file: on 2 cores, idle
    # workers spinning made every simulator call several times slower. A worker is
    # therefore stopped (SIGSTOP) between requests and continued (SIGCONT) for each one.
    # FLUXC_CMODEL_PARK=0 turns this off.
    def _park(self) -> None:
        if self._parking and not self._parked and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self._parked = True

    def _unpark(self) -> None:
        if self._parked:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self._parked = False

    def _drain(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            s = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(s)
            if os.environ.get("FLUXC_WORKER_DEBUG"):
                print(f"[cmodel] {s}", file=sys.stderr)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def _recv(self):
        try:
            return read_message(self.proc.stdout)
        except (EOFError, struct.error):
            self.proc.wait(timeout=10)
            raise FluxcError(f"chip simulator worker exited (code {self.proc.returncode}); "
                             f"its last output:\n{self.stderr_tail()}") from None

    def request(self, header: dict, arrays=()):
        with self._lock:
            if self.proc.poll() is not None:
                raise FluxcError(f"chip simulator worker is not running (exit {self.proc.returncode}); "
                                 f"last output:\n{self.stderr_tail()}")
            self._unpark()
            try:
                write_message(self.proc.stdin, header, arrays)
            except BrokenPipeError:
                pass  # _recv reports the exit
            h, outs = self._recv()
            self._park()
        if not h.get("ok"):
            raise FluxcError(f"chip simulator: {h.get('error')}")
        return h, outs

    def new_key(self) -> str:
        self._keys += 1
        return f"m{self._keys}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                with self._lock:
                    self._unpark()
                    write_message(self.proc.stdin, {"op": "quit"})
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


_live_workers: list[CmodelWorker] = []


def _close_all_workers() -> None:
    for w in list(_live_workers):
        w.close()


def new_worker() -> CmodelWorker:
    """A fresh simulator process. One per bmodel file: TPU-MLIR's pyruntime_bm runs a
    second Model of the same process on a shared simulated device, and running a net of a
    model loaded after another one crashed the simulator here ("NO SUCH SHORT CMD TYPE");
    separate processes are isolated like separate chips."""
    w = CmodelWorker()
    if not _live_workers:
        atexit.register(_close_all_workers)
    _live_workers.append(w)
    return w


def close_worker(w: CmodelWorker) -> None:
    """Stop a worker from new_worker and forget it."""
    w.close()
    if w in _live_workers:
        _live_workers.remove(w)
