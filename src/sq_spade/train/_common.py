"""Pieces shared by the training loops: history, early stopping, schedules, seeding, checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sq_spade._serialize import to_jsonable
from sq_spade._validation import check_positive_int


# --- history ----------------------------------------------------------------------------------
class TrainingDivergedError(RuntimeError):
    """Training stopped because its loss stopped being finite (NaN or infinite).

    Raised at the end of the epoch where it happened, before that epoch is checkpointed, so
    nothing non-finite is returned, saved or written into a table. Lower ``lr`` (or check the
    inputs for extreme values) and train again; a checkpoint folder keeps the last good epoch.
    """


def check_loss_finite(loss: Any, epoch: int, lr: Any, *, which: Any = None) -> None:
    """Raise :class:`TrainingDivergedError` when ``loss`` (a number or one per expert) is not finite.

    ``which``: a boolean mask of the entries that trained this epoch (others may be NaN).

    Examples
    --------
    >>> check_loss_finite(np.array([0.5, np.nan]), 0, 1e-3, which=np.array([True, False]))
    >>> check_loss_finite(float("nan"), 2, 1e6)
    Traceback (most recent call last):
    ...
    sq_spade.train._common.TrainingDivergedError: Training diverged: the training loss became NaN or infinite in epoch 3 (lr=1000000.0). Lower `lr` or check the inputs for extreme values; nothing was returned or written.
    """
    a = np.atleast_1d(np.asarray(loss, dtype=np.float64))
    bad = ~np.isfinite(a) if which is None else (~np.isfinite(a) & np.asarray(which, dtype=bool))
    if bad.any():
        who = "" if a.size == 1 else f" of expert(s) {np.flatnonzero(bad).tolist()[:10]}"
        raise TrainingDivergedError(
            f"Training diverged: the training loss{who} became NaN or infinite in epoch {epoch + 1} "
            f"(lr={lr}). Lower `lr` or check the inputs for extreme values; nothing was returned or "
            f"written.")


@dataclass
class History:
    """Per-epoch record of a training run.

    Each entry of ``train_loss`` / ``val_loss`` / ``lr`` is a float, or an array with one value
    per expert; ``val_loss`` holds NaN where there was no validation.

    Examples
    --------
    >>> h = History()
    >>> h.append(train_loss=1.0, val_loss=0.9)
    >>> h.to_dict()["train_loss"]
    array([1.])
    """

    train_loss: list[Any] = field(default_factory=list)
    val_loss: list[Any] = field(default_factory=list)
    lr: list[Any] = field(default_factory=list)
    best_epoch: Any = -1
    extra: dict[str, Any] = field(default_factory=dict)

    def append(self, train_loss: Any, val_loss: Any = math.nan, lr: Any = math.nan) -> None:
        """Record one epoch."""
        self.train_loss.append(np.asarray(train_loss, dtype=np.float64))
        self.val_loss.append(np.asarray(val_loss, dtype=np.float64))
        self.lr.append(np.asarray(lr, dtype=np.float64))

    @property
    def n_epochs(self) -> int:
        """Number of epochs recorded."""
        return len(self.train_loss)

    def to_dict(self) -> dict[str, Any]:
        """Arrays of shape ``(n_epochs,)`` or ``(n_epochs, E)`` plus the extra entries."""
        def stack(values: list[Any]) -> np.ndarray:
            return np.stack(values) if values else np.zeros(0)

        out: dict[str, Any] = {
            "train_loss": stack(self.train_loss),
            "val_loss": stack(self.val_loss),
            "lr": stack(self.lr),
            "best_epoch": np.asarray(self.best_epoch) if np.ndim(self.best_epoch) else
            int(self.best_epoch),
            "n_epochs": self.n_epochs,
        }
        out.update(self.extra)
        return out


def history_to_json(history: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-able copy of a history dict (arrays to lists, NaN to None).

    Examples
    --------
    >>> history_to_json({"val_loss": np.array([np.nan, 1.0])})
    {'val_loss': [None, 1.0]}
    """
    return to_jsonable(dict(history), nonfinite="null")


