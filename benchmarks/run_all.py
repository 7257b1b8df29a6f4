"""Run the benchmarks of the results page and write the page (``docs/results.md``).

One command regenerates the page from scratch on the shared data (``SQ_SPADE_DATA_DIR``, by
default ``../shared/data`` beside the clone)::

    .venv/bin/python benchmarks/run_all.py          # or: make bench

Each benchmark runs in its own process (so each peak RSS is its own) and leaves its figures as
JSON / CSV in ``docs/_static/results/data/``; the page is then rendered from those files with
tables, plots (drawn with ``sq_spade.pl`` where one fits), the machine, the versions, the seeds
and the date. ``--only STEP ...`` re-runs some steps and re-renders with the others' saved
figures; ``--render`` only re-renders. A failing step is reported on the page and makes the
command exit non-zero; the other steps still run.

Steps: ``patches``, ``features``, ``experts``, ``scaling``, ``accuracy`` (the splits of
``_data.SPLIT_TITLES``), ``few_shot``, ``figures``. About 30 minutes on 2 CPU cores (26 min
measured). The other scripts of this folder (big slides, the feature store, checkpoints, DDP,
the validation grid) run on their own: ``benchmarks/README.md`` says what each measures and how
to run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _data import SPLIT_TITLES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "docs" / "_static" / "results"
DATA = OUT / "data"


def steps(seeds: list[str]) -> dict[str, list[str]]:
    """Command line (after the interpreter) of every step, in the order they run."""
    return {
        "patches": ["bench_patches.py", "--json", str(DATA / "patches.json")],
        "features": ["bench_features.py", "--json", str(DATA / "features.json")],
        "experts": ["bench_experts.py", "--json", str(DATA / "experts.json")],
        "scaling": ["bench_scaling.py", "--json", str(DATA / "scaling.json")],
        "accuracy": ["bench_accuracy.py", "--split", *SPLIT_TITLES, "--seeds", *seeds, "--control",
                     "--out", str(DATA / "accuracy.csv"), "--per-gene-out", str(DATA / "accuracy_genes.csv")],
        "few_shot": ["bench_few_shot.py", "--json", str(DATA / "few_shot.json")],
        "figures": ["report_figures.py", "--out", str(OUT)],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, help="run only these steps")
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="seeds of the accuracy benchmark")
    ap.add_argument("--render", action="store_true", help="only render the page from saved figures")
    ap.add_argument("--page", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    all_steps = steps(args.seeds)
    unknown = sorted(set(args.only or []) - set(all_steps))
    if unknown:
        ap.error(f"--only: unknown steps {unknown}; choose from {list(all_steps)}")
    DATA.mkdir(parents=True, exist_ok=True)
    log_path = DATA / "runs.json"
    runs = json.loads(log_path.read_text()) if log_path.exists() else {}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), PYTHONUNBUFFERED="1")
    if not args.render:
        for name, cmd in all_steps.items():
            if args.only and name not in args.only:
                continue
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            with open(DATA / f"{name}.log", "w") as log:
                rc = subprocess.run([sys.executable, *cmd], cwd=HERE, env=env, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - t0
            runs[name] = {"rc": rc, "wall_s": round(wall, 1), "command": "python benchmarks/" + " ".join(
                Path(c).relative_to(ROOT).as_posix() if c.startswith(str(ROOT)) else c for c in cmd),
                "finished": datetime.now(UTC).isoformat(timespec="seconds")}
            print(f"   {'ok' if rc == 0 else f'FAILED (exit {rc}), see ' + str(DATA / (name + '.log'))} "
                  f"in {wall:.0f} s", flush=True)
            log_path.write_text(json.dumps(runs, indent=1))
    from _report import render

    page = render(DATA, OUT, runs, seeds=[int(s) for s in args.seeds])
    Path(args.page).write_text(page)
    print(f"wrote {args.page}")
    return int(any(r["rc"] != 0 for r in runs.values()))


if __name__ == "__main__":
    sys.exit(main())
