"""The isolated TPU-MLIR toolchain: real installs, real tools, real simulator (no mocks)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fluxc.errors import FluxcError, ToolError
from fluxc.toolchain import require_toolchain, run_tool, toolchain_env, toolchain_python, toolchain_version
from fluxc.toolchain.install import install, installed_versions
from fluxc.toolchain.installed import MARKER_NAME, state, toolchain_dir, tpu_mlir_root
from fluxc.toolchain.process import LOG_TAIL_LINES, run_logged
from fluxc.toolchain.python310 import find_python310
from fluxc.toolchain.smoke import SMOKE_MAX_ABS, SMOKE_MIN_COSINE, smoke_check
from fluxc.toolchain.spec import DEFAULT_SPEC, TORCH_VERSION, TPU_MLIR_VERSION, InstallSpec

REPO = Path(__file__).resolve().parents[1]

# A tiny install spec, to exercise the install machinery quickly and more than once (damaged
# marker, no-op, concurrent installs, the pip installer) in temp caches. Same code path
# (lock, Python 3.10 discovery, wipe of an untrusted folder, venv, uv/pip, import check,
# marker written last); only the package list differs. The repair of a half-installed REAL
# toolchain is tested once too (test_install_repairs_half_installed_real_toolchain): with the
# uv wheel cache warmed by the session install it takes about a minute and, the files being
# hard links into that cache, little extra disk.
TINY_SPEC = InstallSpec(name="fluxc-test-tiny", requirements=("psutil",), imports=("psutil",),
                        report=("psutil",), tpu_mlir=False)


def _cli(args: list[str], env_extra: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "fluxc.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def installed_toolchain() -> Path:
    """The real toolchain, installed through the API if needed (the first run installs it)."""
    return install(progress=lambda s: print(s, flush=True))


@pytest.fixture(scope="session")
def smoke_result(installed_toolchain):
    """One real smoke check per session; its files (bmodel, input) are kept for other tests."""
    result = smoke_check(progress=lambda s: print(s, flush=True), keep=True)
    yield result
    shutil.rmtree(result["work_dir"], ignore_errors=True)


def test_smoke_check_passes(smoke_result):
    result = smoke_result
    assert result["ok"] is True
    assert result["cosine"] >= SMOKE_MIN_COSINE
    assert result["max_abs_err"] <= SMOKE_MAX_ABS
    work = Path(result["work_dir"])
    assert (work / "smoke.bmodel").stat().st_size > 0
    # model_deploy compared the simulator with the MLIR reference itself
    assert "npz compare PASSED" in (work / "model_deploy.log").read_text()


def test_api_surface(installed_toolchain):
    assert require_toolchain() == installed_toolchain
    py = toolchain_python()
    env = toolchain_env()
    assert env["PATH"].split(os.pathsep)[0] == str(installed_toolchain / "bin")
    ld = env["LD_LIBRARY_PATH"].split(os.pathsep)
    root = tpu_mlir_root()
    assert ld[:3] == [str(root / "lib"), str(root / "lib" / "capi"), str(root / "lib" / "third_party")]
    assert toolchain_version() == f"tpu_mlir-{TPU_MLIR_VERSION}"
    # A long-lived worker started with this env can import the simulator runtime and the
    # tool modules, and a shell spawned from it works (the glibc clash breaks exactly that).
    code = ("import sys, subprocess, pyruntime_bm, model_runner; "
            "print(sys.version_info[:2]); "
            "print(subprocess.run(['sh', '-c', 'echo shell-ok'], capture_output=True, text=True).stdout)")
    r = subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(3, 10)" in r.stdout and "shell-ok" in r.stdout
    # the installed package was not edited: the bundled glibc files are still in place
    for name in ("libc.so.6", "libm.so.6", "libpthread.so.0"):
        assert (root / "lib" / "third_party" / name).exists()
    versions = installed_versions()
    assert versions["tpu_mlir"] == TPU_MLIR_VERSION
    assert versions["torch"] == TORCH_VERSION
    assert versions["python"].startswith("3.10.")


def test_second_install_is_noop(installed_toolchain):
    lines: list[str] = []
    marker_before = (installed_toolchain / MARKER_NAME).read_text()
    assert install(progress=lines.append) == installed_toolchain
    assert lines == [f"toolchain already installed at {installed_toolchain}"]
    assert (installed_toolchain / MARKER_NAME).read_text() == marker_before


def test_run_tool_failure_raises_with_log_tail(installed_toolchain, tmp_path):
    log = tmp_path / "transform.log"
    with pytest.raises(ToolError) as ei:
        run_tool("model_transform", ["--model_name", "nope", "--model_def", "missing.onnx",
                                     "--input_shapes", "[[1,4]]", "--mlir", "nope.mlir"],
                 cwd=tmp_path, log=log)
    err = ei.value
    assert err.tool == "model_transform"
    assert err.returncode != 0
    assert "missing.onnx" in " ".join(err.argv)
    assert log.exists() and err.tail.strip()
    assert err.tail.strip().splitlines()[-1] in log.read_text()
    assert len(err.tail.splitlines()) <= LOG_TAIL_LINES + 1
    assert "model_transform failed" in str(err)


def test_run_tool_unknown_tool(installed_toolchain, tmp_path):
    with pytest.raises(FluxcError, match="unknown TPU-MLIR tool"):
        run_tool("no_such_tool", [], cwd=tmp_path, log=tmp_path / "x.log")


def test_run_tool_parallel_simulator_runs(smoke_result, tmp_path):
    """Several model_runner calls at once (distinct cwd each) on one bmodel all give the
    right answer: model_runner switches libcmodel.so symlinks under /tmp/cmodel_so.lock."""
    work = Path(smoke_result["work_dir"])
    x = np.load(work / "smoke_in.npz")["x"]
    import onnx
    from onnx import numpy_helper
    w = numpy_helper.to_array(onnx.load(str(work / "smoke.onnx")).graph.initializer[0])
    ref = x @ w
    errors: list[BaseException] = []

    def one(i: int) -> None:
        d = tmp_path / f"run{i}"
        try:
            run_tool("model_runner", ["--model", work / "smoke.bmodel", "--input", work / "smoke_in.npz",
                                      "--output", d / "out.npz"], cwd=d, log=d / "run.log")
            with np.load(d / "out.npz") as out:
                y = out[out.files[0]].reshape(ref.shape)
            assert np.abs(y - ref).max() <= SMOKE_MAX_ABS
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_missing_python310_env_is_one_line_error(tmp_path):
    r = _cli(["toolchain", "install"], {"FLUXC_PYTHON310": str(tmp_path / "no-such-python"),
                                        "FLUXC_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "FLUXC_PYTHON310" in lines[0]
    assert "Traceback" not in r.stderr


def test_wrong_version_python310_env_is_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXC_PYTHON310", sys.executable)  # the project venv: Python 3.11
    with pytest.raises(FluxcError, match="not a usable Python 3.10"):
        find_python310()


def test_status_reports_half_installed_folder(tmp_path):
    """A folder for the real spec without a completion marker is reported incomplete."""
    cache = tmp_path / "cache"
    half = cache / "toolchain" / DEFAULT_SPEC.folder_name
    (half / "bin").mkdir(parents=True)
    (half / "bin" / "python").symlink_to(sys.executable)
    r = _cli(["toolchain", "status"], {"FLUXC_CACHE": str(cache)})
    assert r.returncode != 0
    assert "incomplete" in r.stderr and "fluxc toolchain install" in r.stderr, r.stderr
    # and a marker for another spec is not trusted either
    (half / MARKER_NAME).write_text(json.dumps({"format": 1, "spec_hash": "0" * 64}))
    r = _cli(["toolchain", "status"], {"FLUXC_CACHE": str(cache)})
    assert r.returncode != 0 and "incomplete" in r.stderr
    r = _cli(["toolchain", "status"], {"FLUXC_CACHE": str(tmp_path / "empty")})
    assert r.returncode != 0 and "not installed" in r.stderr


def test_install_repairs_half_installed_real_toolchain(installed_toolchain, tmp_path, monkeypatch):
    """A half-installed real toolchain (what an install killed during pip leaves) is reported
    incomplete by status and rebuilt, not trusted, by install."""
    cache = tmp_path / "cache"
    half = cache / "toolchain" / DEFAULT_SPEC.folder_name
    (half / "bin").mkdir(parents=True)
    (half / "bin" / "python").symlink_to(sys.executable)
    (half / "leftover-from-interrupted-install").write_text("x")
    try:
        r = _cli(["toolchain", "status"], {"FLUXC_CACHE": str(cache)})
        assert r.returncode != 0 and "incomplete" in r.stderr, r.stderr
        r = _cli(["toolchain", "install"], {"FLUXC_CACHE": str(cache)}, timeout=1800)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "removing incomplete toolchain folder" in r.stdout, r.stdout
        assert not (half / "leftover-from-interrupted-install").exists()
        monkeypatch.setenv("FLUXC_CACHE", str(cache))
        assert state() == "ok"
        assert installed_versions()["tpu_mlir"] == TPU_MLIR_VERSION
        r = _cli(["toolchain", "status", "--no-smoke"], {"FLUXC_CACHE": str(cache)})
        assert r.returncode == 0 and "tpu_mlir 1.30.2" in r.stdout, r.stderr
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_install_repairs_half_installed_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXC_CACHE", str(tmp_path / "cache"))
    venv = toolchain_dir(TINY_SPEC)
    # what an install killed during pip leaves behind: a venv-looking folder, no marker
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (venv / "leftover-from-interrupted-install").write_text("x")
    assert state(TINY_SPEC) == "incomplete"
    with pytest.raises(FluxcError, match="not installed \\(or incomplete\\)"):
        require_toolchain(TINY_SPEC)

    lines: list[str] = []
    assert install(progress=lines.append, spec=TINY_SPEC) == venv
    assert any("removing incomplete toolchain folder" in ln for ln in lines), lines
    assert not (venv / "leftover-from-interrupted-install").exists()
    assert state(TINY_SPEC) == "ok"
    marker = json.loads((venv / MARKER_NAME).read_text())
    assert marker["spec_hash"] == TINY_SPEC.hash and marker["versions"]["psutil"]
    assert marker["versions"]["python"].startswith("3.10.")
    assert marker["installer"] == "uv"  # the default installer (the pip one: next test)

    # second install: a no-op
    lines.clear()
    install(progress=lines.append, spec=TINY_SPEC)
    assert lines == [f"toolchain already installed at {venv}"]

    # a damaged marker makes it untrusted again (install would wipe and rebuild it, as above)
    (venv / MARKER_NAME).write_text("{not json")
    assert state(TINY_SPEC) == "incomplete"
    with pytest.raises(FluxcError, match="not installed \\(or incomplete\\)"):
        require_toolchain(TINY_SPEC)


def test_concurrent_installs_serialise(tmp_path):
    """Two processes installing the same spec at once: both succeed, one venv, one marker.
    Uses the plain pip installer (the fallback when uv cannot be bootstrapped)."""
    cache = tmp_path / "cache"
    code = ("import sys; from fluxc.toolchain.install import install; sys.path.insert(0, %r); "
            "from tests.test_toolchain import TINY_SPEC; "
            "print(install(progress=lambda s: print(s, flush=True), spec=TINY_SPEC))" % str(REPO))
    env = dict(os.environ, FLUXC_CACHE=str(cache), FLUXC_TOOLCHAIN_INSTALLER="pip")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    both = "\n".join(outs)
    assert both.count("[5/5] toolchain ready") == 1, both
    assert "already installed" in both
    assert "installed with pip" in both
    marker = json.loads((cache / "toolchain" / TINY_SPEC.folder_name / MARKER_NAME).read_text())
    assert marker["installer"] == "pip"


def test_model_deploy_outside_mlir_folder_is_refused(installed_toolchain, tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(FluxcError, match="folder holding the .mlir"):
        run_tool("model_deploy", ["--mlir", "sub/x.mlir", "--quantize", "BF16", "--chip", "bm1684x",
                                  "--model", "x.bmodel"], cwd=tmp_path, log=tmp_path / "d.log")


def test_killed_install_is_not_trusted(tmp_path):
    """kill -9 of an install in the middle of its package step leaves a folder that is reported
    incomplete (no marker), and no orphaned pip/uv keeps writing into it."""
    cache = tmp_path / "cache"
    code = ("import sys; from fluxc.toolchain.install import install; sys.path.insert(0, %r); "
            "from tests.test_toolchain import TINY_SPEC; "
            "install(progress=lambda s: print(s, flush=True), spec=TINY_SPEC)" % str(REPO))
    env = dict(os.environ, FLUXC_CACHE=str(cache))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, cwd=REPO)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("[3/5]"):
            break
    p.kill()
    p.wait(timeout=60)
    assert any(ln.startswith("[3/5]") for ln in seen), seen
    venv = cache / "toolchain" / TINY_SPEC.folder_name
    time.sleep(2)
    orphans = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(venv).encode() in (proc / "cmdline").read_bytes():
                    orphans.append(proc.name)
            except OSError:
                pass
    assert not orphans, f"processes still working in {venv}: {orphans}"
    old = os.environ.get("FLUXC_CACHE")
    os.environ["FLUXC_CACHE"] = str(cache)
    try:
        assert venv.exists() and not (venv / MARKER_NAME).exists()
        assert state(TINY_SPEC) == "incomplete"
    finally:
        if old is None:
            os.environ.pop("FLUXC_CACHE")
        else:
            os.environ["FLUXC_CACHE"] = old


def test_run_tool_timeout_kills_the_whole_tool(installed_toolchain, tmp_path):
    """On timeout the tool and the processes it started (model_transform re-launches python)
    are killed, and ToolError says so."""
    marker = str(tmp_path / "timeout-probe.onnx")
    with pytest.raises(ToolError) as ei:
        run_tool("model_transform", ["--model_name", "t", "--model_def", marker,
                                     "--input_shapes", "[[1,4]]", "--mlir", "t.mlir"],
                 cwd=tmp_path, log=tmp_path / "t.log", timeout=1.5)
    assert "timed out" in ei.value.tail
    time.sleep(1)
    left = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and _cmdline_has(d, marker)]
    assert not left, f"tool processes left running: {left}"


def _cmdline_has(proc_dir: Path, text: str) -> bool:
    try:
        return text.encode() in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


# ---------------------------------------------------------------- the tool launcher (no TPU-MLIR needed)
SLEEP = "sleep\x00"  # matches the sleep processes' own argv only (not the shell's or the driver's)


def _alive_cmd(text: str) -> list[str]:
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _cmdline_has(d, text):
            try:
                if "\nState:\tZ" not in (d / "status").read_text():
                    left.append(d.name)
            except OSError:
                pass
    return left


def test_launcher_passes_env_and_exit_code_and_cleans_the_group(tmp_path):
    env = {**os.environ, "FLUXC_LAUNCHER_PROBE": "bar"}
    run_logged(["/bin/sh", "-c", 'test "$FLUXC_LAUNCHER_PROBE" = bar && pwd'], tmp_path, tmp_path / "a.log",
               env, None, "probe", guarded=True)
    assert str(tmp_path) in (tmp_path / "a.log").read_text()
    with pytest.raises(ToolError) as ei:
        run_logged(["/bin/sh", "-c", "echo out; exit 3"], tmp_path, tmp_path / "b.log", env, None, "probe",
                   guarded=True)
    assert ei.value.returncode == 3 and "out" in ei.value.tail
    # a tool that exits but leaves a background child: the child goes with it
    run_logged(["/bin/sh", "-c", "sleep 1041.5 & exit 0"], tmp_path, tmp_path / "c.log", env, None,
               "probe", guarded=True)
    time.sleep(0.5)
    assert not _alive_cmd(SLEEP + "1041.5")


def test_launcher_kills_the_tool_tree_when_fluxc_is_killed(tmp_path):
    """kill -9 of the process that ran the tool: the tool and its children die too (before the
    launcher, they were re-parented to init and kept running)."""
    code = ("import os, sys; from pathlib import Path; from fluxc.toolchain.process import run_logged; "
            "run_logged(['/bin/sh', '-c', 'sleep 1042.5 & sleep 1043.5; :'], Path(sys.argv[1]), "
            "Path(sys.argv[1]) / 't.log', dict(os.environ), None, 'probe', guarded=True)")
    driver = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO)
    try:
        for _ in range(200):
            if _alive_cmd(SLEEP + "1042.5") and _alive_cmd(SLEEP + "1043.5"):
                break
            time.sleep(0.05)
        assert _alive_cmd(SLEEP + "1042.5") and _alive_cmd(SLEEP + "1043.5"), "the probe tool did not start"
        driver.kill()  # SIGKILL: no Python clean-up runs in the driver
        driver.wait(timeout=10)
        for _ in range(50):
            if not _alive_cmd(SLEEP + "1042.5") and not _alive_cmd(SLEEP + "1043.5"):
                break
            time.sleep(0.1)
        assert not _alive_cmd(SLEEP + "1042.5") and not _alive_cmd(SLEEP + "1043.5"), "tool processes outlived their fluxc"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _alive_cmd(SLEEP + "1042.5") + _alive_cmd(SLEEP + "1043.5"):  # never leak the probes
            os.kill(int(pid), 9)