# --- early stopping ---------------------------------------------------------------------------
class EarlyStopping:
    """Track the best validation loss and stop after ``patience`` epochs without improvement.

    Works on a scalar loss or on a vector (one loss per expert, each tracked on its own); NaN
    means "no validation" and never counts as an improvement nor as a stall.

    Parameters
    ----------
    patience
        Epochs without improvement before stopping; ``None``: never stop (best still tracked).
    min_delta
        An improvement must lower the best loss by more than this.

    Examples
    --------
    >>> es = EarlyStopping(patience=2)
    >>> [bool(es.step(v)) for v in (3.0, 2.0, 2.5, 2.4)]
    [True, True, False, False]
    >>> bool(es.stop), es.best_epoch
    (True, 1)
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0) -> None:
        check_positive_int(patience, "patience", allow_none=True)
        self.patience, self.min_delta = patience, float(min_delta)
        self.best: Any = None
        self._best_epoch: Any = None
        self.wait: Any = None
        self.epoch = -1

    def step(self, value: Any) -> Any:
        """Record the loss of the next epoch; return whether it improved (per element)."""
        value = np.asarray(value, dtype=np.float64)
        self.epoch += 1
        if self.best is None:
            self.best = np.full(value.shape, np.inf)
            self._best_epoch = np.full(value.shape, -1)
            self.wait = np.zeros(value.shape, dtype=np.int64)
        finite = np.isfinite(value)
        improved = finite & (value < self.best - self.min_delta)
        self.best = np.where(improved, value, self.best)
        self._best_epoch = np.where(improved, self.epoch, self._best_epoch)
        self.wait = np.where(improved, 0, np.where(finite, self.wait + 1, self.wait))
        if value.ndim == 0:
            return bool(improved)
        return improved

    @property
    def stop(self) -> Any:
        """Whether (per element) ``patience`` epochs passed without improvement."""
        if self.wait is None:
            return False
        if self.patience is None:
            out = np.zeros(self.wait.shape, dtype=bool)
        else:
            out = self.wait >= self.patience
        return bool(out) if out.ndim == 0 else out

    @property
    def best_epoch(self) -> Any:
        """Epoch (0-based) of the best loss, -1 before any finite loss; per element."""
        if self._best_epoch is None:
            return -1
        return int(self._best_epoch) if self._best_epoch.ndim == 0 else self._best_epoch


# --- schedules ----------------------------------------------------------------------------------
@dataclass
class CosineSchedule:
    """Learning-rate factor: linear warm-up, then a cosine from 1 down to ``min_ratio``.

    A callable object rather than a closure so that :class:`torch.optim.lr_scheduler.LambdaLR`
    can put it in its state dict (for resuming).

    Examples
    --------
    >>> s = CosineSchedule(total_steps=10)
    >>> s(0), round(s(5), 3), s(10)
    (1.0, 0.5, 0.0)
    """

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        """Factor applied to the base learning rate at (0-based) ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine schedule with warm-up, to be stepped once per batch.

    Examples
    --------
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = cosine_schedule(opt, total_steps=4)
    >>> for _ in range(2):
    ...     opt.step(); sched.step()
    >>> round(opt.param_groups[0]["lr"], 3)
    0.5
    """
    check_positive_int(total_steps, "total_steps")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, CosineSchedule(int(total_steps), int(warmup_steps), float(min_ratio))
    )


# --- seeding ------------------------------------------------------------------------------------
def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` seeded with ``seed`` (for shuffling, independent of globals).

    Examples
    --------
    >>> torch.equal(torch.randperm(5, generator=make_generator(0)),
    ...             torch.randperm(5, generator=make_generator(0)))
    True
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an integer, got {seed!r}.")
    return torch.Generator(device=device).manual_seed(int(seed) % 2**63)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state after.

    Initialisation and dropout draw from the global RNG; forking it makes a training run
    reproducible from ``seed`` without disturbing the user's random stream.

    Examples
    --------
    >>> with seeded(0):
    ...     a = torch.rand(2)
    >>> with seeded(0):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b)
    True
    """
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        dev = torch.device(device)
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % 2**63)
        yield


