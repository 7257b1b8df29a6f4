"""Training loops (arrays in, modules and a history out) for SPADE's experts and mclSTExp."""

from sq_spade.train._checkpoint import CheckpointError, read_checkpoint
from sq_spade.train._common import (
    CosineSchedule,
    EarlyStopping,
    History,
    cosine_schedule,
    history_to_json,
    load_checkpoint_state,
    make_generator,
    seeded,
    state_for_checkpoint,
)
from sq_spade.train._contrastive import ContrastiveFit, default_augmentation, fit_contrastive
from sq_spade.train._experts import StackedAdamW, TrainingWindows, fit_experts

__all__ = [
    "CheckpointError",
    "ContrastiveFit",
    "CosineSchedule",
    "EarlyStopping",
    "History",
    "StackedAdamW",
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
