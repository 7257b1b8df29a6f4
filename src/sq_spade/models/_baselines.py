"""User-facing baseline models: ridge regression and k-NN retrieval on frozen image features."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from sq_spade._files import ModelFileError
from sq_spade.models._base import Model, ModelConfig
from sq_spade.models._regressors import KNNRegressor, RidgeRegressor


@dataclass(eq=False, kw_only=True)
class BaselineConfig(ModelConfig):
    """Configuration of a :class:`RidgeModel` or :class:`KNNModel` (saved as JSON beside its arrays).

    Besides :class:`~sq_spade.models.ModelConfig`'s keys: ``regressor``, the fitted
    regressor's parameters and scalars (its arrays go into the safetensors file).
    """

    regressor: dict[str, Any]


class _BaselineModel(Model):
    """A fitted array-level regressor plus the backbone and panel it belongs to."""

    config_class = BaselineConfig
    regressor_class: ClassVar[type[RidgeRegressor] | type[KNNRegressor]]

    def __init__(self, regressor: Any, config: Mapping[str, Any]):
        cls = self.regressor_class
        if not isinstance(regressor, cls):
            raise TypeError(f"`regressor` must be a {cls.__name__}, got {type(regressor).__name__}.")
        if not regressor.is_fitted:
            raise ValueError("`regressor` must be fitted: call `fit(X, Y)` first.")
        super().__init__(config)
        self.regressor = regressor
        d, g = int(self.config.feature_dim), len(self.config.panel)
        if regressor.n_features_in_ != d or regressor.n_outputs_ != g:
            raise ValueError(f"The regressor maps {regressor.n_features_in_} features to {regressor.n_outputs_} genes; "
                             f"the config says {d} features and a panel of {g} genes.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone!r}, panel={len(self.panel)} genes, {self.regressor!r})"

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted log1p-CP10k panel expression ``(N, G)`` from frozen features ``(N, D)``."""
        x = self._check_features(features)
        if len(x) == 0:
            return np.zeros((0, len(self.panel)), np.float32)
        return np.asarray(self.regressor.predict(x), dtype=np.float32)

    # --- persistence: the regressor's arrays go into safetensors, its parameters into the JSON config
    def _to_files(self) -> tuple[dict[str, Any], Mapping[str, Any]]:
        arrays, reg_config = self.regressor.to_state()
        return {**self.config.to_json(), "regressor": reg_config}, arrays

    @classmethod
    def _from_files(cls, config: BaselineConfig, tensors: dict[str, Any]) -> _BaselineModel:
        arrays = {k: v.numpy() for k, v in tensors.items()}
        name = cls.regressor_class.__name__
        try:
            regressor = cls.regressor_class.from_state(arrays, dict(config.regressor))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"The {cls.__name__} files do not describe a fitted {name}: {e}") from e
        try:
            return cls(regressor, config)
        except ValueError as e:
            raise ModelFileError(str(e)) from e


class RidgeModel(_BaselineModel):
    """HEST-Benchmark's baseline: PCA + ridge regression from frozen image features.

    Build it with ``sqs.tl.train_baseline(sdata, method="ridge")``; predict with
    :func:`sq_spade.tl.predict_expression` (no reference needed). ``.regressor`` is the
    :class:`~sq_spade.models._regressors.RidgeRegressor`.

    Examples
    --------
    >>> model = sqs.tl.train_baseline(sdata, method="ridge")  # doctest: +SKIP
    >>> model.save("ridge")  # doctest: +SKIP
    >>> same = sqs.models.RidgeModel.load("ridge")  # doctest: +SKIP
    """

    regressor_class = RidgeRegressor
    file_class = "RidgeModel"


class KNNModel(_BaselineModel):
    """BLEEP-style retrieval in the frozen feature space: mean expression of the nearest spots.

    Build it with ``sqs.tl.train_baseline(sdata, method="knn")``; it stores its training
    spots (features and expression), so :func:`sq_spade.tl.predict_expression` needs no
    reference. ``.regressor`` is the :class:`~sq_spade.models._regressors.KNNRegressor`.

    Examples
    --------
    >>> model = sqs.tl.train_baseline(sdata, method="knn")  # doctest: +SKIP
    >>> model.save("knn")  # doctest: +SKIP
    >>> same = sqs.models.KNNModel.load("knn")  # doctest: +SKIP
    """

    regressor_class = KNNRegressor
    file_class = "KNNModel"