# --- checkpoints --------------------------------------------------------------------------------
def state_for_checkpoint(modules: Mapping[str, nn.Module],
                         optimizer: torch.optim.Optimizer | None = None,
                         scheduler: Any = None,
                         generators: Mapping[str, torch.Generator] | None = None,
                         metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to resume a run, as flat tensors plus JSON-able metadata.

    Parameters
    ----------
    modules
        Named modules; their state dicts go under ``"model.<name>.<key>"``.
    optimizer
        Its tensors go under ``"optim.<param index>.<key>"``, the rest in the metadata.
    scheduler
        A learning-rate scheduler (state dict in the metadata).
    generators
        Named :class:`torch.Generator`; their states go under ``"rng.<name>"``. torch's global
        CPU (and CUDA) RNG states are always included.
    metadata
        Extra JSON-able entries (epoch, history, configuration...).

    Returns
    -------
    ``{"tensors": dict[str, Tensor], "metadata": dict}``: the tensors are contiguous CPU
    copies (ready for ``safetensors.torch.save_file``), the metadata passes ``json.dumps``.
    Restore with :func:`load_checkpoint_state`.

    Examples
    --------
    >>> net = torch.nn.Linear(2, 2)
    >>> state = state_for_checkpoint({"net": net}, metadata={"epoch": 3})
    >>> sorted(k for k in state["tensors"] if k.startswith("model."))
    ['model.net.bias', 'model.net.weight']
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"modules": sorted(modules)}

    def put(key: str, t: torch.Tensor) -> None:
        tensors[key] = t.detach().to("cpu", copy=True).contiguous()

    for name, module in modules.items():
        for key, t in module.state_dict().items():
            put(f"model.{name}.{key}", t)
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    put(f"optim.{idx}.{key}", v)
                else:
                    scalars.setdefault(str(idx), {})[key] = v
        meta["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars,
                             "class": type(optimizer).__name__}
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    put("rng.torch_cpu", torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            put(f"rng.cuda.{i}", st)
    for name, g in (generators or {}).items():
        put(f"rng.gen.{name}", g.get_state())
        meta.setdefault("generators", []).append(name)
    meta["user"] = dict(metadata or {})
    meta = json.loads(json.dumps(to_jsonable(meta)))
    return {"tensors": tensors, "metadata": meta}


def load_checkpoint_state(state: Mapping[str, Any], modules: Mapping[str, nn.Module],
                          optimizer: torch.optim.Optimizer | None = None,
                          scheduler: Any = None,
                          generators: Mapping[str, torch.Generator] | None = None,
                          restore_global_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`state_for_checkpoint` saved; return the user metadata.

    Modules load strictly. Pass the same (freshly built) objects as when saving.

    Examples
    --------
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> meta = load_checkpoint_state(state_for_checkpoint({"net": a}, metadata={"e": 1}),
    ...                              {"net": b})
    >>> torch.equal(a.weight, b.weight), meta
    (True, {'e': 1})
    """
    tensors, meta = state["tensors"], state["metadata"]
    for name, module in modules.items():
        prefix = f"model.{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sd:
            raise KeyError(f"`modules` names {name!r}, which the checkpoint does not hold; "
                           f"it holds {meta.get('modules')}.")
        module.load_state_dict(sd, strict=True)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise KeyError("`optimizer` given, but the checkpoint holds no optimizer state.")
        om = meta["optimizer"]
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = v
        for idx, sc in om["scalars"].items():
            opt_state.setdefault(int(idx), {}).update(sc)
        optimizer.load_state_dict({"state": opt_state, "param_groups": om["param_groups"]})
    if scheduler is not None:
        if "scheduler" not in meta:
            raise KeyError("`scheduler` given, but the checkpoint holds no scheduler state.")
        scheduler.load_state_dict(meta["scheduler"])
    for name, g in (generators or {}).items():
        g.set_state(tensors[f"rng.gen.{name}"])
    if restore_global_rng:
        torch.set_rng_state(tensors["rng.torch_cpu"])
        cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")),
                      key=lambda k: int(k.rsplit(".", 1)[1]))
        if cuda and torch.cuda.is_available():  # a machine with fewer GPUs restores the first ones
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
    return dict(meta.get("user", {}))


# --- argument checks ------------------------------------------------------------------------
def as_float_array(x: Any, name: str, ndim: int = 2) -> np.ndarray:
    """``x`` as a C-contiguous float32 array of ``ndim`` dimensions, or raise naming ``name``."""
    if x is None:
        raise ValueError(f"`{name}` must be an array, got None.")
    arr = np.asarray(x)
    if arr.ndim != ndim or not (np.issubdtype(arr.dtype, np.floating)
                                or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"`{name}` must be a numeric {ndim}-D array, got shape {arr.shape} "
                         f"and dtype {arr.dtype}.")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` must be finite (it holds NaN or inf).")
    return arr


def as_int_array(x: Any, name: str, n: int, ndim: int = 1) -> np.ndarray:
    """``x`` as an int64 array with ``n`` rows, or raise naming ``name``."""
    arr = np.asarray(x)
    if arr.ndim != ndim or arr.shape[0] != n:
        raise ValueError(f"`{name}` must be a {ndim}-D integer array with {n} rows, "
                         f"got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.array_equal(arr, np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"`{name}` must hold integers, got dtype {arr.dtype}.")
    return np.ascontiguousarray(arr, dtype=np.int64)
