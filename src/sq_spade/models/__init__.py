"""User-facing models: they own their torch modules, ``save`` and ``load``."""

from sq_spade.models._clustering import TwoStageClustering, two_stage_clustering
from sq_spade.models._files import ModelFileError
from sq_spade.models._mclstexp import MclSTExp
from sq_spade.models._reference import KNNModel, RidgeModel
from sq_spade.models._spade import Spade

__all__ = ["KNNModel", "MclSTExp", "ModelFileError", "RidgeModel", "Spade", "TwoStageClustering",
           "two_stage_clustering"]
