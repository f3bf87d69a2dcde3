"""A plain `pip install .` (a wheel, not the editable install) holds every module.

The wheel is built from the source tree and installed without -e into a fresh venv whose only
other packages are the project venv's dependencies (a .pth line, so nothing is downloaded);
the editable install of the project venv is not on that path (its finder is registered by a
.pth file of a site dir, which a .pth-added folder is not). Then `fluxc --help` and `fluxc tiny`
run from the wheel, from a folder outside the source tree.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_a_working_fluxc(tmp_path):
    # built from a copy without build/ or *.egg-info: setuptools would reuse stale files there
    src = shutil.copytree(REPO, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "demo", "models", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = wheels.glob("fluxc-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for folder, pkg in (("fluxc", "fluxc"), ("patches", "fluxc/patches"), ("runtime", "fluxc/runtime"),
                        ("validation", "fluxc/validation"), ("recipes", "fluxc/recipes")):
        for src in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in src.parts:
                assert f"{pkg}/{src.relative_to(REPO / folder).as_posix()}" in names, src
    assert "fluxc/recipes/bm1684x.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    sp = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
    (Path(sp) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(whl)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(py), "-c", "import fluxc.commands.compile, fluxc.runtime, fluxc.patches; "
                            "print(fluxc.__file__)"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    assert str(venv) in where.stdout, where.stdout  # the wheel's copy, not the source tree
    fluxc = venv / "bin" / "fluxc"
    h = subprocess.run([str(fluxc), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert h.returncode == 0 and "export" in h.stdout and "compile" in h.stdout, h.stderr[-2000:]
    t = subprocess.run([str(fluxc), "tiny", str(tmp_path / "tiny")], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=900)
    assert t.returncode == 0, t.stderr[-2000:]
    assert (tmp_path / "tiny" / "transformer" / "config.json").is_file()
