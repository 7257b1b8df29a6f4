"""Torch modules and array maths only (no AnnData): backbones, heads, spot encoder, experts, losses, retrieval."""

from sq_spade.nn.backbones import (
           Backbone,
           BackboneSpec,
           get_backbone,
           list_backbones,
           register_backbone,
)
from sq_spade.nn.experts import ExpertHeads, MixtureOfExperts, route
from sq_spade.nn.heads import ProjectionHead
from sq_spade.nn.inference import dihedral_transforms, embed_batches
from sq_spade.nn.losses import bleep_loss, clip_loss
from sq_spade.nn.retrieval import retrieve_predict
from sq_spade.nn.spot_encoder import SpotEncoder

__all__ = ["Backbone", "BackboneSpec", "ExpertHeads", "MixtureOfExperts", "ProjectionHead", "SpotEncoder",
           "bleep_loss", "clip_loss", "dihedral_transforms", "embed_batches", "get_backbone", "list_backbones",
           "register_backbone", "retrieve_predict", "route"]
