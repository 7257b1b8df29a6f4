"""User-facing reference models: ridge regression and k-NN retrieval on frozen image features."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sq_spade.models._files import ModelFileError, load_model_files, save_model_files

_SCHEMA = {
    "backbone": ("str", True, None),
    "weights_sha256": ("str", False, None),
    "feature_dim": ("int", True, lambda v: v > 0),
    "panel": ("list", True, lambda v: len(v) > 0 and all(isinstance(g, str) for g in v)),
    "regressor": ("dict", True, None),
    "train_sections": ("list", False, None),
    "validation_sections": ("list", False, None),
    "params": ("dict", False, None),
}


class _ReferenceModel:
    """A fitted array-level regressor plus the backbone and panel it belongs to."""

    _regressor_class: ClassVar[str] = ""

    def __init__(self, regressor: Any, config: Mapping[str, Any]):
        if type(regressor).__name__ != self._regressor_class:
            raise TypeError(f"`regressor` must be a {self._regressor_class}, got {type(regressor).__name__}.")
        if not regressor.is_fitted:
            raise ValueError("`regressor` must be fitted: call `fit(X, Y)` first.")
        self.regressor = regressor
        self.config = dict(config)
        d, g = int(self.config["feature_dim"]), len(self.config["panel"])
        if regressor.n_features_in_ != d or regressor.n_outputs_ != g:
            raise ValueError(f"The regressor maps {regressor.n_features_in_} features to {regressor.n_outputs_} genes; "
                             f"the config says {d} features and a panel of {g} genes.")

    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    @property
    def weights_sha256(self) -> str | None:
        return self.config.get("weights_sha256")

    @property
    def panel(self) -> list[str]:
        return list(self.config["panel"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone!r}, panel={len(self.panel)} genes, {self.regressor!r})"

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted log1p-CP10k panel expression ``(N, G)`` from frozen features ``(N, D)``."""
        x = np.asarray(features, dtype=np.float32)
        d = int(self.config["feature_dim"])
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"`features` must be (N, {d}) features of backbone {self.backbone!r}, got shape {x.shape}.")
        if len(x) == 0:
            return np.zeros((0, len(self.panel)), np.float32)
        return np.asarray(self.regressor.predict(x), dtype=np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as ``config.json`` + ``model-<sha>.safetensors`` into the folder ``path``.

        The regressor's arrays go into safetensors, its parameters into the JSON config.
        """
        import sq_spade

        arrays, reg_config = self.regressor.to_state()
        config = {**self.config, "regressor": reg_config}
        return save_model_files(path, cls=type(self).__name__, config=config, tensors=arrays,
                                version=sq_spade.__version__)

    @classmethod
    def load(cls, path: str | os.PathLike) -> _ReferenceModel:
        """Load a model saved with :meth:`save` (safetensors only: no code runs)."""
        from sq_spade.tl import _reference as ref

        config, tensors = load_model_files(path, cls=cls.__name__, schema=_SCHEMA)
        reg_cls = getattr(ref, cls._regressor_class)
        arrays = {k: v.numpy() for k, v in tensors.items()}
        try:
            regressor = reg_cls.from_state(arrays, dict(config["regressor"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"The {cls.__name__} files do not describe a fitted {cls._regressor_class}: {e}") from e
        try:
            return cls(regressor, config)
        except ValueError as e:
            raise ModelFileError(str(e)) from e


class RidgeModel(_ReferenceModel):
    """HEST-Benchmark's baseline: PCA + ridge regression from frozen image features.

    Build it with ``sqs.tl.train_contrastive(sdata, method="ridge")``; predict with
    :func:`sq_spade.tl.predict_expression` (no reference needed). ``.regressor`` is the
    :class:`sq_spade.tl._reference.RidgeRegressor`.

    Examples
    --------
    >>> model = sqs.tl.train_contrastive(sdata, method="ridge")  # doctest: +SKIP
    >>> model.save("ridge")  # doctest: +SKIP
    >>> same = sqs.models.RidgeModel.load("ridge")  # doctest: +SKIP
    """

    _regressor_class = "RidgeRegressor"


class KNNModel(_ReferenceModel):
    """BLEEP-style retrieval in the frozen feature space: mean expression of the nearest spots.

    Build it with ``sqs.tl.train_contrastive(sdata, method="knn")``; it stores its training
    spots (features and expression), so :func:`sq_spade.tl.predict_expression` needs no
    reference. ``.regressor`` is the :class:`sq_spade.tl._reference.KNNRegressor`.

    Examples
    --------
    >>> model = sqs.tl.train_contrastive(sdata, method="knn")  # doctest: +SKIP
    >>> model.save("knn")  # doctest: +SKIP
    >>> same = sqs.models.KNNModel.load("knn")  # doctest: +SKIP
    """

    _regressor_class = "KNNRegressor"
