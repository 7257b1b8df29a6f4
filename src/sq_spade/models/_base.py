"""The contract of every user-facing model: a config, its backbone and panel, save and load, feature checks.

:class:`Model` holds what :class:`~sq_spade.models.Spade`, :class:`~sq_spade.models.MclSTExp`,
:class:`~sq_spade.models.RidgeModel` and :class:`~sq_spade.models.KNNModel` share (scvi-tools'
``BaseModelClass`` in small); each keeps only its maths and says how its tensors go to and come
from the model-file format (:mod:`sq_spade._files`). :class:`ModelConfig` holds the keys every
model's configuration has.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sq_spade._config import JsonConfig, check
from sq_spade._files import ModelFileError, load_model_files, save_model_files
from sq_spade._validation import feature_recipe


def member_prefix(i: int) -> str:
    """Prefix of ensemble member ``i``'s tensors: ``""`` for the first (as in single models), ``"member<i>."``."""
    return "" if i == 0 else f"member{i}."


def _is_panel(genes: list) -> bool:
    return len(genes) > 0 and all(isinstance(g, str) for g in genes)


@dataclass(eq=False, kw_only=True)
class ModelConfig(JsonConfig):
    """Keys of every model's configuration: the features it reads and the genes it predicts.

    Attributes
    ----------
    backbone
        Backbone of the frozen features (or of the fine-tuned image encoder).
    feature_dim
        Dimension of those features.
    panel
        The gene panel, in the order of the model's outputs.
    weights_sha256
        sha256 of the backbone's weights (``None``: unknown); features computed with other
        weights are refused.
    train_sections, validation_sections
        Sections the model was trained and validated on.
    params
        Training parameters and provenance (free-form JSON). ``params["feature_recipe"]``
        records how the features were computed (``{"layers": [...], "tta": bool, "zscore":
        str | None}``, see :func:`sq_spade.pp.compute_features`); kept in ``params`` so files
        stay readable by format-1 readers, which refuse unknown top-level keys.
    """

    backbone: str
    feature_dim: int = field(metadata=check(lambda v: v > 0))
    panel: list[str] = field(metadata=check(_is_panel))
    weights_sha256: str | None = None
    train_sections: list[str] | None = None
    validation_sections: list[str] | None = None
    params: dict[str, Any] | None = None


class Model:
    """Base of the user-facing models.

    A subclass names its ``config_class`` and its ``file_class`` (the class recorded in the
    model folder), and implements :meth:`_to_files` and :meth:`_from_files`.

    Attributes
    ----------
    config
        The model's configuration (a :class:`ModelConfig` subclass; reads and writes like a dict).
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    file_class: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any]):
        self.config = self.config_class.from_mapping(config)

    # --- what every model has ---------------------------------------------------------------
    @property
    def backbone(self) -> str:
        """Backbone of the features the model reads."""
        return self.config.backbone

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of that backbone's weights."""
        return self.config.weights_sha256

    @property
    def feature_recipe(self) -> dict[str, Any]:
        """How the features the model reads are computed: layers, TTA and z-score.

        Features of a query are computed this way when absent, and refused when their
        provenance says otherwise. Models of earlier versions read the final layer, without TTA,
        not z-scored.
        """
        return feature_recipe((self.config.params or {}).get("feature_recipe"))

    @property
    def panel(self) -> list[str]:
        """The genes the model embeds or predicts, in order."""
        return list(self.config.panel)

    @property
    def history(self) -> dict[str, Any]:
        """Loss per epoch (empty for models without training epochs)."""
        return self.config.get("history") or {}

    def _check_features(self, features: Any, *, finite: bool = False) -> np.ndarray:
        """``features`` as float32 ``(N, feature_dim)``, or a ValueError naming the backbone."""
        x = np.asarray(features, dtype=np.float32)
        d = int(self.config.feature_dim)
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"`features` must be (N, {d}) features of backbone {self.backbone!r}, got shape {x.shape}.")
        if finite and not np.isfinite(x).all():
            raise ValueError("`features` contains NaN or infinite values.")
        return x

    # --- persistence ----------------------------------------------------------------------------
    def _to_files(self) -> tuple[dict[str, Any], Mapping[str, Any]]:
        """``(JSON config, tensors)`` to save."""
        raise NotImplementedError

    @classmethod
    def _from_files(cls, config: Any, tensors: dict[str, Any]) -> Model:
        """The model from its validated config and its tensors (torch, CPU)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as ``config.json`` + ``model-<sha>.safetensors`` into the folder ``path``.

        Under ``torchrun`` only rank 0 writes (every rank may call this; the models are the
        same); call ``torch.distributed.barrier()`` before other ranks read the folder.
        """
        config, tensors = self._to_files()
        return save_model_files(path, cls=self.file_class, config=config, tensors=tensors)

    @classmethod
    def _expected_shapes(cls, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
        """Shape of every tensor the config implies (``None``: nothing is built from the config's sizes).

        ``shapes`` are the stored tensors' shapes; a subclass builds its modules on torch's
        ``meta`` device (no memory) to list them.
        """
        return None

    @classmethod
    def _check_shapes(cls, config: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise :class:`ModelFileError` when the stored tensors do not fit the config's sizes."""
        try:
            expected = cls._expected_shapes(config, shapes)
        except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, NotImplementedError) as e:
            raise ModelFileError(f"The {cls.file_class} config does not describe buildable modules: {e}") from e
        if expected is None:
            return
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        if missing or unexpected:
            raise ModelFileError(f"The tensors file does not fit the {cls.file_class} config: missing "
                                 f"{missing[:10]}, unexpected {unexpected[:10]}.")
        wrong = [f"{k} {shapes[k]} (config: {expected[k]})" for k in sorted(expected) if tuple(shapes[k]) != tuple(expected[k])]
        if wrong:
            raise ModelFileError(f"The tensors file does not fit the {cls.file_class} config's sizes: "
                                 f"{'; '.join(wrong[:5])}.")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        """Load a model saved with :meth:`save` (safetensors and JSON only: no code runs).

        The config's sizes are checked against the tensors' shapes before any module is built.
        """
        config, tensors = load_model_files(path, cls=cls.file_class, config_class=cls.config_class,
                                           check_shapes=cls._check_shapes)
        return cls._from_files(config, tensors)


def run_batches(fn: Callable[[Any], Any], x: np.ndarray, out_dim: int, batch_size: int = 8192) -> np.ndarray:
    """``fn`` (a torch function of float32 rows) over ``x`` in batches, under inference mode, as numpy."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            out.append(fn(torch.from_numpy(np.ascontiguousarray(x[s: s + batch_size], dtype=np.float32))).numpy())
    y = np.concatenate(out) if out else np.zeros((0, int(out_dim)), np.float32)
    finite_in = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if y.dtype.kind == "f" and not np.isfinite(y.reshape(len(y), -1)[finite_in]).all():
        raise FloatingPointError("The model gave NaN or infinite outputs for finite inputs: its parameters hold "
                                 "NaN or infinite values (a diverged or damaged model); nothing was written.")
    return y
