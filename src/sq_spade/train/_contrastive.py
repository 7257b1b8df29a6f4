"""Training mclSTExp: an image projection head (optionally its encoder) and a spot encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from sq_spade import _constants as K
from sq_spade._metrics import gene_correlations
from sq_spade._utils import progress, resolve_device
from sq_spade._validation import check_choice, check_positive_int
from sq_spade.nn.heads import ProjectionHead
from sq_spade.nn.inference import encode_images
from sq_spade.nn.losses import bleep_loss, clip_loss
from sq_spade.nn.retrieval import combine_keys, retrieve_predict
from sq_spade.nn.spot_encoder import SpotEncoder
from sq_spade.train._checkpoint import (
    Checkpointer,
    encoder_fingerprint,
    fingerprint,
    trained_state_keys,
)
from sq_spade.train._common import (
    EarlyStopping,
    History,
    as_float_array,
    as_int_array,
    check_loss_finite,
    cosine_schedule,
    make_generator,
    seeded,
)
from sq_spade.train._distributed import DistributedContext, resolve_distributed
from sq_spade.train._finetune import select_finetune
from sq_spade.train._options import FitOptions, resolve_options

_LOSSES = {"clip": clip_loss, "bleep": bleep_loss}
#: mclSTExp's training options (90 epochs, Adam 1e-4 / 1e-3, CLIP loss, patience 10).
_DEFAULTS = FitOptions.contrastive()


class ContrastiveFit(NamedTuple):
    """What :func:`fit_contrastive` returns (unpacks as a 4-tuple)."""

    image_head: ProjectionHead
    """Image projection head, ``D -> out_dim``."""
    spot_encoder: SpotEncoder
    """Spot encoder, ``G -> out_dim``."""
    history: dict[str, Any]
    """Per-epoch losses and the best epoch."""
    image_encoder: nn.Module | None
    """The (fine-tuned) image encoder when one was given, else ``None``."""


class _RandomRot90(nn.Module):
    """Rotate a ``(C, H, W)`` image by a random multiple of 90 degrees (exact, no resampling)."""

    def forward(self, img: Tensor) -> Tensor:
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(img, k, dims=(-2, -1))


def default_augmentation() -> nn.Module:
    """mclSTExp-style augmentation of a uint8 ``(C, H, W)`` patch.

    Colour jitter (brightness, contrast, saturation 0.5), horizontal and vertical flips, and
    rotations by multiples of 90 degrees (exact on square patches; mclSTExp used arbitrary
    rotations, which resample and bring in corners from outside the spot).

    Examples
    --------
    >>> import torch
    >>> aug = default_augmentation()
    >>> aug(torch.zeros(3, 8, 8, dtype=torch.uint8)).shape
    torch.Size([3, 8, 8])
    """
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        _RandomRot90(),
    ])


class _Patches(torch.utils.data.Dataset):
    """Index ``i`` -> (uint8 ``(C, H, W)`` patch, possibly augmented, ``i``).

    The augmentation of patch ``i`` draws from torch's RNG seeded by (``seed``, ``epoch``, ``i``),
    so it is the same whichever process or DataLoader worker loads the patch.
    """

    def __init__(self, images: torch.utils.data.Dataset, augment: Callable | None,
                 seed: int = 0) -> None:
        self.images, self.augment, self.seed, self.epoch = images, augment, seed, 0

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.images[i]
        t = img if isinstance(img, Tensor) else torch.from_numpy(np.asarray(img))
        if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[-1] not in (1, 3, 4):
            raise ValueError(f"`images[{i}]` must be a uint8 (H, W, C) patch with C in (1, 3, 4), "
                             f"got dtype {t.dtype} and shape {tuple(t.shape)}.")
        t = t[..., :3].permute(2, 0, 1).contiguous()  # HWC -> CHW, alpha dropped
        if self.augment is not None:
            item_seed = np.random.SeedSequence([self.seed % 2**63, self.epoch, i]).generate_state(1)
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(int(item_seed[0]))
                t = self.augment(t)
        return t, i


def fit_contrastive(features: np.ndarray | None, expr: np.ndarray, pos: np.ndarray | None = None,
                    context: np.ndarray | str | None = None, *,
                    val_features: np.ndarray | None = None, val_expr: np.ndarray | None = None,
                    val_pos: np.ndarray | None = None,
                    val_context: np.ndarray | str | None = None,
                    images: torch.utils.data.Dataset | None = None,
                    val_images: torch.utils.data.Dataset | None = None,
                    image_encoder: nn.Module | None = None, finetune: K.Finetune | Sequence[str] = "all",
                    augment: bool | Callable = True,
                    preprocess: Callable[[Tensor], Tensor] | None = None,
                    n_x: int | None = None, n_y: int | None = None, out_dim: int = 256,
                    dropout: float = 0.1, depth: int = 2, heads: int = 8, dim_head: int = 64,
                    mlp_dim: int | None = None, encoder_dropout: float = 0.0,
                    schedule: K.Schedule = "constant", num_workers: int = 0,
                    distributed: bool | str = "auto", options: FitOptions | None = None,
                    select: K.Select = "loss", keys: K.Keys = "spot", k: int = 200,
                    values: np.ndarray | None = None, val_values: np.ndarray | None = None,
                    **training: Any) -> ContrastiveFit:
    """Train mclSTExp: an image projection head and a :class:`SpotEncoder`, contrastively.

    Two ways to feed images:

    - **frozen backbone** (default): ``features`` are cached image features ``(N, D)``; only
      the image head and the spot encoder train. Features ``(N, V, D)`` hold ``V`` views of
      each patch (e.g. the 8 dihedral views): each batch takes a random view of every spot
      (augmentation on frozen features); validation features and retrieval keys are ``(N, D)``
      (the mean over views of the training features);
    - **trainable encoder**: ``features=None``, ``images`` a dataset whose item ``i`` is the
      uint8 ``(H, W, C)`` patch of spot ``i``, and ``image_encoder`` a module mapping a float
      batch ``(B, 3, H, W)`` in ``[0, 1]`` (after ``preprocess``) to ``(B, D)`` (a 4-D output
      is average-pooled). ``finetune`` picks which of its parameters train.

    Each epoch shuffles all training spots into batches of ``batch_size``; within a batch the
    spot encoder's attention follows ``context`` (see :meth:`SpotEncoder.forward`: ``None``,
    the mclSTExp way, lets the whole batch attend to each other). Adam (``lr``,
    ``weight_decay``), as mclSTExp. With validation data the loss on fixed validation batches is
    recorded each epoch, training stops after ``patience`` epochs without improvement, and the
    weights of the best epoch are restored; without validation the last epoch is kept. With
    ``select="acg"`` (frozen features) the best epoch is the one whose validation ACG is
    highest: the validation spots are predicted by retrieval (``keys``, ``k`` neighbours,
    inverse squared L2 weights) from the training spots and their ``values``, and scored
    against ``val_values`` (the mean Pearson r over genes). At small data the loss keeps
    falling after retrieval has peaked, so the loss picks too late an epoch.

    Under ``torchrun --nproc_per_node=N`` it trains with DistributedDataParallel: each process
    encodes its contiguous part of every global batch of ``batch_size`` spots, the features are
    all-gathered, and every process computes the whole batch's loss, so that the weights match a
    single-process run up to float rounding (see :mod:`sq_spade.train._distributed`); every
    process returns the same model. The gain is in the image encoder: with cached ``features``
    each process does the whole (small) computation.

    Parameters
    ----------
    features
        Cached image features ``(N, D)``, or ``None`` with ``images`` and ``image_encoder``.
    expr
        Normalised expression ``(N, G)`` (the spot encoder's input and the retrieval values).
    pos
        Integer grid positions ``(N, 2)`` (x, y), or ``None`` for no position embeddings.
    context
        Group id per spot ``(N,)`` restricting attention within a batch to the same group,
        ``"self"`` (each spot alone) or ``None`` (the whole batch, as mclSTExp).
    val_features, val_expr, val_pos, val_context
        Validation spots (held-out slides), same conventions; ``val_images`` replaces
        ``val_features`` with a trainable encoder.
    images, val_images
        Datasets of uint8 ``(H, W, C)`` patches, item ``i`` for spot ``i``.
    image_encoder
        Image encoder to fine-tune (moved to ``device``, trained in place).
    finetune
        ``"all"`` its parameters, ``"last"`` those of its last block (see
        :func:`~sq_spade.train._finetune.last_block_prefixes`: EfficientNet's last stage and
        head, ResNet's ``layer4[-1]``...; a registry backbone's wrapper is looked through),
        ``"none"`` (frozen, in eval mode), or a sequence of parameter-name prefixes.
    augment
        With ``images``: ``True`` for :func:`default_augmentation` (per patch, training only),
        ``False`` for none, or a callable on uint8 ``(C, H, W)`` tensors.
    preprocess
        Applied to the float ``[0, 1]`` batch on the device before the encoder (for example a
        normalisation); ``None``: none, as mclSTExp.
    n_x, n_y
        Position-table sizes; ``None``: one more than the largest position in the training and
        validation data.
    out_dim, dropout
        Latent dimension and projection-head dropout.
    depth, heads, dim_head, mlp_dim, encoder_dropout
        Spot-encoder transformer settings (see :class:`SpotEncoder`).
    schedule
        ``"constant"`` learning rate (mclSTExp) or ``"cosine"`` (stepped per batch).
    num_workers
        DataLoader workers for ``images`` (per process under ``torchrun``).
    distributed
        ``"auto"``: DistributedDataParallel when launched by ``torchrun`` with several
        processes (or within an initialised process group); ``True``: require it; ``False``:
        train alone (under ``torchrun`` every process then trains the same model on its own).
    select
        What picks the best epoch with validation data: ``"loss"`` (mclSTExp) or ``"acg"``.
    keys
        Retrieval keys of the validation ACG: ``"spot"`` (spot-encoder embeddings of the
        training spots), ``"image"`` (their image embeddings) or ``"both"`` (see
        :func:`~sq_spade.nn.retrieval.combine_keys`).
    k
        Neighbours retrieved for the validation ACG (at most the training spots).
    values, val_values
        Retrieval values of the training spots and observed values of the validation spots for
        the validation ACG (default ``expr`` and ``val_expr``; pass log1p CP10k when ``expr``
        is raw counts).
    options
        The training options (:class:`FitOptions`); default :meth:`FitOptions.contrastive`:
        mclSTExp's 90 epochs, batches of 128, Adam with ``lr`` 1e-4 and ``weight_decay`` 1e-3,
        the CLIP loss at temperature 1, early-stopping ``patience`` 10 (with validation data),
        seed 0, device ``"auto"``.
    **training
        Single options changed from ``options`` (``epochs=``, ``batch_size=``, ``lr=``,
        ``weight_decay=``, ``loss=``, ``temperature=``, ``patience=``, ``seed=``, ``device=``,
        ``checkpoint_dir=``, ``checkpoint_every=``, ``resume=``). Checkpoints (written every
        ``checkpoint_every`` epochs into ``checkpoint_dir``, each replacing the last
        atomically) hold, with an ``image_encoder``, its trained parameters and buffers (not
        the frozen ones) and their optimizer state: about four times the trained parameters.
        ``resume``: ``True`` continues from the checkpoint in ``checkpoint_dir`` (or starts
        fresh when it holds none yet, so one command serves the first launch and every
        restart), a path continues from that folder. A resumed run ends, on the same device,
        with exactly the weights and history of the uninterrupted run; resuming a run that had
        ended returns its result without training. The arguments, data and frozen encoder
        weights must be those of the saved run (a ValueError names what differs); only
        ``device``, ``checkpoint_dir`` and ``checkpoint_every`` may change. Pass an image
        encoder built as for the first run.

    Returns
    -------
    :class:`ContrastiveFit` ``(image_head, spot_encoder, history, image_encoder)``, modules on
    the CPU in eval mode. ``history``: ``train_loss``, ``val_loss`` (NaN without validation),
    ``lr`` per epoch, ``val_acg`` per epoch (``select="acg"``), ``best_epoch`` (-1 without
    validation), ``best_val_loss``,
    ``stopped_early``, ``n_epochs``, ``n_x``, ``n_y``, ``world_size`` (processes that trained).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> f, e = rng.normal(size=(32, 8)).astype("f4"), rng.random((32, 6)).astype("f4")
    >>> pos = rng.integers(0, 5, size=(32, 2))
    >>> fit = fit_contrastive(f, e, pos, epochs=2, batch_size=16, heads=2, dim_head=4,
    ...                       out_dim=8, device="cpu")
    >>> fit.history["train_loss"].shape
    (2,)
    """
    # --- checks -------------------------------------------------------------------------------
    opts = resolve_options(options, _DEFAULTS, training)
    check_choice(schedule, "schedule", K.SCHEDULES)
    check_positive_int(num_workers, "num_workers", allow_zero=True)
    check_choice(select, "select", K.SELECTS)
    check_choice(keys, "keys", K.KEYS)
    k = check_positive_int(k, "k")
    use_images = image_encoder is not None
    if select == "acg" and (use_images or val_expr is None):
        raise ValueError("`select='acg'` needs validation data (`val_expr`) and cached `features` "
                         "(it retrieves with the frozen features' embeddings).")
    if use_images:
        if not isinstance(image_encoder, nn.Module):
            raise TypeError("`image_encoder` must be a torch.nn.Module.")
        if features is not None:
            raise ValueError("Pass either `features` (frozen backbone) or `images` with "
                             "`image_encoder`, not both: `features` must be None.")
        if images is None:
            raise ValueError("`images` is required with `image_encoder`.")
        if val_features is not None:
            raise ValueError("With `image_encoder`, pass `val_images`, not `val_features`.")
    elif features is None:
        raise ValueError("`features` is required unless `images` and `image_encoder` are given.")
    elif images is not None or val_images is not None:
        raise ValueError("`images` needs `image_encoder`; with cached `features` leave it None.")

    e_tr = as_float_array(expr, "expr")
    n = e_tr.shape[0]
    f_tr = None if use_images else as_float_array(
        features, "features", ndim=3 if np.ndim(features) == 3 else 2)
    if f_tr is not None and f_tr.shape[0] != n:
        raise ValueError(f"`features` must have {n} rows (as `expr`), got {f_tr.shape[0]}.")
    if use_images and len(images) != n:  # type: ignore[arg-type]
        raise ValueError(f"`images` must hold {n} patches (as `expr` has rows), "
                         f"got {len(images)}.")  # type: ignore[arg-type]
    p_tr = _check_pos(pos, "pos", n)
    c_tr = _check_context(context, "context", n)

    has_val = val_expr is not None
    if has_val:
        e_va = as_float_array(val_expr, "val_expr")
        nv = e_va.shape[0]
        if e_va.shape[1] != e_tr.shape[1]:
            raise ValueError(f"`val_expr` must have {e_tr.shape[1]} columns, got {e_va.shape[1]}.")
        if use_images:
            if val_images is None or len(val_images) != nv:  # type: ignore[arg-type]
                raise ValueError(f"`val_images` must hold {nv} patches (as `val_expr` has rows).")
            f_va = None
        else:
            if val_features is None:
                raise ValueError("`val_features` is required with `val_expr`.")
            f_va = as_float_array(val_features, "val_features")
            if f_va.shape != (nv, f_tr.shape[-1]):  # type: ignore[union-attr]
                raise ValueError(f"`val_features` must have shape {(nv, f_tr.shape[-1])}, "
                                 f"got {f_va.shape}.")  # type: ignore[union-attr]
        if (pos is None) != (val_pos is None):
            raise ValueError("`val_pos` must be given exactly when `pos` is.")
        p_va = _check_pos(val_pos, "val_pos", nv)
        if val_context is None and isinstance(c_tr, np.ndarray):
            raise ValueError("`val_context` (group ids of the validation spots) is required "
                             "when `context` holds group ids.")
        # 'self' carries over to validation; None stays None (whole batch)
        c_va = _check_context(context if val_context is None else val_context, "val_context", nv)
    elif any(v is not None for v in (val_features, val_pos, val_images)):
        raise ValueError("`val_expr` is required with `val_features`, `val_pos` or `val_images`.")
    acg_data = None
    if select == "acg":
        v_tr = e_tr if values is None else as_float_array(values, "values")
        v_va = e_va if val_values is None else as_float_array(val_values, "val_values")
        if v_tr.shape[0] != n or v_va.shape[0] != nv or v_tr.shape[1] != v_va.shape[1]:
            raise ValueError(f"`values` and `val_values` must have {n} and {nv} rows and the same columns, "
                             f"got {v_tr.shape} and {v_va.shape}.")
        acg_data = {"values": v_tr, "val_values": v_va, "keys": keys, "k": min(k, n)}

    if p_tr is not None:
        allpos = p_tr if not has_val else np.concatenate([p_tr, p_va])
        n_x = int(allpos[:, 0].max()) + 1 if n_x is None else n_x
        n_y = int(allpos[:, 1].max()) + 1 if n_y is None else n_y
    else:
        n_x = n_y = None

    # the spot encoder's arguments, beside its input size (the panel)
    spot_args = dict(n_x=n_x, n_y=n_y, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim,
                     dropout=encoder_dropout, out_dim=out_dim, head_dropout=dropout)
    ckpt = Checkpointer.open(opts, kind="fit_contrastive", fingerprint=lambda: fingerprint(
        {**opts.fingerprint(), "n_x": n_x, "n_y": n_y, "out_dim": out_dim, "dropout": dropout, "depth": depth,
         "heads": heads, "dim_head": dim_head, "mlp_dim": mlp_dim, "encoder_dropout": encoder_dropout,
         "schedule": schedule, "augment": augment, "preprocess": preprocess, "finetune": finetune,
         "num_workers": num_workers,
         # added later: only when not the defaults, so that older checkpoints still resume
         **({"select": select, "keys": keys, "k": k} if select != "loss" else {})},
        {"features": f_tr, "expr": e_tr, "pos": p_tr, "context": c_tr,
         "images": len(images) if use_images else None,  # type: ignore[arg-type]
         **({"values": acg_data["values"], "val_values": acg_data["val_values"]} if acg_data else {}),
         "image_encoder": encoder_fingerprint(image_encoder, select_finetune(
             image_encoder, finetune, quiet=True)[0]) if use_images else None,
         **({"val_features": f_va, "val_expr": e_va, "val_pos": p_va, "val_context": c_va,
             "val_images": len(val_images) if use_images else None}  # type: ignore[arg-type]
            if has_val else {})}))
    dev = resolve_device(opts.device)
    ddp = resolve_distributed(distributed, dev)
    dev = ddp.device
    with seeded(opts.seed, dev), ddp.synced_batchnorm(image_encoder, finetune != "none"):
        return _fit(
            f_tr, e_tr, p_tr, c_tr,
            (f_va, e_va, p_va, c_va) if has_val else None,
            images=images, val_images=val_images, image_encoder=image_encoder,
            finetune=finetune, augment=augment, preprocess=preprocess, spot_args=spot_args,
            schedule=schedule, opts=opts, dev=dev, num_workers=num_workers, ckpt=ckpt, ddp=ddp,
            acg_data=acg_data,
        )


def _fit(f_tr: np.ndarray | None, e_tr: np.ndarray, p_tr: np.ndarray | None,
         c_tr: np.ndarray | str | None, val: tuple | None, *, images: Any, val_images: Any,
         image_encoder: nn.Module | None, finetune: str | Sequence[str],
         augment: bool | Callable, preprocess: Callable | None, spot_args: dict[str, Any],
         schedule: str, opts: FitOptions, dev: torch.device, num_workers: int,
         ddp: DistributedContext, ckpt: Checkpointer | None = None,
         acg_data: dict[str, Any] | None = None) -> ContrastiveFit:
    epochs, batch_size, seed, temperature = opts.epochs, opts.batch_size, opts.seed, opts.temperature
    loss_fn = _LOSSES[opts.loss]
    n_x, n_y = spot_args["n_x"], spot_args["n_y"]
    n, n_genes = e_tr.shape
    shuffler = make_generator(seed)
    use_images = image_encoder is not None

    # --- modules ----------------------------------------------------------------------------
    trainable_enc: list[nn.Parameter] = []
    train_modules: list[nn.Module] = []
    if use_images:
        encoder = image_encoder.to(dev)  # type: ignore[union-attr]
        trainable_enc, train_modules = select_finetune(encoder, finetune)
        ddp.warn_batchnorm(train_modules)
        requires_grad = [p.requires_grad for p in encoder.parameters()]
        for p in encoder.parameters():
            p.requires_grad_(False)
        for p in trainable_enc:
            p.requires_grad_(True)
        aug = (default_augmentation() if augment is True else augment) or None
        loader_tr = _loader(images, aug, num_workers, seed)
        probe, _ = _Patches(images, None)[0]
        encoder.eval()
        with torch.no_grad():
            image_dim = encode_images(encoder, probe[None].to(dev), preprocess).shape[1]
    else:
        encoder = None
        image_dim = f_tr.shape[-1]  # type: ignore[union-attr]
    head = ProjectionHead(image_dim, spot_args["out_dim"], spot_args["head_dropout"]).to(dev)
    spot = SpotEncoder(n_genes, **spot_args).to(dev)
    params = list(head.parameters()) + list(spot.parameters()) + trainable_enc
    opt = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    # DistributedDataParallel wrappers (the modules themselves when not distributed)
    head_t, spot_t = ddp.wrap(head), ddp.wrap(spot)
    encoder_t = ddp.wrap(encoder) if encoder is not None else None
    steps_per_epoch = -(-n // batch_size)
    sched = cosine_schedule(opt, epochs * steps_per_epoch) if schedule == "cosine" else None

    et = torch.from_numpy(e_tr)
    ft = None if f_tr is None else torch.from_numpy(f_tr)
    pt = None if p_tr is None else torch.from_numpy(p_tr)
    ct = torch.from_numpy(c_tr) if isinstance(c_tr, np.ndarray) else c_tr
    n_views = 1 if ft is None or ft.ndim == 2 else ft.shape[1]
    view_gen = make_generator(seed + 3)
    # retrieval keys of the validation ACG: the mean view of each training spot
    f_keys = None if ft is None else (ft if ft.ndim == 2 else ft.mean(dim=1))

    if val is not None:
        f_va, e_va, p_va, c_va = val
        vt = {
            "f": None if f_va is None else torch.from_numpy(f_va),
            "e": torch.from_numpy(e_va), "p": None if p_va is None else torch.from_numpy(p_va),
            "c": torch.from_numpy(c_va) if isinstance(c_va, np.ndarray) else c_va,
        }
        val_order = torch.randperm(len(e_va), generator=make_generator(seed + 1))
        val_batches = list(val_order.split(batch_size))

    def set_train(flag: bool) -> None:
        head.train(flag)
        spot.train(flag)
        if encoder is not None:
            encoder.eval()
            for m in train_modules:
                m.train(flag)

    def batch_loss(img_feats: Tensor, idx: Tensor, tens: dict[str, Any],
                   modules: tuple[nn.Module, nn.Module] = (head, spot)) -> Tensor:
        e = tens["e"][idx].to(dev)
        p = None if tens["p"] is None else tens["p"][idx].to(dev)
        c = tens["c"][idx].to(dev) if isinstance(tens["c"], Tensor) else tens["c"]
        return loss_fn(modules[0](img_feats), modules[1](e, p, c), temperature)

    train_t = {"e": et, "p": pt, "c": ct}
    stopper = EarlyStopping(opts.patience)
    best_state: dict[str, Any] | None = None
    history = History()
    stopped_early = False
    start, stop = 0, epochs
    if ckpt is not None:
        enc_keys = trained_state_keys(encoder, trainable_enc) if use_images else []
        resumed = ckpt.attach(
            {"head": head, "spot": spot}, opt, sched,
            {"shuffler": shuffler, **({"loader": loader_tr.generator} if use_images else {})},
            history=history, stopper=stopper,
            partial={"encoder": (encoder, enc_keys)} if use_images else None)
        if resumed is not None:
            start, stop = resumed.epoch, (resumed.epoch if resumed.finished else epochs)
            stopped_early = bool(resumed.values["stopped_early"])
            if resumed.values["has_best"]:
                best_state = {"head": resumed.prefixed("best.head."),
                              "spot": resumed.prefixed("best.spot.")}
                if encoder is not None:  # frozen parts as they are, trained ones as saved
                    best_state["encoder"] = {**_clone_state(encoder),
                                             **resumed.prefixed("best.encoder.")}

    def checkpoint(epoch: int) -> None:
        if ckpt is None:
            return
        best = {f"best.{name}.{k}": v for name, sd in (best_state or {}).items()
                for k, v in sd.items() if name != "encoder" or k in enc_keys}
        ckpt.end_epoch(epoch + 1, stopped_early or epoch + 1 == epochs, tensors=best,
                       values={"stopped_early": stopped_early,
                               "has_best": best_state is not None})

    for epoch in progress(range(start, stop), total=epochs, initial=start,
                           desc="training mclSTExp"):
        set_train(True)
        order = torch.randperm(n, generator=shuffler)
        total, rows = 0.0, 0
        global_batches = order.split(batch_size)
        if use_images:  # each process loads its part of every global batch
            loader_tr.dataset.epoch = epoch  # type: ignore[attr-defined]
            loader_tr.batch_sampler.batches = [ddp.shard(b).tolist() for b in global_batches]
            batches = zip(global_batches, (imgs for imgs, _ in loader_tr), strict=True)
        else:
            batches = ((idx, None) for idx in global_batches)
        for idx, imgs in batches:
            if use_images:
                with torch.set_grad_enabled(bool(trainable_enc)):
                    feats = ddp.gather(encode_images(encoder_t, imgs.to(dev), preprocess), len(idx))
            elif ft is not None and ft.ndim == 3:  # a random view of each spot
                view = torch.randint(n_views, (len(idx),), generator=view_gen)
                feats = ft[idx, view].to(dev)  # type: ignore[index]
            else:
                feats = ft[idx].to(dev)  # type: ignore[index]
            loss = batch_loss(feats, idx, train_t, (head_t, spot_t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(idx)
            rows += len(idx)
        train_loss = total / max(rows, 1)
        cur_lr = opt.param_groups[0]["lr"]
        check_loss_finite(ddp.agree(train_loss)[0], epoch, cur_lr)  # every rank stops together

        if val is None:
            history.append(ddp.agree(train_loss)[0], np.nan, cur_lr)
            checkpoint(epoch)
            continue
        set_train(False)
        ddp.broadcast(encoder, buffers_only=True)  # BatchNorm statistics as on rank 0
        with torch.no_grad():
            vtotal = 0.0
            if use_images:
                loader_va = _loader(val_images, None, num_workers, seed)
                loader_va.batch_sampler.batches = [ddp.shard(b).tolist() for b in val_batches]
                vbatches = ((ddp.gather(encode_images(encoder, im.to(dev), preprocess), len(ix)), ix)
                            for ix, (im, _) in zip(val_batches, loader_va, strict=True))
            else:
                vbatches = ((vt["f"][ix].to(dev), ix) for ix in val_batches)
            for feats, ix in vbatches:
                vtotal += float(batch_loss(feats, ix, vt)) * len(ix)
        # rank 0's losses everywhere: early stopping decides the same on every process
        train_loss, val_loss = ddp.agree(train_loss, vtotal / len(val_order))
        history.append(train_loss, val_loss, cur_lr)
        score = val_loss
        if acg_data is not None:
            acg = ddp.agree(_validation_acg(head, spot, f_keys, vt["f"], et, pt, ct, acg_data, dev))[0]
            history.extra.setdefault("val_acg", []).append(acg)
            score = -acg  # early stopping minimises
        if stopper.step(score):
            best_state = {"head": _clone_state(head), "spot": _clone_state(spot)}
            if encoder is not None:
                best_state["encoder"] = _clone_state(encoder)
        if stopper.stop:
            stopped_early = True
        checkpoint(epoch)
        if stopped_early:
            break

    if best_state is not None:
        head.load_state_dict(best_state["head"])
        spot.load_state_dict(best_state["spot"])
        if encoder is not None:
            encoder.load_state_dict(best_state["encoder"])
    ddp.unwrap(head_t, spot_t, encoder_t)  # type: ignore[arg-type]
    ddp.broadcast(head, spot, encoder)  # every process returns rank 0's model
    history.best_epoch = stopper.best_epoch if val is not None else -1
    best_loss = float(history.val_loss[stopper.best_epoch]) if best_state is not None else float("nan")
    if "val_acg" in history.extra:
        history.extra["val_acg"] = np.asarray(history.extra["val_acg"], dtype=np.float64)
    history.extra.update({
        "best_val_loss": best_loss,
        "stopped_early": stopped_early, "n_x": n_x, "n_y": n_y, "world_size": ddp.world_size,
    })
    if encoder is not None:
        for p, flag in zip(encoder.parameters(), requires_grad, strict=True):
            p.requires_grad_(flag)  # hand the encoder back as it came
        encoder = encoder.cpu().eval()
    return ContrastiveFit(head.cpu().eval(), spot.cpu().eval(), history.to_dict(), encoder)


# --- helpers ----------------------------------------------------------------------------------
def _embed_spots(spot: nn.Module, e: Tensor, p: Tensor | None, c: Tensor | str | None, dev: torch.device,
                 chunk: int = 4096) -> np.ndarray:
    """Spot embeddings of every training spot: each alone, or within its group (chunks never split a group)."""
    n = len(e)
    if not isinstance(c, Tensor):  # "self" or the whole batch: the keys of each spot alone
        bounds, order, ids = list(range(0, n, chunk)) + [n], torch.arange(n), None
    else:
        ids = torch.unique(c, return_inverse=True)[1]
        order = torch.argsort(ids, stable=True)
        starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool), ids[order][1:] != ids[order][:-1]]))
        bounds, last = [0], 0
        for st in starts.flatten().tolist()[1:]:
            if st - last >= chunk:
                bounds.append(st)
                last = st
        bounds.append(n)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        rows = order[a:b]
        if len(rows):
            parts.append((rows, spot(e[rows].to(dev), None if p is None else p[rows].to(dev),
                                     "self" if ids is None else ids[rows].to(dev)).float().cpu()))
    out = torch.empty((n, parts[0][1].shape[1]))
    for rows, emb in parts:
        out[rows] = emb
    return out.numpy()


def _validation_acg(head: nn.Module, spot: nn.Module, f_keys: Tensor, f_va: Tensor, e_tr: Tensor,
                    p_tr: Tensor | None, c_tr: Tensor | str | None, data: dict[str, Any],
                    dev: torch.device) -> float:
    """Validation ACG of retrieval from the training spots (modules in eval mode)."""
    keys = data["keys"]
    with torch.no_grad():
        q = head(f_va.to(dev)).float().cpu().numpy()
        sk = _embed_spots(spot, e_tr, p_tr, c_tr, dev) if keys != "image" else None
        ik = head(f_keys.to(dev)).float().cpu().numpy() if keys != "spot" else None
    qq, kk = combine_keys(q, spot_keys=sk, image_keys=ik, keys=keys)
    pred = retrieve_predict(qq, kk, data["values"], k=data["k"])
    r = gene_correlations(pred, data["val_values"])
    return float(np.nanmean(r)) if np.isfinite(r).any() else 0.0


class _BatchList(torch.utils.data.Sampler):
    """Yields the batches (lists of indices) set before each epoch by the training loop."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):  # noqa: D105
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader(images: Any, aug: Callable | None, num_workers: int,
            seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _Patches(images, aug, seed), batch_sampler=_BatchList(),
        num_workers=num_workers, generator=make_generator(seed + 2),
        persistent_workers=False,
    )


def _clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _check_pos(pos: Any, name: str, n: int) -> np.ndarray | None:
    if pos is None:
        return None
    arr = as_int_array(pos, name, n, ndim=2)
    if arr.shape[1] != 2:
        raise ValueError(f"`{name}` must have shape ({n}, 2), got {arr.shape}.")
    if arr.size and arr.min() < 0:
        raise ValueError(f"`{name}` must be non-negative grid positions, got a minimum of "
                         f"{arr.min()}.")
    return arr


def _check_context(context: Any, name: str, n: int) -> np.ndarray | str | None:
    if context is None:
        return None
    if isinstance(context, str):
        if context != "self":
            raise ValueError(f"`{name}` must be None, 'self' or an array of {n} group ids, "
                             f"got {context!r}.")
        return context
    return as_int_array(context, name, n)
