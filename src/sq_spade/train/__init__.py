"""Training loops (arrays in, modules and a history out) for SPADE's experts and mclSTExp.

No AnnData and no models here: :mod:`sq_spade.tl` turns tables into arrays and the returned
modules into :mod:`sq_spade.models`; :class:`FitOptions` carries the training options between them.
"""

from sq_spade.train._checkpoint import CheckpointError, read_checkpoint
from sq_spade.train._common import (
    CosineSchedule,
    EarlyStopping,
    History,
    TrainingDivergedError,
    cosine_schedule,
    history_to_json,
    load_checkpoint_state,
    make_generator,
    seeded,
    state_for_checkpoint,
)
from sq_spade.train._contrastive import ContrastiveFit, default_augmentation, fit_contrastive
from sq_spade.train._experts import StackedAdamW, TrainingWindows, fit_experts
from sq_spade.train._options import FitOptions

__all__ = [
    "CheckpointError",
    "ContrastiveFit",
    "CosineSchedule",
    "EarlyStopping",
    "FitOptions",
    "History",
    "StackedAdamW",
    "TrainingDivergedError",
    "TrainingWindows",
    "cosine_schedule",
    "default_augmentation",
    "fit_contrastive",
    "fit_experts",
    "history_to_json",
    "load_checkpoint_state",
    "make_generator",
    "read_checkpoint",
    "seeded",
    "state_for_checkpoint",
]
