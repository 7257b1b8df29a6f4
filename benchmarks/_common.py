"""Helpers shared by the benchmarks: data folder, machine description, RSS."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SQ_SPADE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
os.environ.setdefault("SQ_SPADE_DATA_DIR", str(DATA_DIR))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, {gpu}, python {platform.python_version()}, torch {torch.__version__}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux's ``VmHWM`` (high-water mark of this process's own address space) where available:
    ``getrusage``'s ``ru_maxrss`` of a subprocess starts at its parent's RSS at the time of the
    fork (the kernel carries it over exec), so a child of a parent that imported torch never
    reports less than about 500 MB.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: str | os.PathLike, figures: dict) -> None:
    """Write a benchmark's figures as JSON (read by ``run_all.py``), creating the folder."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1, default=float))


def run_child(code: str, env: dict | None = None) -> dict:
    """Run ``python -c code`` in a fresh process (its own peak RSS); return its ``RESULT {json}`` line."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
