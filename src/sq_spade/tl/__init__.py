"""Tools: train models, embed slides, predict expression, evaluate, probe embeddings."""

from sq_spade.tl._baselines import train_baseline
from sq_spade.tl._contrastive import calibrate_conformal, train_contrastive
from sq_spade.tl._cross_validate import cross_validate
from sq_spade.tl._domains import domain_scores, spatial_domains
from sq_spade.tl._experts import embed, spade_retrieve, train_experts, train_experts_from_store
from sq_spade.tl._few_shot import few_shot
from sq_spade.tl._predict import evaluate_expression, predict_expression
from sq_spade.tl._slides import export_bag, slide_embedding

__all__ = ["calibrate_conformal", "cross_validate", "domain_scores", "embed", "evaluate_expression", "export_bag",
           "few_shot", "predict_expression", "slide_embedding", "spade_retrieve", "spatial_domains",
           "train_baseline", "train_contrastive", "train_experts", "train_experts_from_store"]
