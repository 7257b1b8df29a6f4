"""Example and benchmark: mclSTExp with a trainable image encoder, one process or under torchrun.

Run (synthetic patches; the same command works with 1 or N processes)::

    python benchmarks/bench_ddp.py --out /tmp/ddp1
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 benchmarks/bench_ddp.py --out /tmp/ddp2
    python benchmarks/bench_ddp.py --compare /tmp/ddp1 /tmp/ddp2
    # GPUs (nccl, one process per GPU; "auto" picks cuda:<LOCAL_RANK>):
    torchrun --nproc_per_node=4 benchmarks/bench_ddp.py --backbone efficientnet_lite0 --px 224

Rank 0 prints the seconds per epoch and the losses, and writes the trained weights
(``weights.safetensors``) and the history into ``--out``; ``--compare`` prints the largest
difference between two such runs (DDP reproduces the single-process weights up to rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sq_spade import settings
from sq_spade._utils import process_rank
from sq_spade.train import fit_contrastive


class ConvNet(nn.Module):
    """A small CNN (GroupNorm: exact under DDP on CPU too, unlike BatchNorm)."""

    def __init__(self, width: int = 32, dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            nn.Conv2d(width, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


class Patches(torch.utils.data.Dataset):
    """uint8 (px, px, 3) patches whose colour and texture follow a hidden factor."""

    def __init__(self, z: np.ndarray, px: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.base = (np.tanh(z[:, :3]) * 90 + 128).astype(np.float32)
        self.noise = rng.normal(scale=20, size=(64, px, px, 3)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.clip(self.base[i] + self.noise[i % 64], 0, 255).astype(np.uint8)


def data(n: int, n_genes: int, px: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    expr = np.log1p(np.exp(z @ rng.normal(size=(4, n_genes)))).astype(np.float32)
    pos = rng.integers(0, 30, size=(n, 2))
    return Patches(z, px, seed), expr, pos


def train(args: argparse.Namespace) -> None:
    settings.progress = False
    if args.backbone == "conv":
        torch.manual_seed(0)
        encoder: nn.Module = ConvNet()
        preprocess = None
    else:
        from sq_spade.nn.backbones import get_backbone
        from sq_spade.nn.inference import resize_preprocess

        encoder = get_backbone(args.backbone)
        preprocess = resize_preprocess(int(encoder.input_size), args.px)
    n_val = args.spots // 5
    images, expr, pos = data(args.spots + n_val, args.genes, args.px)
    train_rows, val_rows = np.arange(args.spots), np.arange(args.spots, args.spots + n_val)
    tr = torch.utils.data.Subset(images, train_rows.tolist())
    va = torch.utils.data.Subset(images, val_rows.tolist())
    t0 = time.perf_counter()
    fit = fit_contrastive(None, expr[train_rows], pos[train_rows], "self", images=tr,
                          image_encoder=encoder, val_expr=expr[val_rows], val_pos=pos[val_rows],
                          val_images=va, preprocess=preprocess, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, finetune="all", augment=True, patience=None,
                          num_workers=args.workers, device=args.device)
    seconds = time.perf_counter() - t0
    h = fit.history
    if process_rank() != 0:
        return
    print(f"processes {h['world_size']}  threads/process {torch.get_num_threads()}  "
          f"spots {args.spots}  px {args.px}  epochs {h['n_epochs']}  "
          f"{seconds / h['n_epochs']:.2f} s/epoch (incl. validation, first epoch included)")
    print("train loss", np.round(h["train_loss"], 5).tolist())
    print("val loss  ", np.round(h["val_loss"], 5).tolist())
    if args.out:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        mods = {"head": fit.image_head, "spot": fit.spot_encoder, "encoder": fit.image_encoder}
        save_file({f"{k}.{n}": t.contiguous() for k, m in mods.items()
                   for n, t in m.state_dict().items()}, str(out / "weights.safetensors"))
        (out / "history.json").write_text(json.dumps(
            {k: np.asarray(h[k]).tolist() for k in ("train_loss", "val_loss")}))


def compare(a: str, b: str) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(f"{a}/weights.safetensors"), load_file(f"{b}/weights.safetensors")
    diff = {k: float((wa[k].double() - wb[k].double()).abs().max()) for k in wa
            if wa[k].is_floating_point()}
    worst = max(diff, key=diff.get)
    scale = float(wa[worst].abs().max())
    print(f"{len(diff)} tensors; largest difference {diff[worst]:.3g} in {worst} "
          f"(its largest value {scale:.3g})")
    ha, hb = (json.loads(Path(p, "history.json").read_text()) for p in (a, b))
    print("val loss", ha["val_loss"], "\n        ", hb["val_loss"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spots", type=int, default=1024, help="training spots")
    ap.add_argument("--px", type=int, default=64, help="patch side in pixels")
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone", default="conv", help="'conv' (built in) or a registry name")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        compare(*args.compare)
    else:
        train(args)
        if "WORLD_SIZE" in os.environ and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
