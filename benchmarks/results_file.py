"""Where a benchmark's figures go: benchmarks/results/<name>.json, headed by the benchmark's
name and the commit it ran at, written under a temporary name and then renamed (a killed
run never leaves a half-written file). Import it from a script in benchmarks/ (the
script's folder is on sys.path)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit(short: bool = True) -> str:
    """The commit the benchmarks folder is at, short or full ("" outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip()


def write_results(path: Path, doc: dict) -> None:
    """{"benchmark": path's stem, "commit": ..., **doc} as JSON at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": path.stem, "commit": git_commit(), **doc}, indent=2) + "\n")
    tmp.replace(path)


def add_work_args(ap) -> None:
    """The options every piece-compiling benchmark shares: its kept work folder, the T5 length and
    --render (print the results file as markdown and stop)."""
    from pathlib import Path as _Path

    ap.add_argument("--work", type=_Path, default=None, help="work folder (kept; a re-run reuses it); required "
                    "unless --render")
    ap.add_argument("--t5-len", type=int, default=512)
    ap.add_argument("--render", action="store_true", help="print the results file as markdown and stop")


def rendered_or_work(ap, a, path: Path, render) -> bool:
    """True when --render printed the results file at `path` (the caller stops); otherwise --work
    must be given (argparse's error)."""
    if a.render:
        print(render(json.loads(path.read_text())))
        return True
    if a.work is None:
        ap.error("--work is required (a folder for the pieces' logs, MLIR and profiles)")
    return False
