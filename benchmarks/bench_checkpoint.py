"""Benchmark training checkpoints: cost of writing one, size, and time to resume.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py [--threads 1] [--epochs 4]``.
Prints figures only (no asserts): SPADE's experts at the scale of ``bench_experts.py``
(16 experts, 1280-d features, 785 genes) and mclSTExp on frozen features, each trained with no
checkpoints and with one every epoch; the checkpoint's size, the time to write one, and the time
a resumed run needs before its first epoch.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine
from bench_experts import synthetic

from sq_spade import settings
from sq_spade.train import fit_contrastive, fit_experts, read_checkpoint
from sq_spade.train._checkpoint import Checkpointer


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / 1e6


def timed_saves() -> tuple[list[float], object]:
    """Patch Checkpointer.end_epoch to record the seconds each write takes."""
    times: list[float] = []
    original = Checkpointer.end_epoch

    def end_epoch(self, *a, **kw):
        t0 = time.perf_counter()
        saved = original(self, *a, **kw)
        if saved:
            times.append(time.perf_counter() - t0)
        return saved

    Checkpointer.end_epoch = end_epoch
    return times, original


def bench(name: str, fit, epochs: int) -> None:
    t0 = time.perf_counter()
    fit(epochs=epochs)
    plain = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="sq_spade_bench_ckpt_"))
    try:
        times, original = timed_saves()
        try:
            t0 = time.perf_counter()
            fit(epochs=epochs, checkpoint_dir=tmp, checkpoint_every=1)
            with_ckpt = time.perf_counter() - t0
        finally:
            Checkpointer.end_epoch = original
        size = folder_mb(tmp)
        t0 = time.perf_counter()
        fit(epochs=epochs, checkpoint_dir=tmp, resume=True)  # finished run: load and return
        resume = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_checkpoint(tmp)
        read = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp)
    print(f"{name}: {epochs} epochs {plain:6.2f} s without checkpoints, {with_ckpt:6.2f} s with one "
          f"per epoch (+{100 * (with_ckpt - plain) / plain:4.1f}%); checkpoint {size:6.1f} MB, "
          f"write {np.median(times):5.2f} s (median of {len(times)}), read {read:5.2f} s, "
          f"resume of the finished run {resume:5.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings.progress = False
    print(machine())
    feats, genes, expert, _ = synthetic(args.n, 1280, 785, 16)
    print(f"data: {args.n} spots, 1280-d features, 785 genes")
    fit_experts(feats[:256], genes[:256], expert[:256] % 2, n_experts=2, epochs=1, device="cpu")  # warm-up

    def experts(**kw):
        return fit_experts(feats, genes, expert, n_experts=16, device="cpu", **kw)

    def mclstexp(**kw):
        return fit_contrastive(feats, genes, None, "self", device="cpu", patience=None, **kw)

    bench("SPADE experts (16)", experts, args.epochs)
    bench("mclSTExp (frozen)", mclstexp, args.epochs)


if __name__ == "__main__":
    main()
