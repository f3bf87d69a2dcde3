"""The isolated TPU-MLIR toolchain: a private Python 3.10 venv holding tpu_mlir, and the one
way the rest of fluxc runs its tools.

Why a separate venv: tpu_mlir needs Python >=3.10,<3.11 and pins numpy/protobuf/transformers
versions that clash with the export stack (torch/diffusers in the project venv).

Layout (outside the repo):

    <cache_root()>/toolchain/
      tpu_mlir-1.30.2-<spec hash>/          the venv (bin/python, bin/model_transform, ...)
        .fluxc-toolchain.json               completion marker, written LAST by install()
      tpu_mlir-1.30.2-<spec hash>.lock      flock taken by install() (concurrent installs wait)
      tpu_mlir-1.30.2-<spec hash>.install.log   output of the last install (uv or pip)
      tpu_mlir-1.30.2-<spec hash>.venv.log      output of `python3.10 -m venv`

Packages are installed with uv when it can be bootstrapped (fast reinstalls from its wheel
cache), else with pip; see _install_packages. FLUXC_TOOLCHAIN_INSTALLER=pip forces pip.

A venv folder is trusted only when its marker exists and names the same install spec hash;
anything else (interrupted install, other spec, hand-made folder) is wiped and reinstalled.

glibc clash, and why nothing in the venv is edited: tpu_mlir's __init__ prepends
tpu_mlir/lib/third_party to LD_LIBRARY_PATH for every tool it launches, and that folder ships
Ubuntu 22.04's glibc (libc.so.6, libm.so.6, libpthread.so.0; glibc 2.35). On a host with a
newer glibc (Debian 12: 2.36) every program started with that path (tpuc-opt, /bin/sh, ...)
then loads the old libc next to the host's newer ld.so and crashes. Upstream's fix is to
delete those files. We instead put the HOST's libc/libm/libpthread in LD_PRELOAD: the loader
then already has libraries with those sonames and never loads the bundled copies, for the
tool and for every child it spawns (tpu_mlir only rewrites LD_LIBRARY_PATH, never
LD_PRELOAD). The installed package stays untouched. This is done only when the host glibc is
at least as new as the bundled one: on an older host the bundled glibc is what the binaries
need, and tpu_mlir works as shipped.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from fluxc.errors import FluxcError, ToolError
from fluxc.fsutil import sha256_json, write_json_atomic
from fluxc.workspace import cache_root

TPU_MLIR_VERSION = "1.30.2"
TORCH_VERSION = "2.11.0"  # tpu_mlir 1.30.2's own [torch] extra pin
MARKER_NAME = ".fluxc-toolchain.json"
MARKER_FORMAT = 1
LOG_TAIL_LINES = 40
PYTHON_ENV_VAR = "FLUXC_PYTHON310"
INSTALLER_ENV_VAR = "FLUXC_TOOLCHAIN_INSTALLER"  # "uv" (default) or "pip"

# Variables of the calling process that must not leak into the toolchain's Python.
_SCRUB_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONNOUSERSITE", "VIRTUAL_ENV",
               "CONDA_PREFIX", "PYENV_VERSION", "__PYVENV_LAUNCHER__")


@dataclass(frozen=True)
class InstallSpec:
    """What goes into one toolchain venv. Its hash names the folder and is kept in the marker."""

    name: str
    requirements: tuple[str, ...]
    imports: tuple[str, ...]  # modules the install check imports in the new venv
    report: tuple[str, ...]  # distributions whose versions are recorded and shown
    tpu_mlir: bool = True  # run the tpu_mlir launch check (a compiled tool starts)
    # extra pins given to uv only (uv refuses a yanked release unless it is pinned directly);
    # not part of the hash: pip installs the very same release without being told
    uv_pins: tuple[str, ...] = ()
    python_minor: tuple[int, int] = (3, 10)
    # bump when the layout or the way tools are launched changes incompatibly
    layout: int = 1

    def to_dict(self) -> dict:
        return {"name": self.name, "requirements": list(self.requirements), "imports": list(self.imports),
                "report": list(self.report), "tpu_mlir": self.tpu_mlir,
                "python_minor": list(self.python_minor), "layout": self.layout}

    @property
    def hash(self) -> str:
        return sha256_json(self.to_dict())

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.hash[:12]}"


DEFAULT_SPEC = InstallSpec(
    name=f"tpu_mlir-{TPU_MLIR_VERSION}",
    requirements=(
        f"tpu_mlir[onnx]=={TPU_MLIR_VERSION}",
        # its ONNX front end imports torch (python/transform/OnnxOpt.py); not pulled by [onnx]
        f"torch=={TORCH_VERSION}",
        # imported by tpu_mlir's tools, not declared by the wheel
        "psutil",
    ),
    imports=("tpu_mlir", "torch", "psutil", "onnx"),
    report=("tpu_mlir", "torch", "onnx", "numpy", "psutil"),
    # tpu_mlir 1.30.2 pins opencv-python-headless==4.8.0.74, a yanked release
    uv_pins=("opencv-python-headless==4.8.0.74",),
)


# ---------------------------------------------------------------- locations and state

def toolchain_root() -> Path:
    # absolute: tools run in other working folders
    return Path(os.path.abspath(cache_root())) / "toolchain"


def toolchain_dir(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The venv folder for `spec` (it may not exist yet)."""
    return toolchain_root() / spec.folder_name


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def read_marker(spec: InstallSpec = DEFAULT_SPEC) -> dict | None:
    """The completion marker if the folder is a complete install of `spec`, else None."""
    venv = toolchain_dir(spec)
    try:
        marker = json.loads((venv / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or marker.get("spec_hash") != spec.hash:
        return None
    if not _venv_python(venv).exists():
        return None
    if spec.tpu_mlir and not (_site_packages(venv, spec) / "tpu_mlir" / "__init__.py").exists():
        return None
    return marker


def state(spec: InstallSpec = DEFAULT_SPEC) -> str:
    """"ok" (complete install), "incomplete" (a folder without a valid marker) or "missing"."""
    if read_marker(spec) is not None:
        return "ok"
    return "incomplete" if toolchain_dir(spec).exists() else "missing"


def require_toolchain(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The venv folder of a complete install; FluxcError with the fix otherwise."""
    if read_marker(spec) is None:
        raise FluxcError(
            f"TPU-MLIR toolchain is not installed (or incomplete) at {toolchain_dir(spec)}; "
            "run `fluxc toolchain install`")
    return toolchain_dir(spec)


def toolchain_python(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The toolchain venv's python (run it with toolchain_env())."""
    return _venv_python(require_toolchain(spec))


def toolchain_version(spec: InstallSpec = DEFAULT_SPEC) -> str:
    """A short id of the installed compiler, for compile cache keys, e.g. "tpu_mlir-1.30.2"."""
    return spec.name


def _site_packages(venv: Path, spec: InstallSpec) -> Path:
    return venv / "lib" / "python{}.{}".format(*spec.python_minor) / "site-packages"


def tpu_mlir_root(spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """The installed tpu_mlir package folder (TPUC_ROOT)."""
    return _site_packages(require_toolchain(spec), spec) / "tpu_mlir"


# ---------------------------------------------------------------- environment

def _join(*parts: str | None) -> str:
    return os.pathsep.join(p for p in parts if p)


def _glibc_version(text: bytes | str) -> tuple[int, int] | None:
    if isinstance(text, str):
        text = text.encode()
    m = re.search(rb"(?:release version|glibc) (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _host_glibc_libs() -> list[str]:
    """Paths of this host's libc.so.6 / libm.so.6 / libpthread.so.0 (the ones this process
    itself runs with), or [] when that cannot be determined (non-glibc host)."""
    libdir = None
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(None, 5)[-1] if line.count(" ") >= 5 else ""
            if path.endswith("/libc.so.6"):
                libdir = Path(path).parent
                break
    except OSError:
        return []
    if libdir is None:
        return []
    return [str(libdir / n) for n in ("libc.so.6", "libm.so.6", "libpthread.so.0") if (libdir / n).exists()]


@functools.lru_cache(maxsize=8)
def _needs_glibc_preload(tpuc_root: Path) -> bool:
    bundled = tpuc_root / "lib" / "third_party" / "libc.so.6"
    if not bundled.exists():
        return False
    try:
        host = _glibc_version(os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (ValueError, OSError, AttributeError):
        host = None
    data = bundled.read_bytes()
    bundled_v = _glibc_version(data[data.find(b"GNU C Library"):][:200]) if b"GNU C Library" in data else None
    if host is None or bundled_v is None:
        return False
    return host >= bundled_v


def toolchain_env(spec: InstallSpec = DEFAULT_SPEC) -> dict[str, str]:
    """The environment for running toolchain tools or a long-lived simulator worker started
    with toolchain_python(): venv bin first on PATH, the variables tpu_mlir 1.30.2's __init__
    sets for its children (TPUC_ROOT, PYTHONPATH, LD_LIBRARY_PATH with lib, lib/capi,
    lib/third_party), and the glibc fix (LD_PRELOAD, see the module docstring). The dynamic
    loader reads LD_LIBRARY_PATH/LD_PRELOAD at process start, so a worker must be STARTED with
    this env (setting it inside a running process is too late)."""
    return _build_env(require_toolchain(spec), spec)


def _build_env(venv: Path, spec: InstallSpec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_VARS}
    env["VIRTUAL_ENV"] = str(venv)
    if not spec.tpu_mlir:
        env["PATH"] = _join(str(venv / "bin"), os.environ.get("PATH"))
        return env
    root = _site_packages(venv, spec) / "tpu_mlir"
    ppl = root / "cross_toolchains" / "ppl_compile"
    # Mirrors tpu_mlir/__init__.py (1.30.2): the tools re-apply it themselves; a worker that
    # imports pyruntime_bm / model_runner directly needs it from the start.
    env["PATH"] = _join(str(venv / "bin"), str(root / "bin"), str(root / "python" / "tools"),
                        str(root / "python" / "utils"), str(ppl / "bin"), os.environ.get("PATH"))
    env["PYTHONPATH"] = _join(str(root), str(root / "python"), str(root / "python" / "tools"),
                              str(root / "regression"), str(root / "customlayer" / "python"))
    env["LD_LIBRARY_PATH"] = _join(str(root / "lib"), str(root / "lib" / "capi"),
                                   str(root / "lib" / "third_party"), os.environ.get("LD_LIBRARY_PATH"))
    env["TPUC_ROOT"] = str(root)
    env.setdefault("PPL_PROJECT_ROOT", str(ppl))
    env.setdefault("PPL_BUILD_PATH", str(root / "build" / "ppl"))
    env.setdefault("PPL_RUNTIME_PATH", str(ppl / "deps"))
    env.setdefault("TPUKERNEL_CUSTOM_FIRMWARE_PATH", str(root / "lib" / "libcmodel_custom.so"))
    env.setdefault("CUSTOM_LAYER_UNITTEST_DIR", str(root / "customlayer" / "test_if" / "unittest"))
    if _needs_glibc_preload(root):
        libs = _host_glibc_libs()
        if libs:
            prev = os.environ.get("LD_PRELOAD")
            env["LD_PRELOAD"] = " ".join(libs + ([prev] if prev else []))
    return env


# ---------------------------------------------------------------- running tools

def _tail(log: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        data = log.read_bytes()[-200_000:]
    except OSError:
        return "(no log)"
    lines = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        # progress bars rewrite a line with \r: keep what was shown last
        line = line.rstrip("\r").rsplit("\r", 1)[-1]
        lines.append(line)
    return "\n".join(lines[-n:])


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a child and everything it started (tpu_mlir's entry points re-launch python, which
    launches tpuc-opt, ...)."""
    victims = []
    try:
        import psutil

        victims = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - already gone, or no psutil: the child alone
        pass
    for p in [proc, *victims]:
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _die_with_parent_fn() -> Callable[[], None] | None:
    """A preexec_fn for install-time children: SIGKILL when the fluxc process dies (Linux), so
    a killed install never leaves pip/uv writing into a folder a later install wipes and
    rebuilds. Not used by run_tool: preexec_fn is unsafe in multi-threaded callers, and
    PDEATHSIG reaches only the direct child; run_tool goes through fluxc/tool_launcher.py,
    which kills the tool's whole process group when fluxc dies."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


LAUNCHER = Path(__file__).with_name("tool_launcher.py")
# Variables that must not reach fluxc's own interpreter when it runs the launcher (they are
# meant for the toolchain's python; the launcher hands the tool its full env itself).
_LAUNCHER_SCRUB = ("LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def _spawn_guarded(argv: list[str], cwd: Path, env: dict, stdout) -> tuple[subprocess.Popen, int]:
    """Start `argv` through fluxc/tool_launcher.py; returns (launcher process, write end of its
    pipe). The tool dies with its whole process group when that write end closes: when fluxc
    exits for any reason (kill -9 included) or closes it on purpose."""
    r, w = os.pipe()  # both ends close-on-exec: no other child of this process inherits them
    try:
        launcher_env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_SCRUB}
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER), str(r)], cwd=str(cwd),
                                env=launcher_env, stdout=stdout, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, pass_fds=(r,))
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    try:
        os.write(w, (json.dumps({"argv": argv, "env": env}) + "\n").encode())
    except OSError:  # the launcher already died: its exit code tells
        pass
    return proc, w


def _run_logged(argv: list[str], cwd: Path, log: Path, env: dict, timeout: float | None, tool: str,
                append: bool = False, die_with_parent: bool = False, guarded: bool = False) -> None:
    """Run argv with its output in `log`. guarded: through the tool launcher, so the tool and
    all its descendants die with this process (run_tool); die_with_parent: PDEATHSIG for a
    direct child (install-time, single-threaded callers)."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as f:
        f.write(f"$ cd {cwd} && {subprocess.list2cmdline(argv)}\n".encode())
        f.flush()
        w = None
        if guarded:
            proc, w = _spawn_guarded(argv, cwd, env, f)
        else:
            proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent_fn() if die_with_parent else None)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if w is not None:
                os.close(w)  # the launcher kills the tool's process group
                w = None
            _kill_tree(proc)
            f.write(f"\n[fluxc] killed after the {timeout:g} s timeout\n".encode())
            f.flush()
            raise ToolError(tool, argv, log, _tail(log) + f"\n(timed out after {timeout:g} s)", -1) from None
        except BaseException:
            if w is not None:
                os.close(w)
                w = None
            _kill_tree(proc)
            raise
        finally:
            if w is not None:
                os.close(w)
    if rc != 0:
        _raise_if_disk_full(tool, cwd, log)
        raise ToolError(tool, argv, log, _tail(log), rc)


_DISK_FULL_MARKERS = ("No space left on device", "[Errno 28]", "ENOSPC")


def _raise_if_disk_full(tool: str, cwd: Path, log: Path) -> None:
    """A tool that failed because its disk filled up gets the disk-full error, not a log tail."""
    from fluxc.diskfull import LOW_FREE_BYTES, disk_full_error, free_bytes

    free = free_bytes(cwd)
    if any(m in _tail(log, 200) for m in _DISK_FULL_MARKERS) or (free is not None and free < LOW_FREE_BYTES):
        raise disk_full_error(f"the {tool} output in {cwd}", cwd, option="--build-dir")


def run_tool(tool: str, args: list, cwd: Path, log: Path, env: dict | None = None,
             timeout: float | None = None) -> None:
    """Run a console script of the toolchain venv (model_transform, model_deploy, model_tool,
    model_runner, ...) with an argument list, in `cwd`, output (stdout+stderr) to `log`.
    `env` entries override toolchain_env(). Raises ToolError (tool, command line, log tail)
    on a non-zero exit or timeout. Safe to call from many threads/processes at once as long
    as each call has its own cwd (the tools write side files into it)."""
    venv = require_toolchain()
    exe = venv / "bin" / tool
    if "/" in tool or not exe.exists():
        raise FluxcError(f"unknown TPU-MLIR tool {tool!r}: no {exe}")
    full_env = toolchain_env()
    if env:
        full_env.update({str(k): str(v) for k, v in env.items()})
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    if tool == "model_deploy" and "--mlir" in args:
        # the .mlir names its weight file relative to the working folder
        mlir = Path(str(args[list(args).index("--mlir") + 1]))
        if (cwd / mlir).resolve().parent != cwd.resolve():
            raise FluxcError(f"model_deploy must run in the folder holding the .mlir: got cwd {cwd} "
                             f"and --mlir {mlir}; pass cwd={(cwd / mlir).parent}")
    argv = [str(exe)] + [str(a) for a in args]
    _run_logged(argv, cwd, Path(log), full_env, timeout, tool, guarded=True)


# ---------------------------------------------------------------- finding Python 3.10

_PROBE = ("import sys, json, venv, ensurepip; "
          "print(json.dumps({'v': list(sys.version_info[:3]), 'exe': sys.executable}))")


def _probe_python(path: str) -> tuple[tuple[int, ...] | None, str, str]:
    """(version, real executable, problem) of the interpreter at `path`."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_VARS}
    try:
        r = subprocess.run([path, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=env,
                           stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent_fn())
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, path, f"cannot run ({e.__class__.__name__})"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
        return None, path, f"does not run ({last})"
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, path, "unexpected output"
    return tuple(info["v"]), info["exe"] or path, ""


def find_python310(minor: tuple[int, int] = (3, 10)) -> Path:
    """FLUXC_PYTHON310, else a working `python3.10` on PATH, else ~/.pyenv/versions/3.10*."""
    want = f"{minor[0]}.{minor[1]}"
    explicit = os.environ.get(PYTHON_ENV_VAR)
    if explicit:
        if not Path(explicit).exists():
            raise FluxcError(f"{PYTHON_ENV_VAR}={explicit} does not exist; point it at a Python {want} "
                             f"interpreter (with venv/ensurepip) or unset it")
        v, exe, problem = _probe_python(explicit)
        if v is None or tuple(v[:2]) != minor:
            what = problem or f"is Python {'.'.join(map(str, v))}"
            raise FluxcError(f"{PYTHON_ENV_VAR}={explicit} {what}, not a usable Python {want}; "
                             f"point it at a Python {want} interpreter (with venv/ensurepip) or unset it")
        return Path(exe)
    candidates: list[str] = []
    on_path = shutil.which(f"python{want}")
    if on_path:
        candidates.append(on_path)
    pyenv_roots = [Path(os.environ["PYENV_ROOT"])] if os.environ.get("PYENV_ROOT") else []
    pyenv_roots.append(Path.home() / ".pyenv")

    def vkey(p: Path):
        return [int(x) if x.isdigit() else 0 for x in re.split(r"[.\-]", p.parent.parent.name)]

    for root in pyenv_roots:
        found = sorted(root.glob(f"versions/{want}*/bin/python"), key=vkey, reverse=True)
        candidates += [str(p) for p in found]
    for c in candidates:
        v, exe, _ = _probe_python(c)
        if v is not None and tuple(v[:2]) == minor:
            return Path(exe)
    raise FluxcError(
        f"no Python {want} found (TPU-MLIR needs >={want},<{minor[0]}.{minor[1] + 1}); install one "
        f"(`pyenv install {want}` or your distribution's python{want} with its venv module) "
        f"or set {PYTHON_ENV_VAR}=/path/to/python{want}")


# ---------------------------------------------------------------- install

@contextmanager
def _install_lock(spec: InstallSpec, progress: Callable[[str], None]) -> Iterator[None]:
    root = toolchain_root()
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f"{spec.folder_name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another fluxc toolchain install to finish (lock {lock_path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock (also released if the process dies)


def _venv_run(venv: Path, code: str, spec: InstallSpec, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_VARS}
    r = subprocess.run([str(_venv_python(venv)), "-c", code], capture_output=True, text=True,
                       env=env, timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent_fn())
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
        raise FluxcError(f"toolchain check failed in {venv} (exit {r.returncode}); "
                         f"run `fluxc toolchain install` again\n{tail}")
    return r.stdout


def _installed_versions(venv: Path, spec: InstallSpec) -> dict[str, str]:
    code = ("import json, sys, importlib.metadata as m\n"
            f"names = {list(spec.report)!r}\n"
            "out = {'python': '.'.join(map(str, sys.version_info[:3]))}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))\n")
    return json.loads(_venv_run(venv, code, spec).strip().splitlines()[-1])


def installed_versions(spec: InstallSpec = DEFAULT_SPEC) -> dict[str, str]:
    """Versions of python and the spec's packages, read from the installed venv."""
    return _installed_versions(require_toolchain(spec), spec)


def install(progress: Callable[[str], None] = print, spec: InstallSpec = DEFAULT_SPEC) -> Path:
    """Make sure a complete toolchain venv for `spec` exists; return its folder.

    A no-op (seconds) when the marker says it is complete. A folder without a valid marker is
    never trusted: it is wiped and rebuilt. The marker is written last, so an interrupted
    install is detected and repaired by the next one. Concurrent installs serialise on a lock.
    """
    venv = toolchain_dir(spec)
    if read_marker(spec) is not None:
        progress(f"toolchain already installed at {venv}")
        return venv
    with _install_lock(spec, progress):
        if read_marker(spec) is not None:  # another process finished it while we waited
            progress(f"toolchain already installed at {venv}")
            return venv
        t0 = time.monotonic()
        py = find_python310(spec.python_minor)
        progress(f"[1/5] Python {spec.python_minor[0]}.{spec.python_minor[1]}: {py}")
        if venv.exists() or venv.is_symlink():
            progress(f"[2/5] removing incomplete toolchain folder {venv} (no valid completion marker)")
            if venv.is_symlink() or venv.is_file():
                venv.unlink()
            else:
                shutil.rmtree(venv)
        else:
            progress(f"[2/5] creating venv {venv}")
        log = toolchain_root() / f"{spec.folder_name}.install.log"
        venv_log = toolchain_root() / f"{spec.folder_name}.venv.log"
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB_VARS}
        # The venv cannot be built elsewhere and renamed (venvs hold absolute paths); the
        # marker written last is what makes it trusted.
        _run_logged([str(py), "-m", "venv", str(venv)], toolchain_root(), venv_log, env, 600, "python -m venv",
                    die_with_parent=True)
        progress(f"[3/5] installing {' '.join(spec.requirements)} (log: {log}; minutes on a cold cache)")
        how = _install_packages(venv, spec, log, env, progress)
        progress("[4/5] checking the installed toolchain")
        _venv_run(venv, "import " + ", ".join(spec.imports), spec)
        if spec.tpu_mlir:
            _check_launch(venv, spec)
        versions = _installed_versions(venv, spec)
        marker = {
            "format": MARKER_FORMAT,
            "spec_hash": spec.hash,
            "spec": spec.to_dict(),
            "versions": versions,
            "base_python": str(py),
            "installer": how,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "install_seconds": round(time.monotonic() - t0, 1),
        }
        write_json_atomic(venv / MARKER_NAME, marker)
        progress(f"[5/5] toolchain ready at {venv} ({_fmt_versions(versions)}; installed with {how}) "
                 f"in {marker['install_seconds']:.0f} s")
        return venv


def _pip_settings(venv: Path, env: dict) -> dict[str, str]:
    """The user's effective pip configuration (files and PIP_* variables), as `pip config list`
    reports it: {key: value}, environment variables winning over files."""
    r = subprocess.run([str(_venv_python(venv)), "-m", "pip", "config", "list"], capture_output=True,
                       text=True, env=env, timeout=120, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent_fn())
    files: dict[str, str] = {}
    from_env: dict[str, str] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^([^.]*)\.([\w-]+)=(['\"])(.*)\3$", line.strip())
        if m:
            (from_env if m.group(1) == ":env:" else files)[m.group(2)] = m.group(4)
    files.update(from_env)
    return files


def _uv_args(settings: dict[str, str]) -> list[str]:
    """pip's index / find-links / constraint settings, as uv options (uv does not read pip.conf)."""
    # pip merges candidates from every index; uv's default stops at the first index with the name
    args = ["--index-strategy", "unsafe-best-match"]
    if settings.get("index-url"):
        args += ["--index-url", settings["index-url"]]
    for url in settings.get("extra-index-url", "").split():
        args += ["--extra-index-url", url]
    for loc in settings.get("find-links", "").split():
        args += ["--find-links", loc]
    for c in settings.get("constraint", "").split():
        args += ["--constraint", c]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args


def _install_packages(venv: Path, spec: InstallSpec, log: Path, env: dict,
                      progress: Callable[[str], None]) -> str:
    """Install spec.requirements into the venv; returns "uv" or "pip".

    uv is preferred: it keeps downloaded wheels in its own cache (~/.cache/uv, or UV_CACHE_DIR)
    and hard-links them into the venv, so a reinstall (repair, new spec sharing most wheels)
    takes seconds. pip's own cache does not help on hosts whose package proxy sends no HTTP
    caching headers (this one): pip then downloads the ~3 GB again every time. uv is installed
    into the toolchain venv itself (it is on PyPI), and the user's pip configuration (indexes,
    find-links, constraints, certificate) is handed to it. If uv cannot be installed or fails,
    plain pip (which reads that configuration itself) does the install.
    """
    py = str(_venv_python(venv))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    installer = os.environ.get(INSTALLER_ENV_VAR, "uv").strip().lower()
    if installer not in ("uv", "pip"):
        raise FluxcError(f"{INSTALLER_ENV_VAR}={installer!r} is not valid; use uv or pip (or unset it)")
    if installer == "uv":
        try:
            _run_logged(pip + ["uv"], toolchain_root(), log, env, 900, "pip install uv", die_with_parent=True)
            settings = _pip_settings(venv, env)
            uv_env = dict(env)
            if settings.get("cert") and "SSL_CERT_FILE" not in uv_env:
                uv_env["SSL_CERT_FILE"] = settings["cert"]
            _run_logged([py, "-m", "uv", "pip", "install", "--python", py, *_uv_args(settings),
                         *spec.requirements, *spec.uv_pins],
                        toolchain_root(), log, uv_env, None, "uv pip install", append=True,
                        die_with_parent=True)
            return "uv"
        except ToolError as e:
            progress(f"      uv failed ({e.tool}, exit {e.returncode}; see {log}); installing with pip instead")
            with open(log, "ab") as f:
                f.write(b"\n[fluxc] uv failed; falling back to pip\n")
    _run_logged(pip + list(spec.requirements), toolchain_root(), log, env, None, "pip install",
                append=installer == "uv", die_with_parent=True)
    return "pip"


def _check_launch(venv: Path, spec: InstallSpec) -> None:
    """A compiled tool of tpu_mlir starts with the environment run_tool uses (this is what the
    glibc clash breaks: without the fix tpuc-opt dies with a segfault here)."""
    root = _site_packages(venv, spec) / "tpu_mlir"
    r = subprocess.run([str(root / "bin" / "tpuc-opt"), "--version"], capture_output=True, text=True,
                       env=_build_env(venv, spec), timeout=120, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent_fn())
    if r.returncode != 0:
        raise FluxcError(f"tpu_mlir's tpuc-opt does not start in {venv} (exit {r.returncode}; "
                         f"glibc clash?); not marking it complete: {(r.stderr or r.stdout).strip()[-300:]}")


def _fmt_versions(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items() if val)


# ---------------------------------------------------------------- smoke check

SMOKE_SHAPE = (1, 16)
SMOKE_OUT = 8
SMOKE_MIN_COSINE = 0.999
SMOKE_MAX_ABS = 0.05


def _build_smoke_model(work: Path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((SMOKE_SHAPE[1], SMOKE_OUT)) * 0.25).astype(np.float32)
    x = rng.standard_normal(SMOKE_SHAPE).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SMOKE_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SMOKE_SHAPE[0], SMOKE_OUT])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by the toolchain's older onnx
    onnx.checker.check_model(model)
    onnx.save(model, str(work / "smoke.onnx"))
    np.savez(work / "smoke_in.npz", x=x)
    return x, w


def smoke_check(progress: Callable[[str], None] = print, keep: bool = False) -> dict:
    """Compile a one-operator ONNX model (MatMul) with model_transform + model_deploy (BF16,
    bm1684x, the compiler checking itself on the simulator), run the bmodel on the chip
    simulator with model_runner and compare with numpy. Returns a dict with "ok",
    "max_abs_err", "cosine", per-step seconds and the work folder; raises ToolError if a tool
    fails and FluxcError if the result is wrong."""
    import numpy as np

    require_toolchain()
    work = Path(tempfile.mkdtemp(prefix="fluxc-smoke-"))
    steps: dict[str, float] = {}
    ok = False
    try:
        t = time.monotonic()
        progress("[1/4] building a one-operator ONNX model (MatMul 1x16 @ 16x8)")
        x, w = _build_smoke_model(work)
        ref = x @ w
        steps["build"] = time.monotonic() - t

        t = time.monotonic()
        progress("[2/4] model_transform (ONNX -> MLIR, checked against ONNX Runtime)")
        run_tool("model_transform", ["--model_name", "smoke", "--model_def", "smoke.onnx",
                                     "--input_shapes", f"[[{SMOKE_SHAPE[0]},{SMOKE_SHAPE[1]}]]",
                                     "--mlir", "smoke.mlir", "--test_input", "smoke_in.npz",
                                     "--test_result", "smoke_top.npz"],
                 cwd=work, log=work / "model_transform.log")
        steps["model_transform"] = time.monotonic() - t

        t = time.monotonic()
        progress("[3/4] model_deploy BF16 bm1684x (compiles, then checks itself on the simulator)")
        run_tool("model_deploy", ["--mlir", "smoke.mlir", "--quantize", "BF16", "--chip", "bm1684x",
                                  "--model", "smoke.bmodel", "--test_input", "smoke_in_f32.npz",
                                  "--test_reference", "smoke_top.npz", "--tolerance", "0.99,0.90"],
                 cwd=work, log=work / "model_deploy.log")
        steps["model_deploy"] = time.monotonic() - t

        t = time.monotonic()
        progress("[4/4] model_runner on the chip simulator, compared with numpy")
        run_tool("model_runner", ["--model", "smoke.bmodel", "--input", "smoke_in.npz", "--output", "out.npz"],
                 cwd=work, log=work / "model_runner.log")
        steps["model_runner"] = time.monotonic() - t
        with np.load(work / "out.npz") as out:
            if len(out.files) != 1:
                raise FluxcError(f"smoke check: expected one output in {work / 'out.npz'}, got {out.files}")
            y = out[out.files[0]].astype(np.float64).reshape(ref.shape)
        ref64 = ref.astype(np.float64)
        max_abs = float(np.abs(y - ref64).max())
        cosine = float((y * ref64).sum() / (np.linalg.norm(y) * np.linalg.norm(ref64) + 1e-30))
        ok = bool(cosine >= SMOKE_MIN_COSINE and max_abs <= SMOKE_MAX_ABS)
        result = {"ok": ok, "max_abs_err": max_abs, "cosine": cosine,
                  "max_abs_ref": float(np.abs(ref64).max()),
                  "seconds": {k: round(v, 2) for k, v in steps.items()},
                  "work_dir": str(work), "toolchain": str(toolchain_dir())}
        if not ok:
            raise FluxcError(f"smoke check: simulator output differs from numpy (max abs err {max_abs:.4g}, "
                             f"cosine {cosine:.6f}; need <= {SMOKE_MAX_ABS} and >= {SMOKE_MIN_COSINE}); "
                             f"files kept in {work}")
        return result
    finally:
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
