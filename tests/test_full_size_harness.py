"""benchmarks/full_size.py's plumbing, on the tiny model (never at full size in the tests):
stages run as fluxc subprocesses, figures land in the JSON with the required keys, and a
second run skips the completed stages. The W4BF16 compile reuses the session compile cache
(the tiny schnell export with the tiny VAE is byte-identical to `export_schnell_tinyvae`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures_compile import REPO

HARNESS = REPO / "benchmarks" / "full_size.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HARNESS), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)


def test_full_size_harness_plumbing(tiny_schnell: Path, compiled_schnell_w4: Path, compile_build_dir: Path,
                                    tmp_path: Path) -> None:
    results = tmp_path / "full_size.json"
    args = [tiny_schnell, "--tiny", "--work", tmp_path / "work", "--results", results, "--builds", "w4bf16",
            "--build-dir", compile_build_dir]
    r = _run(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(results.read_text())
    assert res["commit"] and res["machine"]["cpus"] >= 1 and res["tiny"] is True
    assert res["size"] == {"height": 128, "width": 128, "t5_seq_len": 32}
    w = res["w4bf16"]
    for k in ("export_compile_wall_s", "peak_rss_gb", "peak_disk_gb", "device_mem_mb", "est_step_s"):
        assert k in w, k
    report = json.loads((tmp_path / "work" / "ws" / "BM1684X_w4bf16" / "compile_report.json").read_text())
    assert w["est_step_s"] == round(report["estimate_ms"]["denoising_step_ms"] / 1000, 4)
    # per chip: the combined files' device memory (model_tool) plus the sail runtime's I/O tensors
    total_mb = sum(o["memory"]["device"] for o in report["outputs"]) / (1 << 20)
    chip = report["device_memory"]["chips"][0]
    assert len(w["device_mem_mb"]) == 1 and w["device_mem_mb"][0] == round(chip["total_mb"], 1)
    assert chip["io_mb"] > 0 and w["device_mem_mb"][0] >= total_mb
    ex, co = res["stages"]["export"], res["stages"]["compile_w4bf16"]
    assert ex["complete"] and co["complete"] and ex["attempts"] == co["attempts"] == 1
    assert ex["wall_s"] > 0 and ex["rss_samples"] > 0
    # the export loads torch and the weights: well above 100 MB, and the tree figure >= the child's own
    assert 0.1 < ex["peak_rss_gb"] and ex["peak_rss_gb"] >= ex["ru_maxrss_gb"]
    # the tiny export's graphs (~2 MB); its weights are hard links into the checkpoint and cost no disk
    assert ex["du_gb"] >= 0.001
    assert w["export_compile_wall_s"] == round(ex["wall_s"] + co["wall_s"], 1)
    kinds = co["by_piece_kind"]
    assert kinds["schnell_trans_block"]["count"] == 3 and "clip_head" in kinds
    assert "bf16" not in res

    # a second run skips both completed stages and keeps their figures
    r2 = _run(args)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "export: complete, skipped" in r2.stdout and "compile_w4bf16: complete, skipped" in r2.stdout
    res2 = json.loads(results.read_text())
    assert res2["stages"] == res["stages"] and res2["w4bf16"] == w
