"""Feature speed: the bare Lite0 forward on ready tensors vs the whole path on her2st C2.

Whole path = image level -> patches -> DataLoader -> backbone -> ``obsm``, through
``sq_spade.pp.compute_features``, at the same batch size. Goal: >= 90 % of the bare forward's
images per second on CPU. Run: ``.venv/bin/python benchmarks/bench_features.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from _common import DATA_DIR, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    import torch

    import sq_spade as sqs
    from sq_spade._utils import resolve_device
    from sq_spade.nn.backbones import get_backbone
    from sq_spade.nn.inference import embed_batches

    sqs.settings.progress = False
    sqs.settings.data_dir = DATA_DIR
    dev = resolve_device(args.device)
    print("machine:", machine(), "| device:", dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = sqs.datasets.her2st("C2")
        n = sd.tables["table"].n_obs
        model = get_backbone(args.backbone)
        p = sqs.pp.patches(sd)
        ready = torch.as_tensor(p.batch(range(n)))  # uint8 patches already in memory
        batches = [ready[s: s + args.batch_size] for s in range(0, n, args.batch_size)]
        embed_batches(model, batches[:1], device=dev)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        embed_batches(model, batches, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        bare = n / (time.perf_counter() - t)
        t = time.perf_counter()
        sqs.pp.compute_features(sd, backbone=model, batch_size=args.batch_size, device=str(dev), cache=False,
                                num_workers=args.num_workers)
        whole = n / (time.perf_counter() - t)
    f = sd.tables["table"].obsm[f"X_{model.name}"]
    assert np.isfinite(f).all()
    print(f"{model.name}, batch {args.batch_size}, {n} spots of her2st C2 (224 px at 0.5 um/px):")
    print(f"  bare forward on ready tensors : {bare:8.1f} img/s")
    print(f"  whole path (image -> obsm)    : {whole:8.1f} img/s (level load included)")
    print(f"  ratio                         : {whole / bare:8.1%} (goal >= 90 %)")
    if args.json:
        write_json(args.json, {"machine": machine(), "device": str(dev), "backbone": model.name,
                               "batch_size": args.batch_size, "n": n, "bare_img_per_s": bare,
                               "whole_img_per_s": whole, "ratio": whole / bare})


if __name__ == "__main__":
    main()
