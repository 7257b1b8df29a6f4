"""Benchmark SPADE's experts: stacked training vs a loop over separate heads, and routing.

Run: ``python benchmarks/bench_experts.py [--threads 2] [--epochs 100] [--loop-epochs 3]``.
Prints figures only (no asserts). Targets on 2 CPU cores: stacked training of 16 experts x 100
epochs on 10,000 spots (1280-d features, 785 genes) in <= 2 minutes; routing + embedding of
10,000 spots with 16 experts in < 1 s.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from sq_spade import settings
from sq_spade.nn.experts import ExpertHeads, MixtureOfExperts
from sq_spade.nn.heads import ProjectionHead
from sq_spade.nn.losses import bleep_loss
from sq_spade.train._common import cosine_schedule
from sq_spade.train._experts import fit_experts


def synthetic(n: int, d: int, n_genes: int, n_experts: int, seed: int = 0):
    """Clustered features (16 clusters), genes driven by a hidden factor shared with them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_experts, d)).astype(np.float32)
    expert = rng.integers(0, n_experts, size=n)
    hidden = rng.normal(size=(n, 16)).astype(np.float32)
    feats = centres[expert] + hidden @ rng.normal(size=(16, d)).astype(np.float32) \
        + rng.normal(size=(n, d)).astype(np.float32)
    genes = np.log1p(np.exp(hidden @ rng.normal(size=(16, n_genes)).astype(np.float32) * 0.3))
    return feats.astype(np.float32), genes.astype(np.float32), expert, centres


def loop_training(feats, genes, expert, n_experts, epochs, batch_size=128, seed=0):
    """Reference: a Python loop over separate (image, gene) ProjectionHead pairs."""
    torch.manual_seed(seed)
    x, g = torch.from_numpy(feats), torch.from_numpy(genes)
    steps = 0
    for e in range(n_experts):
        idx = torch.from_numpy(np.flatnonzero(expert == e))
        hi, hg = ProjectionHead(x.shape[1]), ProjectionHead(g.shape[1])
        opt = torch.optim.AdamW([*hi.parameters(), *hg.parameters()], lr=1e-4, weight_decay=1e-2)
        nb = math.ceil(len(idx) / batch_size)
        sched = cosine_schedule(opt, epochs * nb)
        for _ in range(epochs):
            perm = idx[torch.randperm(len(idx))]
            for b in range(nb):
                rows = perm[b * batch_size:(b + 1) * batch_size]
                loss = bleep_loss(hi(x[rows]), hg(g[rows]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                steps += 1
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--loop-epochs", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings.progress = False
    e = args.experts
    figs = {"n": args.n, "experts": e, "epochs": args.epochs, "threads": args.threads}
    feats, genes, expert, centres = synthetic(args.n, 1280, 785, e)
    print(f"data: {args.n} spots, 1280-d features, 785 genes, {e} experts; "
          f"torch {torch.__version__}, {args.threads} threads")

    # stacked, short run (same epochs as the loop) and the full run
    for epochs in (args.loop_epochs, args.epochs):
        t0 = time.perf_counter()
        _, _, hist = fit_experts(feats, genes, expert, n_experts=e, epochs=epochs, device="cpu")
        dt = time.perf_counter() - t0
        figs[f"stacked_{epochs}_epochs_s"] = dt
        joint_steps = epochs * int(np.ceil(np.bincount(expert).max() / 128))
        print(f"stacked  {epochs:4d} epochs: {dt:7.2f} s, {joint_steps / dt:6.1f} joint steps/s "
              f"({hist['steps'].sum() / dt:6.1f} expert-steps/s); "
              f"final train loss {np.nanmean(hist['train_loss'][-1]):.3f}")

    t0 = time.perf_counter()
    steps = loop_training(feats, genes, expert, e, args.loop_epochs)
    dt = time.perf_counter() - t0
    figs["loop_projected_s"] = dt * args.epochs / args.loop_epochs
    print(f"loop     {args.loop_epochs:4d} epochs: {dt:7.2f} s, {steps / dt:6.1f} expert-steps/s "
          f"(extrapolated to {args.epochs} epochs: {dt * args.epochs / args.loop_epochs:.0f} s)")

    # routing + embedding
    fine = np.concatenate([centres + np.random.default_rng(1).normal(size=centres.shape)
                           for _ in range(16)]).astype(np.float32)
    f2e = np.tile(np.arange(e), 16)
    moe = MixtureOfExperts(ExpertHeads(e, 1280), ExpertHeads(e, 785), torch.from_numpy(fine),
                           torch.from_numpy(f2e)).eval()
    x = torch.from_numpy(feats)
    with torch.inference_mode():
        moe.embed_images(x[:100])  # warm-up
        for name, kw in (("soft (T=0.1)", {}), ("soft, w>1e-6", {"min_weight": 1e-6}),
                         ("hard", {"hard": True})):
            t0 = time.perf_counter()
            moe.embed_images(x, **kw)
            figs[f"embed_{name.split()[0].strip(',')}{'_min_weight' if 'w>' in name else ''}_s"] = (
                time.perf_counter() - t0)
            print(f"route+embed {args.n} spots, {name:13s}: {time.perf_counter() - t0:6.3f} s")
        t0 = time.perf_counter()
        w = moe.route(x)
        t_route = time.perf_counter() - t0
        t0 = time.perf_counter()
        (w[:, :, None] * moe.image_heads.forward_all(x)).sum(1)
        print(f"routing alone: {t_route:6.3f} s; dense sum over all experts: "
              f"{time.perf_counter() - t0:6.3f} s; mean experts with non-zero weight per spot: "
              f"{float((w > 0).sum(1).float().mean()):.2f}")
        ex = moe.assign(x)
        for method in ("group", "gather"):
            t0 = time.perf_counter()
            moe.image_heads.forward_assigned(x, ex, method=method)
            print(f"forward_assigned method={method!r}: {time.perf_counter() - t0:6.3f} s")
    if args.json:
        from _common import machine, write_json

        figs["machine"] = machine()
        write_json(args.json, figs)


if __name__ == "__main__":
    main()
