"""The training options shared by SPADE's experts and mclSTExp: one object, checked once.

The ``tl`` trainers build a :class:`FitOptions` from their arguments (so bad values fail before
any feature is computed) and hand it to :func:`~sq_spade.train.fit_experts` or
:func:`~sq_spade.train.fit_contrastive`; called directly, those build one from their keyword
arguments. Options that belong to one method only (the spot encoder's size, mclSTExp's
schedule, SPADE's warm-up) stay arguments of its trainer.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Any

from sq_spade import _constants as K
from sq_spade._validation import check_choice, check_positive_float, check_positive_int


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """How to train: epochs, batches, optimiser, loss, early stopping, seed, device, checkpoints.

    The defaults are SPADE's (:meth:`experts`); :meth:`contrastive` gives mclSTExp's. Every
    value is checked when the object is made, with an error naming the option.

    Attributes
    ----------
    epochs
        Passes over the training spots.
    batch_size
        Spots per batch (per expert for SPADE).
    lr, weight_decay
        Optimiser settings (AdamW for SPADE, Adam for mclSTExp).
    loss
        ``"bleep"`` (soft targets) or ``"clip"`` (identity targets).
    temperature
        Loss temperature.
    patience
        Early stopping: epochs without validation improvement; ``None``: train every epoch
        (the best validation epoch is still kept).
    seed
        Seeds initialisation, shuffling, dropout and augmentation.
    device
        ``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"`` or a torch device.
    checkpoint_dir
        Folder for training checkpoints (``None``: none), see :func:`~sq_spade.train.read_checkpoint`.
    checkpoint_every
        Epochs between checkpoints (one is also written when the run ends).
    resume
        ``False``: start fresh. ``True``: continue from the checkpoint in ``checkpoint_dir``
        (a fresh start when it holds none). A path: continue from that checkpoint folder.

    Examples
    --------
    >>> opts = FitOptions.contrastive(epochs=5)
    >>> opts.loss, opts.epochs, opts.replace(seed=1).seed
    ('clip', 5, 1)
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-2
    loss: K.Loss = "bleep"
    temperature: float = 1.0
    patience: int | None = None
    seed: int = 0
    device: Any = "auto"
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 10
    resume: bool | str | os.PathLike = False

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("epochs", check_positive_int(self.epochs, "epochs"))
        put("batch_size", check_positive_int(self.batch_size, "batch_size"))
        put("lr", check_positive_float(self.lr, "lr"))
        put("weight_decay", check_positive_float(self.weight_decay, "weight_decay", allow_zero=True))
        check_choice(self.loss, "loss", K.LOSSES)
        put("temperature", check_positive_float(self.temperature, "temperature"))
        put("patience", check_positive_int(self.patience, "patience", allow_none=True))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"`seed` must be an integer, got {self.seed!r}.")
        put("seed", int(self.seed))
        put("checkpoint_every", check_positive_int(self.checkpoint_every, "checkpoint_every"))
        if not isinstance(self.resume, (bool, str, os.PathLike)):
            raise TypeError(f"`resume` must be False, True or the path of a checkpoint folder, "
                            f"got {type(self.resume).__name__}.")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"`checkpoint_dir` must be None or a folder path, "
                            f"got {type(self.checkpoint_dir).__name__}.")
        if self.resume is True and self.checkpoint_dir is None:
            raise ValueError("`resume=True` continues from `checkpoint_dir`, which is None; pass "
                             "`checkpoint_dir` (or `resume=<checkpoint folder>`).")

    @classmethod
    def experts(cls, **options: Any) -> FitOptions:
        """SPADE's settings (100 epochs, AdamW 1e-4 / 1e-2, BLEEP loss), with ``options`` changed."""
        return cls().replace(**options)

    @classmethod
    def contrastive(cls, **options: Any) -> FitOptions:
        """The settings of mclSTExp (90 epochs, Adam 1e-4 / 1e-3, CLIP loss, patience 10), with ``options`` changed."""
        return cls(epochs=90, weight_decay=1e-3, loss="clip", patience=10).replace(**options)

    def replace(self, **options: Any) -> FitOptions:
        """A copy with ``options`` changed (checked again)."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"Unknown training options {unknown}; FitOptions has "
                            f"{[f.name for f in dataclasses.fields(self)]}.")
        return dataclasses.replace(self, **options) if options else self

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share with the saved one (device and checkpointing may change)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "loss": self.loss, "temperature": self.temperature,
                "patience": self.patience, "seed": self.seed}


def resolve_options(options: FitOptions | None, preset: FitOptions, overrides: dict[str, Any]) -> FitOptions:
    """``options`` (or the trainer's ``preset``) with the keyword ``overrides`` a trainer received."""
    if options is not None and not isinstance(options, FitOptions):
        raise TypeError(f"`options` must be a sq_spade.train.FitOptions, got {type(options).__name__}.")
    return (preset if options is None else options).replace(**overrides)
