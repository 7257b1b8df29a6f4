"""The projection head shared by BLEEP, mclSTExp and SPADE."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from sq_spade._validation import check_positive_int


class ProjectionHead(nn.Module):
    r"""Map a feature vector to the shared latent space.

    For an input :math:`x`: :math:`h = W_1 x`, then
    :math:`\mathrm{out} = \mathrm{LayerNorm}(h + \mathrm{Dropout}(W_2\,\mathrm{GELU}(h)))`.
    This is the head of BLEEP, mclSTExp and SPADE (image and gene side alike).

    Parameters
    ----------
    in_dim
        Dimension of the input features.
    out_dim
        Dimension of the latent space (256 in the three methods).
    dropout
        Dropout probability on the residual branch.

    Examples
    --------
    >>> import torch
    >>> head = ProjectionHead(1024, 256)
    >>> head(torch.randn(4, 1024)).shape
    torch.Size([4, 256])
    """

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        _check_dims(in_dim, out_dim, dropout)
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.dropout_p = float(dropout)
        # attribute names follow BLEEP's head, so its state-dict keys map one-to-one
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` of shape ``(..., in_dim)`` to ``(..., out_dim)``."""
        h = self.projection(x)
        return self.layer_norm(h + self.dropout(self.fc(self.gelu(h))))

    def config(self) -> dict[str, int | float]:
        """Constructor arguments, JSON-able (for saving next to a safetensors file)."""
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "dropout": self.dropout_p}


def _check_dims(in_dim: int, out_dim: int, dropout: float) -> None:
    check_positive_int(in_dim, "in_dim")
    check_positive_int(out_dim, "out_dim")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
