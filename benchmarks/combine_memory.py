"""Peak RSS of `model_tool --combine` for one combined file of a compiled build: the pieces a
compile_report.json lists for that file, combined again into a scratch folder (psutil, the whole
process tree, every 0.25 s). Size: whatever the build is; run on the full-size W4BF16 build of
benchmarks/full_size.py for the transformer file (6.6 GB).

    .venv/bin/python benchmarks/combine_memory.py /work/fs/run2/ws/BM1684X_w4bf16/compile_report.json \
        dev_w4bf16_transformer.bmodel --work /work/fs/comb

Results: benchmarks/results/combine_memory.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from results_file import write_results
from transform_memory import measured

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path)
    ap.add_argument("file", help="the combined file's name in the report's outputs")
    ap.add_argument("--work", type=Path, required=True)
    a = ap.parse_args()
    from fluxc.toolchain import require_toolchain, toolchain_env

    rep = json.loads(a.report.read_text())
    out = next(o for o in rep["outputs"] if o["file"] == a.file)
    files = [str(Path(rep["pieces"][p]["build_dir"]) / f"{p}.bmodel") for p in out["pieces"]]
    a.work.mkdir(parents=True, exist_ok=True)
    dst = a.work / a.file
    fig = measured([str(require_toolchain() / "bin" / "model_tool"), "--combine", *files, "-o", str(dst)],
                   a.work, a.work / "combine.log", toolchain_env())
    fig.update(file=a.file, pieces=len(files), output_gb=round(dst.stat().st_size / 1e9, 3),
               input_gb=round(sum(Path(f).stat().st_size for f in files) / 1e9, 3), report=str(a.report))
    dst.unlink()
    write_results(REPO / "benchmarks" / "results" / "combine_memory.json", fig)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
