"""Multi-process training under ``torchrun`` (DistributedDataParallel) for mclSTExp.

How :func:`sq_spade.train.fit_contrastive` splits the work so that ``N`` processes reproduce a
single-process run (the same weights up to float reduction order, not only the same quality):

- every process draws the same global permutation (same seed) and walks the same global
  batches of ``batch_size`` spots;
- the image encoder (the expensive part) runs on each process's contiguous slice of the global
  batch (:meth:`DistributedContext.shard`); its features are all-gathered *with gradient*
  (:meth:`DistributedContext.gather`) so that every process holds the whole batch;
- the image head and the spot encoder then run on the whole batch on every process, and every
  process computes the full-batch loss. The contrastive loss is not a sum over spots and the
  spot encoder's attention may span the whole batch (``context=None``), so this is what makes
  both exact; they are small next to an image encoder. Dropout masks are drawn as in a single
  process, from the same RNG stream;
- gradients: the gather's backward sums the (identical) gradients of all ``N`` processes, so the
  encoder's local gradient is ``N`` times its slice's share; DistributedDataParallel averages
  over processes, which gives exactly the single-process gradient for the encoder, and for the
  head and spot encoder (identical on every process) the same gradient again;
- a global batch smaller than the number of processes (a last, short batch) is not split: every
  process encodes it whole;
- validation batches are split and gathered the same way; the losses are broadcast from rank 0
  so that early stopping decides the same on every process, and the final weights are
  broadcast from rank 0 so that every process returns the same model.

What stays per process: BatchNorm layers of a *trainable* encoder normalise with the statistics
of the process's slice, unless the device is CUDA, where they are converted to
:class:`torch.nn.SyncBatchNorm` for the run (full-batch statistics, exact) and converted back
after; on CPU (gloo) there is no SyncBatchNorm and a warning says so. Augmentations are seeded
per (seed, epoch, spot), so they do not depend on which process loads a patch.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a ``torchrun`` job, and the collectives training needs.

    ``enabled=False`` (a single process) turns every method into a no-op.

    Examples
    --------
    >>> ctx = DistributedContext(enabled=True, rank=1, world_size=2)
    >>> ctx.shard(torch.arange(5)).tolist()  # the second contiguous part of a global batch
    [2, 3, 4]
    >>> ctx.shard(torch.arange(1)).tolist()  # fewer spots than processes: not split
    [0]
    """

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    # --- splitting a global batch -------------------------------------------------------------
    def splits(self, n: int) -> bool:
        """Whether a global batch of ``n`` rows is split across processes."""
        return self.enabled and n >= self.world_size

    def sizes(self, n: int) -> list[int]:
        """Rows of each process's part of a global batch of ``n`` rows."""
        return [(r + 1) * n // self.world_size - r * n // self.world_size
                for r in range(self.world_size)]

    def shard(self, batch: Tensor) -> Tensor:
        """The contiguous part of a global batch for this process (the whole batch if not split)."""
        n = len(batch)
        if not self.splits(n):
            return batch
        return batch[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]

    def gather(self, x: Tensor, n: int) -> Tensor:
        """Concatenate every process's ``x`` (its part of a global batch of ``n`` rows), in order.

        Differentiable: the backward pass sums the gradients of all processes into each part.
        Parts may differ by a row; they are padded with zeros for the collective and trimmed.
        """
        if not self.splits(n):
            return x
        from torch.distributed.nn.functional import all_gather

        sizes = self.sizes(n)
        pad = max(sizes) - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        with warnings.catch_warnings():
            # deprecated in torch 2.14 for a private module; it works on gloo and nccl alike
            # from torch 2.4 on, and its backward is the reduce-scatter we need
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated",
                                    category=FutureWarning)
            parts = all_gather(x)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    # --- modules ------------------------------------------------------------------------------
    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` (if it trains)."""
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    @staticmethod
    def unwrap(*wrapped: nn.Module) -> None:
        """Detach DistributedDataParallel's gradient hooks, so the modules train alone again."""
        from torch.nn.parallel import DistributedDataParallel

        for m in wrapped:
            if isinstance(m, DistributedDataParallel) and hasattr(m, "_remove_autograd_hooks"):
                m._remove_autograd_hooks()

    def broadcast(self, *modules: nn.Module | None, buffers_only: bool = False) -> None:
        """Overwrite the modules' parameters (and buffers) with rank 0's, in place."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for m in modules:
                if m is None:
                    continue
                tensors = list(m.buffers()) + ([] if buffers_only else list(m.parameters()))
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def agree(self, *values: float) -> list[float]:
        """Rank 0's values on every process (so that decisions match everywhere)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    @contextlib.contextmanager
    def synced_batchnorm(self, module: nn.Module | None, trainable: bool) -> Iterator[None]:
        """Within the block, ``module``'s BatchNorm layers are SyncBatchNorm (distributed CUDA).

        The original layers are put back after, holding the trained statistics, so the caller
        gets its module back as it came. Elsewhere (CPU: no SyncBatchNorm) nothing changes.
        """
        bns = [] if (module is None or not trainable or not self.enabled
                     or self.device.type != "cuda") else [
            (parent, name, child) for parent in module.modules()
            for name, child in parent.named_children()
            if isinstance(child, _BATCHNORM) and not isinstance(child, nn.SyncBatchNorm)]
        swaps = []
        for parent, name, bn in bns:
            sync = nn.SyncBatchNorm.convert_sync_batchnorm(bn)  # shares bn's parameters
            parent._modules[name] = sync
            swaps.append((parent, name, bn, sync))
        try:
            yield
        finally:
            for parent, name, bn, sync in swaps:
                # buffers may have moved device (new tensors): copy them into the original layer
                bn.load_state_dict(sync.state_dict())
                bn.train(sync.training)
                parent._modules[name] = bn

    def warn_batchnorm(self, trained: list[nn.Module]) -> None:
        """Warn that BatchNorm layers in ``trained`` use per-process statistics (CPU only)."""
        if not self.enabled or self.device.type == "cuda":
            return
        n = sum(isinstance(m, _BATCHNORM) for t in trained for m in t.modules())
        if n:
            warnings.warn(
                f"{n} BatchNorm layers of the image encoder train: on CPU each of the "
                f"{self.world_size} processes normalises with the statistics of its part of the "
                "batch (SyncBatchNorm needs CUDA), so the weights differ from a single-process "
                "run.", UserWarning, stacklevel=4)


def resolve_distributed(distributed: bool | str, device: torch.device) -> DistributedContext:
    """Decide whether to train with DistributedDataParallel; set up the process group if needed.

    Parameters
    ----------
    distributed
        ``"auto"``: when launched by ``torchrun`` with more than one process (``WORLD_SIZE`` and
        ``RANK`` in the environment) or when a process group is already initialised; ``True``:
        require it (raise otherwise); ``False``: never (every process trains on its own).
    device
        This process's device (:func:`sq_spade._utils.resolve_device` gives ``cuda:<LOCAL_RANK>``
        under ``torchrun``). The process group, when initialised here, uses ``"nccl"`` on CUDA
        and ``"gloo"`` on CPU; it stays initialised for later calls.

    Examples
    --------
    >>> resolve_distributed(False, torch.device("cpu")).enabled
    False
    """
    if distributed is False:
        return DistributedContext(device=device)
    if distributed not in ("auto", True):
        raise ValueError(f"`distributed` must be 'auto', True or False, got {distributed!r}.")
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not initialised and not launched:
        if distributed is True:
            raise RuntimeError("`distributed=True` needs a process group: launch with "
                               "`torchrun --nproc_per_node=N script.py` or initialise "
                               "torch.distributed first.")
        return DistributedContext(device=device)
    if not dist.is_available():
        raise RuntimeError("This torch build has no torch.distributed; run a single process or "
                           "pass `distributed=False`.")
    world = dist.get_world_size() if initialised else int(os.environ["WORLD_SIZE"])
    if world == 1 and distributed == "auto":
        return DistributedContext(device=device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Distributed training runs on 'cpu' (gloo) or 'cuda' (nccl) devices, "
                         f"got `device={str(device)!r}`.")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                              else device.index)
        torch.cuda.set_device(device)
    if not initialised:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(enabled=True, rank=dist.get_rank(),
                              world_size=dist.get_world_size(), device=device)
