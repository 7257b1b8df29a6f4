"""User-facing models: they own their torch modules (or regressors), ``save`` and ``load``.

Every model shares one contract (:class:`~sq_spade.models._base.Model`): a configuration
dataclass (:class:`SpadeConfig`, :class:`MclSTExpConfig`, :class:`BaselineConfig`), the backbone
and gene panel it belongs to, and ``save`` / ``load`` through the model-file format.
"""

from sq_spade._files import ModelFileError
from sq_spade.models._base import ModelConfig
from sq_spade.models._baselines import BaselineConfig, KNNModel, RidgeModel
from sq_spade.models._clustering import TwoStageClustering, two_stage_clustering
from sq_spade.models._mclstexp import MclSTExp, MclSTExpConfig
from sq_spade.models._spade import Spade, SpadeConfig

__all__ = ["BaselineConfig", "KNNModel", "MclSTExp", "MclSTExpConfig", "ModelConfig", "ModelFileError", "RidgeModel",
           "Spade", "SpadeConfig", "TwoStageClustering", "two_stage_clustering"]
