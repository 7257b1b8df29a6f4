"""Execute the tutorial notebooks in place, so that the docs render them with their outputs.

The notebooks live in one place, ``docs/tutorials/``, where ``docs/tutorials.md`` lists them.
The docs render the committed notebooks as they are (``nb_execution_mode = "off"`` in
``docs/conf.py``), so building the docs needs neither data nor a GPU. This script is how those
outputs are produced: each notebook is run top to bottom with nbclient in a fresh ``python3``
kernel (the interpreter running this script), with a temporary working directory (files a
tutorial writes, such as a saved model, land there and are discarded), and written back with
its outputs.

Usage::

    .venv/bin/python scripts/execute_tutorials.py                 # all tutorials
    .venv/bin/python scripts/execute_tutorials.py 02_mclstexp_vs_references

The data folder is ``SQ_SPADE_DATA_DIR``, or ``../shared/data`` beside the clone when that
variable is unset (as in the Makefile).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The only copy of the tutorials: the folder the Sphinx build (myst-nb) reads.
TUTORIALS = ROOT / "docs" / "tutorials"


def data_dir() -> Path | None:
    """The data folder the kernels get: ``SQ_SPADE_DATA_DIR`` or ``../shared/data`` if present."""
    env = os.environ.get("SQ_SPADE_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    shared = ROOT.parent / "shared" / "data"
    return shared.resolve() if shared.is_dir() else None


def notebooks(names: list[str] | None = None) -> list[Path]:
    """Tutorial notebooks by name (``"01"``, stem, file name or path); all of ``docs/tutorials/`` by default."""
    found = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    out = []
    for name in names:
        p = Path(name)
        cands = [p] if p.suffix == ".ipynb" and p.exists() else [
            q for q in found if q.name == p.name or q.stem == p.stem or q.stem.startswith(f"{p.stem}_")]
        if not cands:
            raise SystemExit(f"No tutorial named {name!r}; available: {[q.stem for q in found]}")
        out.extend(cands)
    return out


def execute_notebook(nb: Any, *, cwd: str | os.PathLike, timeout: int = 1800, kernel_name: str = "python3",
                     env: dict[str, str] | None = None) -> Any:
    """Run every cell of ``nb`` (an nbformat notebook, modified in place) and return it.

    The kernel runs in ``cwd`` with ``env`` (default: this process's environment plus the data
    folder). A cell that raises stops the run with ``nbclient.exceptions.CellExecutionError``.
    ``python`` in the kernel spec is this interpreter (jupyter_client substitutes
    ``sys.executable``), so the kernel sees the same environment as the caller.
    """
    from nbclient import NotebookClient

    if env is None:
        env = dict(os.environ)
        d = data_dir()
        if d is not None:
            env["SQ_SPADE_DATA_DIR"] = str(d)
    # An inherited MPLBACKEND (Agg in a test run) would keep the kernel off the inline backend,
    # and no figure would reach the notebook.
    env = {k: v for k, v in env.items() if k != "MPLBACKEND"}
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, startup_timeout=120, record_timing=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=env)
    return nb


def run(path: Path, *, timeout: int) -> float:
    """Execute one notebook and write it back in place (atomically); returns seconds."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"sq_spade_{path.stem}_") as tmp:
        execute_notebook(nb, cwd=tmp, timeout=timeout)
    seconds = time.perf_counter() - t0
    tmp_path = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp_path)
    tmp_path.replace(path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns an exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tutorials to run (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default: 1800)")
    args = parser.parse_args(argv)
    paths = notebooks(args.names)
    print(f"data folder: {data_dir()}", flush=True)
    total = 0.0
    for p in paths:
        print(f"executing {p.relative_to(ROOT)} ...", flush=True)
        seconds = run(p, timeout=args.timeout)
        total += seconds
        print(f"  done in {seconds:.0f} s", flush=True)
    print(f"{len(paths)} notebook(s) in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
