"""Training SPADE's data experts: all experts at once, each as if it were trained alone."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.adamw import adamw as adamw_functional

from sq_spade._utils import progress, resolve_device
from sq_spade._validation import check_choice, check_positive_int
from sq_spade.nn.experts import ExpertHeads
from sq_spade.nn.losses import bleep_loss, clip_loss
from sq_spade.train._checkpoint import Checkpointer, digest_tensors, fingerprint
from sq_spade.train._common import (
    CosineSchedule,
    EarlyStopping,
    History,
    as_float_array,
    as_int_array,
    check_loss_finite,
    make_generator,
    seeded,
)
from sq_spade.train._options import FitOptions, resolve_options

_LOSSES = {"bleep": bleep_loss, "clip": clip_loss}
#: SPADE's training options (100 epochs, AdamW 1e-4 / 1e-2, BLEEP loss, no early stopping).
_DEFAULTS = FitOptions.experts()
#: Data above this many bytes stays on the CPU and is gathered batch by batch.
_DEVICE_DATA_BYTES = 2 * 1024**3


class StackedAdamW(torch.optim.Optimizer):
    """AdamW for parameters stacked along a leading expert axis, with per-expert steps.

    :meth:`step` takes which experts are *active* (had a batch in this step) and each expert's
    learning rate. Inactive experts are left exactly untouched: no weight decay, no moment
    update, no step count. Each expert thus follows the very trajectory that
    :class:`torch.optim.AdamW` would give it if it were trained alone on its own batches with
    its own schedule.

    A parameter group marked ``"shared": True`` holds parameters shared by all experts (leading
    axis of length 1, e.g. SPADE's shared gene head): it steps whenever any expert is active, at
    the learning rate ``shared_lr`` given to :meth:`step`.

    Parameters
    ----------
    params
        Parameters whose first dimension is the expert axis (all of length ``n_experts``), or
        parameter groups (dicts) as for any torch optimizer.
    n_experts
        Number of experts.
    lr, betas, eps, weight_decay
        As :class:`torch.optim.AdamW` (``lr`` is only the default of :meth:`step`).

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.ones(2, 3))
    >>> opt = StackedAdamW([w], n_experts=2, lr=0.1)
    >>> w.sum().backward()
    >>> opt.step(active=torch.tensor([True, False]))
    >>> bool((w[0] < 1).all()), bool((w[1] == 1).all())
    (True, True)
    """

    def __init__(self, params: Iterable[Tensor], n_experts: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.n_experts = int(n_experts)
        for group in self.param_groups:
            n = 1 if group.get("shared", False) else self.n_experts
            for p in group["params"]:
                if p.ndim == 0 or p.shape[0] != n:
                    raise ValueError(f"`params` must have a leading expert axis of length "
                                     f"{n}, got shape {tuple(p.shape)}.")

    @torch.no_grad()
    def step(self, active: Tensor | None = None, lr: Tensor | None = None,  # type: ignore[override]
             shared_lr: float | None = None) -> None:
        """Update the active experts.

        Parameters
        ----------
        active
            Boolean ``(E,)``; ``None``: all experts.
        lr
            Learning rate per expert, ``(E,)``; ``None``: the group's ``lr`` for all.
        shared_lr
            Learning rate of the shared groups (``None``: the group's ``lr``).
        """
        e_all = self.n_experts
        act_all = (np.ones(e_all, dtype=bool) if active is None
                   else np.asarray(torch.as_tensor(active).detach().cpu(), dtype=bool))
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            if group.get("shared", False):
                e, act = 1, np.array([act_all.any()])
                lrs = np.full(1, float(group["lr"] if shared_lr is None else shared_lr))
            else:
                e, act = e_all, act_all
                lrs = (np.full(e, float(group["lr"])) if lr is None
                       else np.asarray(torch.as_tensor(lr).detach().cpu(), dtype=np.float64))
            # experts that share (step count, lr) are updated by one call of torch's AdamW
            # kernel on per-expert views of the stacked tensors (fused where torch has it:
            # several times faster on CPU than elementwise ops over the whole stack)
            calls: dict[tuple[float, float], list[tuple[Tensor, int]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(e, dtype=torch.float64)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] = st["step"].detach().cpu().to(torch.float64)
                for i in np.flatnonzero(act):
                    calls[(float(st["step"][i]), float(lrs[i]))].append((p, int(i)))
            for (step, lr_i), members in calls.items():
                params = [p[i] for p, i in members]
                fused = all(p.device.type in ("cpu", "cuda") for p in params)
                steps = torch.full((len(params),), step, dtype=torch.float32,
                                   device=params[0].device if fused else "cpu").unbind()
                adamw_functional(
                    params, [p.grad[i] for p, i in members],
                    [self.state[p]["exp_avg"][i] for p, i in members],
                    [self.state[p]["exp_avg_sq"][i] for p, i in members], [], list(steps),
                    fused=fused or None, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr_i,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                )
                for p, i in members:
                    self.state[p]["step"][i] += 1


@dataclass(frozen=True)
class TrainingWindows:
    """Training spots served window by window, so that not all of them sit in memory at once.

    Each window is a callable returning ``(features (n, D) float32, genes (n, G) float32,
    expert (n,) int)``, e.g. a few sections read from a :class:`sq_spade.pp.FeatureStore`.
    :func:`fit_experts` keeps one window in memory at a time: each epoch visits the windows in a
    shuffled order and shuffles each expert's spots within the window, so a batch mixes spots
    of one window only (the usual sharded shuffling of out-of-core training).

    Parameters
    ----------
    loaders
        One callable per window.
    expert_counts
        ``(n_windows, n_experts)`` spots of each expert in each window (fixes the number of
        steps, hence the schedules, before any window is read).
    dim, n_genes
        Feature and gene dimensions.
    key
        Identifies the data for checkpoints (e.g. the store's path and its sections' sizes).
    """

    loaders: Sequence[Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]]
    expert_counts: np.ndarray
    dim: int
    n_genes: int
    key: str = ""


def fit_experts(features: np.ndarray | TrainingWindows, genes: np.ndarray | None, expert: np.ndarray | None, *,
                n_experts: int, val_features: np.ndarray | None = None, val_genes: np.ndarray | None = None,
                val_expert: np.ndarray | None = None, dropout: float = 0.1, out_dim: int = 256,
                warmup_steps: int = 0, empty: str = "raise", init: tuple[ExpertHeads, ExpertHeads] | None = None,
                shared_gene_head: bool = False, options: FitOptions | None = None,
                epoch_score: Callable[[ExpertHeads, ExpertHeads], float] | None = None, **training: Any,
                ) -> tuple[ExpertHeads, ExpertHeads, dict[str, Any]]:
    """Train SPADE's experts: one image head and one gene head per expert, on its own spots.

    Every expert is trained exactly as if alone (SPADE's independent experts), but all are
    trained together as stacked parameters, one batched forward/backward per step:

    - each epoch, each expert shuffles its own spots into batches of ``batch_size`` (its last
      batch may be smaller); step ``s`` of the epoch stacks batch ``s`` of every expert that
      has one into a padded ``(E, B, D)`` tensor with a mask. Experts with fewer batches than
      the largest sit out the remaining steps of the epoch (no padding of whole batches, no
      cycling): :class:`StackedAdamW` leaves them untouched, not even weight decay;
    - the loss is the sum of the per-expert losses (padded rows excluded exactly), so each
      expert's gradient is the one it would get alone;
    - AdamW (``lr``, ``weight_decay``) with a cosine schedule stepped per batch, each expert
      over its own ``epochs * n_batches_e`` steps;
    - after each epoch, each expert's validation loss on its validation spots (fixed batches);
      each expert keeps the parameters of its best validation epoch. Experts without
      validation spots keep their last epoch. With ``patience``, an expert whose validation
      loss did not improve for ``patience`` epochs stops training (experts without validation
      never stop early); the run ends when all have stopped.

    No DistributedDataParallel here (16 experts on cached features train in about a minute on
    one device): under ``torchrun`` every process trains the same experts on its own device
    (``cuda:<LOCAL_RANK>``), only rank 0 shows progress, and only rank 0 writes files
    (:meth:`~sq_spade.models.Spade.save`).

    Parameters
    ----------
    features
        Image features of the training spots, ``(N, D)`` (frozen backbone, cached); or a
        :class:`TrainingWindows` serving features, targets and experts window by window
        (then ``genes`` and ``expert`` are ``None``).
    genes
        Expression targets of the same spots, ``(N, G)``.
    expert
        Expert of each spot, integers ``(N,)`` in ``[0, n_experts)``.
    n_experts
        Number of experts ``E``.
    val_features, val_genes, val_expert
        Validation spots (ideally held-out slides), all three or none.
    dropout
        Dropout of the projection heads.
    out_dim
        Latent dimension (256).
    warmup_steps
        Linear warm-up steps (per expert) before the cosine.
    empty
        What to do with an expert that has no training spot: ``"raise"`` a ValueError, or
        ``"warn"`` and leave its heads at their initial weights (``history["trained"]``).
    init
        Initial ``(image_heads, gene_heads)`` to start from (copied; not modified).
    shared_gene_head
        One gene head shared by all experts (trained on every expert's batches, its own cosine
        schedule over all steps) and one image head per expert, trained against it: every
        expert then maps into the one space the gene head defines. The best validation epoch is
        chosen by the validation loss summed over experts, for all experts together, so that
        image heads and the gene head stay of one epoch. The returned gene heads hold ``E``
        copies of the shared head (the saved format does not change).
    epoch_score
        ``epoch_score(image_heads, gene_heads) -> float`` (higher is better), called after each
        epoch with the heads in eval mode under ``torch.no_grad`` (on the training device; with
        ``shared_gene_head`` the gene heads are the one shared head). When given, it selects
        the epoch instead of the validation loss: all experts together keep the parameters of
        the best-scoring epoch, and with ``patience`` the run ends after ``patience`` epochs
        without a better score. E.g. SPADE's validation ACG of the mixture's retrieval
        (:func:`sq_spade.tl.train_experts`). Not checkpointed: refused with ``checkpoint_dir``.
    options
        The training options (:class:`FitOptions`); default :meth:`FitOptions.experts`: SPADE's
        100 epochs, batches of 128 per expert, AdamW with ``lr`` 1e-4 and ``weight_decay``
        1e-2, the BLEEP loss at temperature 1, no early stopping (``patience=None``: per-expert
        early stopping on the validation loss otherwise), seed 0, device ``"auto"``.
    **training
        Single options changed from ``options`` (``epochs=``, ``batch_size=``, ``lr=``,
        ``weight_decay=``, ``loss=``, ``temperature=``, ``patience=``, ``seed=``, ``device=``,
        ``checkpoint_dir=``, ``checkpoint_every=``, ``resume=``). Checkpoints (written every
        ``checkpoint_every`` epochs into ``checkpoint_dir``, each replacing the last
        atomically) hold about four times the heads' parameters (weights, best weights with
        validation, two AdamW moments: 170 MB for 16 experts on 1280-d features and 785 genes)
        and take about half a CPU epoch of that size to write, hence the default of 10.
        ``resume``: ``True`` continues from the checkpoint in ``checkpoint_dir`` (or starts
        fresh when it holds none yet, so one command serves the first launch and every
        restart), a path continues from that folder. A resumed run ends, on the same device,
        with exactly the weights and history of the uninterrupted run; resuming a run that had
        ended returns its result without training. The arguments and data must be those of the
        saved run (a ValueError names what differs); only ``device``, ``checkpoint_dir`` and
        ``checkpoint_every`` may change.

    Returns
    -------
    tuple
        ``(image_heads, gene_heads, history)``, the heads on the CPU in eval mode. ``history``
        holds ``train_loss`` and ``val_loss`` of shape ``(n_epochs, E)`` (row-weighted mean
        over the epoch's batches; NaN where an expert had no batch or no validation), ``lr`` of
        the same shape (learning rate of the epoch's last step), ``best_epoch`` of shape
        ``(E,)`` (-1 without validation), ``best_val_loss``, ``stopped_epoch`` (-1: not
        stopped), ``n_train``, ``n_val``, ``steps`` (optimizer steps per expert), ``trained``
        (bool) and ``n_epochs``; with ``epoch_score``, ``val_score`` ``(n_epochs,)`` and
        ``best_epoch`` the best-scoring epoch for every expert.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> f, g = rng.normal(size=(40, 8)).astype("f4"), rng.normal(size=(40, 5)).astype("f4")
    >>> img, gene, hist = fit_experts(f, g, np.repeat([0, 1], 20), n_experts=2, epochs=2,
    ...                               batch_size=8, out_dim=4, device="cpu")
    >>> hist["train_loss"].shape
    (2, 2)
    """
    # --- checks -------------------------------------------------------------------------------
    opts = resolve_options(options, _DEFAULTS, training)
    n_experts = check_positive_int(n_experts, "n_experts")
    check_choice(empty, "empty", ("raise", "warn"))
    if epoch_score is not None and not callable(epoch_score):
        raise TypeError(f"`epoch_score` must be None or a callable (image_heads, gene_heads) -> float, got "
                        f"{type(epoch_score).__name__}.")
    if epoch_score is not None and (opts.checkpoint_dir is not None or opts.resume is not False):
        raise ValueError("`epoch_score` is not checkpointed: pass `checkpoint_dir=None` and `resume=False`.")
    warmup_steps = check_positive_int(warmup_steps, "warmup_steps", allow_zero=True)
    if isinstance(features, TrainingWindows):
        if genes is not None or expert is not None:
            raise ValueError("With `features` a TrainingWindows, `genes` and `expert` must be None (the windows "
                             "serve them).")
        source = features
        counts = np.asarray(source.expert_counts, dtype=np.int64)
        if counts.shape != (len(source.loaders), n_experts) or (counts < 0).any():
            raise ValueError(f"`features.expert_counts` must be non-negative of shape "
                             f"{(len(source.loaders), n_experts)} (windows, `n_experts`), got {counts.shape}.")
        dim, n_genes = int(source.dim), int(source.n_genes)
        data_key: Any = {"windows": source.key, "expert_counts": counts}
    else:
        x = as_float_array(features, "features")
        g = as_float_array(genes, "genes")
        n = x.shape[0]
        if g.shape[0] != n:
            raise ValueError(f"`genes` must have {n} rows (as `features`), got {g.shape[0]}.")
        ex = _check_expert(expert, "expert", n, n_experts)
        source = TrainingWindows([lambda: (x, g, ex)], np.bincount(ex, minlength=n_experts)[None],
                                 x.shape[1], g.shape[1])
        counts = source.expert_counts
        dim, n_genes = x.shape[1], g.shape[1]
        data_key = {"features": x, "genes": g, "expert": ex}
    given = [v is not None for v in (val_features, val_genes, val_expert)]
    if any(given) and not all(given):
        raise ValueError("`val_features`, `val_genes` and `val_expert` must be given together.")
    has_val = all(given)
    if has_val:
        vx = as_float_array(val_features, "val_features")
        vg = as_float_array(val_genes, "val_genes")
        if vx.shape[1] != dim:
            raise ValueError(f"`val_features` must have {dim} columns, got {vx.shape[1]}.")
        if vg.shape != (vx.shape[0], n_genes):
            raise ValueError(f"`val_genes` must have shape {(vx.shape[0], n_genes)}, "
                             f"got {vg.shape}.")
        vex = _check_expert(val_expert, "val_expert", vx.shape[0], n_experts)
    n_train = counts.sum(axis=0)
    n_val = np.bincount(vex, minlength=n_experts) if has_val else np.zeros(n_experts, np.int64)
    trained = n_train > 0
    if not trained.all():
        missing = np.flatnonzero(~trained).tolist()
        if empty == "raise":
            raise ValueError(f"`expert`: experts {missing} have no training spot; re-cluster, "
                             f"lower `n_experts`, or pass empty='warn' to keep them untrained.")
        warnings.warn(f"experts {missing} have no training spot; their heads stay at their "
                      f"initial weights.", UserWarning, stacklevel=2)
    if init is not None:
        ih, gh = init
        if not (isinstance(ih, ExpertHeads) and isinstance(gh, ExpertHeads)):
            raise TypeError("`init` must be a pair (image ExpertHeads, gene ExpertHeads).")
        n_gene_heads = 1 if shared_gene_head else n_experts
        if (ih.n_experts, ih.in_dim, gh.n_experts, gh.in_dim) != (n_experts, dim, n_gene_heads, n_genes):
            raise ValueError("`init` heads do not match `n_experts` and the data's dimensions.")

    ckpt = Checkpointer.open(opts, kind="fit_experts", fingerprint=lambda: fingerprint(
        {**opts.fingerprint(), "n_experts": n_experts, "dropout": dropout, "out_dim": out_dim,
         "warmup_steps": warmup_steps, "empty": empty,
         # only when set, so that checkpoints of runs before the option resume
         **({"shared_gene_head": True} if shared_gene_head else {})},
        {**data_key, "val_features": vx if has_val else None,
         "val_genes": vg if has_val else None, "val_expert": vex if has_val else None,
         "init": None if init is None else digest_tensors(
             {f"{i}.{k}": v for i, h in enumerate(init) for k, v in h.state_dict().items()})}))
    dev = resolve_device(opts.device)
    with seeded(opts.seed, dev):
        return _fit(source, vx if has_val else None, vg if has_val else None,
                    vex if has_val else None, n_experts=n_experts, opts=opts, dropout=dropout,
                    out_dim=out_dim, warmup_steps=warmup_steps, dev=dev, n_train=n_train, n_val=n_val,
                    init=init, ckpt=ckpt, shared=bool(shared_gene_head), epoch_score=epoch_score)


def _fit(source: TrainingWindows, vx: np.ndarray | None,
         vg: np.ndarray | None, vex: np.ndarray | None, *, n_experts: int, opts: FitOptions,
         dropout: float, out_dim: int, warmup_steps: int, dev: torch.device,
         n_train: np.ndarray, n_val: np.ndarray, init: tuple[ExpertHeads, ExpertHeads] | None,
         ckpt: Checkpointer | None = None, shared: bool = False,
         epoch_score: Callable[[ExpertHeads, ExpertHeads], float] | None = None,
         ) -> tuple[ExpertHeads, ExpertHeads, dict]:
    epochs, batch_size, lr, seed = opts.epochs, opts.batch_size, opts.lr, opts.seed
    loss_fn, temperature = _LOSSES[opts.loss], opts.temperature
    e_all = n_experts
    if init is None:
        img = ExpertHeads(e_all, source.dim, out_dim, dropout)
        gen = ExpertHeads(1 if shared else e_all, source.n_genes, out_dim, dropout)
    else:
        img, gen = (_copy_heads(h) for h in init)
    img, gen = img.to(dev).train(), gen.to(dev).train()
    if shared:
        opt = StackedAdamW([{"params": list(img.parameters())},
                            {"params": list(gen.parameters()), "shared": True}],
                           e_all, lr=lr, weight_decay=opts.weight_decay)
    else:
        opt = StackedAdamW(list(img.parameters()) + list(gen.parameters()), e_all, lr=lr,
                           weight_decay=opts.weight_decay)

    def load(w: int) -> tuple[Tensor, Tensor, list[Tensor], torch.device]:
        x, g, ex = source.loaders[w]()
        if len(x) != len(g) or len(x) != len(ex) or (np.bincount(ex, minlength=e_all) != counts[w]).any():
            raise ValueError(f"window {w} does not match its `expert_counts` / row counts.")
        ddev = dev if (x.nbytes + g.nbytes) <= _DEVICE_DATA_BYTES else torch.device("cpu")
        return (torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(ddev),
                torch.from_numpy(np.ascontiguousarray(g, np.float32)).to(ddev),
                [torch.from_numpy(np.flatnonzero(ex == e)) for e in range(e_all)], ddev)

    counts = np.asarray(source.expert_counts, dtype=np.int64)
    n_windows = len(source.loaders)
    resident = load(0) if n_windows == 1 else None  # in memory: read once, not every epoch
    n_batches = np.ceil(counts / batch_size).astype(np.int64).sum(axis=0)
    total_steps = np.maximum(epochs * n_batches, 1)
    schedules = [CosineSchedule(int(t), warmup_steps) for t in total_steps]
    # the shared gene head steps whenever any expert does: once per step of each window's plan
    shared_total = max(epochs * int(np.ceil(counts / batch_size).max(axis=1).sum()), 1)
    schedules.append(CosineSchedule(shared_total, warmup_steps))
    steps = np.zeros(e_all + 1, dtype=np.int64)  # the last: the shared gene head's
    shuffler = make_generator(seed)

    if vx is not None:
        vdev = dev if (vx.nbytes + vg.nbytes) <= _DEVICE_DATA_BYTES else torch.device("cpu")
        vxt, vgt = torch.from_numpy(vx).to(vdev), torch.from_numpy(vg).to(vdev)
        val_gen = make_generator(seed + 1)
        val_members = [torch.from_numpy(np.flatnonzero(vex == e)) for e in range(e_all)]
        # fixed validation batches: shuffled once (mixing slides), the same every epoch
        val_plan = _plan([m[torch.randperm(len(m), generator=val_gen)] for m in val_members],
                         batch_size)
    # with a shared gene head, all trained experts take the epoch of the best summed validation loss
    has_val = (n_train > 0) & bool((n_val > 0).any()) if shared else n_val > 0
    stopper = EarlyStopping(opts.patience)
    stopped = np.zeros(e_all, dtype=bool)
    stopped_epoch = np.full(e_all, -1)
    best = {k: v.detach().clone() for k, v in _named(img, gen).items()}
    # the score's selection: one criterion for all experts (a scalar EarlyStopping on -score)
    scorer = EarlyStopping(opts.patience) if epoch_score is not None else None
    scores: list[float] = []
    history = History()
    start, stop = 0, epochs
    if ckpt is not None and (resumed := ckpt.attach({"image": img, "gene": gen}, opt,
                                                    generators={"shuffler": shuffler},
                                                    history=history, stopper=stopper)):
        start, stop = resumed.epoch, (resumed.epoch if resumed.finished else epochs)
        steps, stopped, stopped_epoch = (resumed.values[k]
                                         for k in ("steps", "stopped", "stopped_epoch"))
        if len(steps) == e_all:  # checkpoints written before the shared gene head option
            steps = np.append(steps, 0)
        if vx is not None:
            best = {k: resumed.tensors[f"best.{k}"].to(dev) for k in best}

    for epoch in progress(range(start, stop), total=epochs, initial=start,
                          desc="training experts"):
        runnable = (n_train > 0) & ~stopped
        loss_sum = np.zeros(e_all)
        rows_sum = np.zeros(e_all)
        last_lr = np.full(e_all, np.nan)
        img.train()
        gen.train()
        # one window in memory: the same random stream as without windows
        order = [0] if n_windows == 1 else torch.randperm(n_windows, generator=shuffler).tolist()
        for w in order:
            xt, gt, members, data_dev = resident if resident is not None else load(w)
            plan = _plan([members[e][torch.randperm(len(members[e]), generator=shuffler)]
                          if runnable[e] else members[e][:0] for e in range(e_all)], batch_size)
            _train_window(plan, xt, gt, data_dev, img, gen, opt, schedules, steps, lr, loss_fn, temperature,
                          dev, e_all, loss_sum, rows_sum, last_lr, shared)
            del xt, gt, members
        with np.errstate(invalid="ignore", divide="ignore"):
            train_loss = np.where(rows_sum > 0, loss_sum / rows_sum, np.nan)
        check_loss_finite(train_loss, epoch, lr, which=rows_sum > 0)

        if vx is not None and scorer is not None:  # the score selects: the validation loss is only recorded
            val_loss = _evaluate(img, gen, val_plan, vxt, vgt, loss_fn, temperature, dev, e_all, shared)
        elif vx is not None:
            val_loss = _evaluate(img, gen, val_plan, vxt, vgt, loss_fn, temperature, dev, e_all, shared)
            # experts that stopped early keep their best; NaN leaves their record untouched
            val_loss = np.where(stopped, np.nan, val_loss)
            if shared:  # one criterion for all: the validation loss summed over experts
                total = float(np.nansum(np.nan_to_num(val_loss) * n_val) / max(n_val.sum(), 1))
                improved = stopper.step(np.where(has_val & ~stopped, total, np.nan))
            else:
                improved = stopper.step(val_loss)
            if improved.any():
                imp = torch.from_numpy(improved).to(dev)
                for k, v in _named(img, gen).items():
                    best[k] = torch.where(_expert_mask(imp, v), v.detach(), best[k])
            newly = stopper.stop & has_val & ~stopped
            stopped_epoch[newly] = epoch
            stopped |= newly
        else:
            val_loss = np.full(e_all, np.nan)
        history.append(train_loss, val_loss, last_lr)
        done = bool((stopped | (n_train == 0)).all())
        if scorer is not None:
            img.eval()
            gen.eval()
            with torch.no_grad():
                score = float(epoch_score(img, gen))
            img.train()
            gen.train()
            scores.append(score)
            if scorer.step(-score if np.isfinite(score) else np.nan):
                best = {k: v.detach().clone() for k, v in _named(img, gen).items()}
            done = done or bool(scorer.stop)
        if ckpt is not None:
            ckpt.end_epoch(epoch + 1, done or epoch + 1 == epochs,
                           values={"steps": steps[:e_all] if not shared else steps, "stopped": stopped,
                                   "stopped_epoch": stopped_epoch},
                           tensors={f"best.{k}": v for k, v in best.items()}
                           if vx is not None else None)  # best weights serve validation only
        if done:
            break

    # experts with validation spots get their best epoch back, the others keep their last
    if scorer is not None:  # every expert gets the best-scoring epoch back
        if scorer.best_epoch >= 0:
            with torch.no_grad():
                for k, v in _named(img, gen).items():
                    v.copy_(best[k])
    elif vx is not None and has_val.any():
        keep = torch.from_numpy(has_val & (stopper.best_epoch >= 0)).to(dev)
        with torch.no_grad():
            for k, v in _named(img, gen).items():
                v.copy_(torch.where(_expert_mask(keep, v), best[k], v))
    if scorer is not None:
        best_epoch, best_val = np.full(e_all, int(scorer.best_epoch)), np.full(e_all, np.nan)
        history.extra.update({"val_score": np.asarray(scores, dtype=np.float64),
                              "best_val_score": float(-scorer.best) if scorer.best_epoch >= 0 else np.nan})
    else:
        best_epoch = (np.asarray(stopper.best_epoch) if vx is not None
                      else np.full(e_all, -1))
        best_val = (np.where(best_epoch >= 0, stopper.best, np.nan) if vx is not None
                    else np.full(e_all, np.nan))
    history.best_epoch = best_epoch
    history.extra.update({
        "best_val_loss": best_val, "stopped_epoch": stopped_epoch, "n_train": n_train,
        "n_val": n_val, "steps": steps[:e_all], "trained": n_train > 0,
    })
    if shared:  # E copies of the shared head: the format of independent gene heads
        gen = ExpertHeads.from_heads(gen.cpu().to_heads() * e_all)
    return img.cpu().eval(), gen.cpu().eval(), history.to_dict()


def _expert_mask(mask: Tensor, v: Tensor) -> Tensor:
    """A per-expert boolean ``(E,)`` shaped to broadcast over ``v``; a shared parameter (leading 1) takes any."""
    m = mask if v.shape[0] == mask.shape[0] else mask.any().reshape(1)
    return m.view((v.shape[0],) + (1,) * (v.ndim - 1))


def _gene_forward(gen: ExpertHeads, gb: Tensor, which: Tensor | None, e_all: int) -> Tensor:
    """The gene heads on per-expert batches; a shared head (one expert) serves every batch."""
    if gen.n_experts == 1 and e_all > 1:
        n = gb.shape[0]
        return gen.forward_stacked(gb, torch.zeros(n, dtype=torch.long, device=gb.device))
    return gen.forward_stacked(gb, which)



def _train_window(plan: list[Tensor], xt: Tensor, gt: Tensor, data_dev: torch.device, img: ExpertHeads,
                  gen: ExpertHeads, opt: StackedAdamW, schedules: list[CosineSchedule], steps: np.ndarray,
                  lr: float, loss_fn: Any, temperature: float, dev: torch.device, e_all: int,
                  loss_sum: np.ndarray, rows_sum: np.ndarray, last_lr: np.ndarray, shared: bool = False) -> None:
    """The optimisation steps over one window's plan (updates ``steps`` and the sums in place)."""
    for idx in plan:  # idx: (E, B) row indices of the window, -1 for padding
        active = (idx >= 0).any(dim=1)
        act = torch.nonzero(active).flatten()
        sub = idx[act]
        width = int((sub >= 0).sum(dim=1).max())
        sub = sub[:, :width]
        mask = sub >= 0
        safe = sub.clamp_min(0)
        xb = xt[safe.to(data_dev)].to(dev, non_blocking=True)
        gb = gt[safe.to(data_dev)].to(dev, non_blocking=True)
        mask = mask.to(dev)
        which = None if len(act) == e_all else act.to(dev)
        zi = img.forward_stacked(xb, which)
        zg = _gene_forward(gen, gb, which, e_all)
        losses = loss_fn(zi, zg, temperature, mask)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        act_np = active.numpy()
        lrs = np.array([lr * schedules[e](int(steps[e])) for e in range(e_all)])
        shared_lr = lr * schedules[e_all](int(steps[e_all])) if shared else None
        opt.step(active=active.to(dev), lr=torch.from_numpy(lrs), shared_lr=shared_lr)
        last_lr[act_np] = lrs[act_np]
        steps[:e_all][act_np] += 1
        steps[e_all] += 1
        n_rows = mask.sum(dim=1).cpu().numpy()
        loss_sum[act_np] += losses.detach().cpu().numpy() * n_rows
        rows_sum[act_np] += n_rows


def _plan(orders: list[Tensor], batch_size: int) -> list[Tensor]:
    """Stack per-expert row orders into per-step ``(E, batch_size)`` index tensors (-1: pad)."""
    n_steps = max((math.ceil(len(o) / batch_size) for o in orders), default=0)
    if n_steps == 0:
        return []
    full = torch.full((len(orders), n_steps * batch_size), -1, dtype=torch.long)
    for e, o in enumerate(orders):
        full[e, :len(o)] = o
    return list(full.view(len(orders), n_steps, batch_size).unbind(1))


@torch.no_grad()
def _evaluate(img: ExpertHeads, gen: ExpertHeads, plan: list[Tensor], xt: Tensor, gt: Tensor,
              loss_fn: Any, temperature: float, dev: torch.device, e_all: int,
              shared: bool = False) -> np.ndarray:
    """Per-expert validation loss: row-weighted mean over the fixed validation batches."""
    img.eval()
    gen.eval()
    loss_sum, rows_sum = np.zeros(e_all), np.zeros(e_all)
    for idx in plan:
        active = (idx >= 0).any(dim=1)
        act = torch.nonzero(active).flatten()
        sub = idx[act]
        mask = (sub >= 0).to(dev)
        safe = sub.clamp_min(0).to(xt.device)
        which = None if len(act) == e_all else act.to(dev)
        losses = loss_fn(img.forward_stacked(xt[safe].to(dev), which),
                         _gene_forward(gen, gt[safe].to(dev), which, e_all), temperature, mask)
        n_rows = mask.sum(dim=1).cpu().numpy()
        a = active.numpy()
        loss_sum[a] += losses.cpu().numpy() * n_rows
        rows_sum[a] += n_rows
    img.train()
    gen.train()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows_sum > 0, loss_sum / rows_sum, np.nan)


def _named(img: ExpertHeads, gen: ExpertHeads) -> dict[str, Tensor]:
    out = {f"image.{k}": v for k, v in img.named_parameters()}
    out.update({f"gene.{k}": v for k, v in gen.named_parameters()})
    return out


def _copy_heads(h: ExpertHeads) -> ExpertHeads:
    new = ExpertHeads(h.n_experts, h.in_dim, h.out_dim, h.dropout_p)
    new.load_state_dict(h.state_dict())
    return new


def _check_expert(expert: Any, name: str, n: int, n_experts: int) -> np.ndarray:
    ex = as_int_array(expert, name, n)
    if n and (ex.min() < 0 or ex.max() >= n_experts):
        raise ValueError(f"`{name}` must lie in [0, {n_experts}) (`n_experts`), got values in "
                         f"[{ex.min()}, {ex.max()}].")
    return ex
