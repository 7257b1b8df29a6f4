"""Plotting: expression and experts on the H&E image, embeddings, evaluation and training curves."""

from sq_spade.pl._embedding import embedding
from sq_spade.pl._results import gene_correlation, training_history
from sq_spade.pl._spatial import experts, spatial

__all__ = ["embedding", "experts", "gene_correlation", "spatial", "training_history"]
