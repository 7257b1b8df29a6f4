"""Contrastive losses of mclSTExp (CLIP, identity targets) and BLEEP / SPADE (soft targets).

Both take a batch of image embeddings and the matching spot (expression) embeddings, row
``i`` of one being the partner of row ``i`` of the other. They also take a stack of
independent batches ``(E, B, D)`` (one per expert, padded to a common ``B``) with a boolean
``mask`` ``(E, B)`` marking the real rows, and then return one loss per batch. Padded rows are
excluded exactly: they take no part in any softmax and no part in the mean, so a padded batch
gives the same loss (and the same gradients) as the unpadded one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sq_spade._validation import check_positive_float


def clip_loss(img: Tensor, spot: Tensor, temperature: float = 1.0,
              mask: Tensor | None = None) -> Tensor:
    r"""Symmetric cross-entropy with identity targets on raw dot products (mclSTExp).

    ``logits = spot @ img.T / temperature``; the loss is the mean of the cross-entropy of
    each spot against all images and of each image against all spots, with the partner as
    the target class. The embeddings are not normalised (as in mclSTExp).

    Parameters
    ----------
    img
        Image embeddings, ``(B, D)``, or a stack of independent batches ``(E, B, D)``.
    spot
        Spot embeddings, same shape as ``img``.
    temperature
        Divides the logits (1 in mclSTExp).
    mask
        Boolean, ``(B,)`` or ``(E, B)``: ``True`` for real rows, ``False`` for padding.

    Returns
    -------
    A scalar for ``(B, D)`` inputs, or one loss per batch ``(E,)`` for stacked inputs. A batch
    with no real row has loss 0 (and no gradient).

    Examples
    --------
    >>> import torch
    >>> img, spot = torch.randn(8, 16), torch.randn(8, 16)
    >>> float(clip_loss(img, img)) < float(clip_loss(img, spot))
    True
    """
    return _contrastive(img, spot, temperature, mask, soft=False)


def bleep_loss(img: Tensor, spot: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    r"""BLEEP's contrastive loss with soft targets (used by SPADE's experts).

    ``logits = spot @ img.T / tau``; targets
    ``T = softmax((img @ img.T + spot @ spot.T) / 2 * tau)`` row-wise; the loss is the mean
    over rows of ``(CE(logits, T) + CE(logits.T, T.T)) / 2`` with soft cross-entropy
    ``CE(p, t) = -sum_j t_j log_softmax(p)_j``. As in BLEEP the similarity is multiplied by
    ``tau`` (not divided; the same thing at BLEEP's and SPADE's ``tau = 1``), and the targets
    are not detached, so gradients also flow through them.

    Parameters
    ----------
    img
        Image embeddings, ``(B, D)``, or a stack of independent batches ``(E, B, D)``.
    spot
        Spot embeddings, same shape as ``img``.
    temperature
        BLEEP's ``tau`` (1 in BLEEP and SPADE).
    mask
        Boolean, ``(B,)`` or ``(E, B)``: ``True`` for real rows, ``False`` for padding.

    Returns
    -------
    A scalar for ``(B, D)`` inputs, or one loss per batch ``(E,)`` for stacked inputs. A batch
    with no real row has loss 0 (and no gradient).

    Examples
    --------
    >>> import torch
    >>> img, spot = torch.randn(8, 16), torch.randn(8, 16)
    >>> bleep_loss(img, spot).shape
    torch.Size([])
    >>> bleep_loss(img[None].repeat(3, 1, 1), spot[None].repeat(3, 1, 1)).shape
    torch.Size([3])
    """
    return _contrastive(img, spot, temperature, mask, soft=True)


def _contrastive(img: Tensor, spot: Tensor, temperature: float, mask: Tensor | None, *,
                 soft: bool) -> Tensor:
    img, spot, valid, squeeze = _check_inputs(img, spot, temperature, mask)
    tau = float(temperature)
    col = valid[:, None, :]  # (E, 1, B): which columns take part in a row's softmax
    logits = spot @ img.transpose(1, 2) / tau  # (E, B_spot, B_img)

    if soft:
        sim = (img @ img.transpose(1, 2) + spot @ spot.transpose(1, 2)) / 2 * tau
        targets = torch.softmax(_fill(sim, col), dim=-1)
        # zero the padded rows too, so T.T carries no mass towards padded columns
        targets = targets * valid[:, :, None].to(targets.dtype)
        spots_loss = -(targets * _log_softmax(logits, col)).sum(-1)
        images_loss = -(targets.transpose(1, 2) * _log_softmax(logits.transpose(1, 2), col)).sum(-1)
    else:
        spots_loss = -_log_softmax(logits, col).diagonal(dim1=1, dim2=2)
        images_loss = -_log_softmax(logits.transpose(1, 2), col).diagonal(dim1=1, dim2=2)

    rows = (spots_loss + images_loss) / 2  # (E, B)
    # `where` (not a product) so that nothing of a padded row reaches the sum or the gradient
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    n = valid.sum(-1).clamp_min(1).to(rows.dtype)
    loss = rows.sum(-1) / n
    return loss[0] if squeeze else loss


def _fill(x: Tensor, col: Tensor) -> Tensor:
    # a large finite negative (not -inf) keeps every softmax finite, even an all-padded row;
    # exp() of it is exactly 0, so real rows see no trace of the padded columns
    return x.masked_fill(~col, torch.finfo(x.dtype).min / 2)


def _log_softmax(x: Tensor, col: Tensor) -> Tensor:
    out = torch.log_softmax(_fill(x, col), dim=-1)
    return torch.where(col, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _check_inputs(img: Tensor, spot: Tensor, temperature: float,
                  mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, bool]:
    if not isinstance(img, Tensor):
        raise TypeError(f"`img` must be a torch.Tensor, got {type(img).__name__}.")
    if not isinstance(spot, Tensor):
        raise TypeError(f"`spot` must be a torch.Tensor, got {type(spot).__name__}.")
    if img.ndim not in (2, 3):
        raise ValueError(f"`img` must have shape (B, D) or (E, B, D), got {tuple(img.shape)}.")
    if spot.shape != img.shape:
        raise ValueError(
            f"`spot` must have the shape of `img` {tuple(img.shape)}, got {tuple(spot.shape)}."
        )
    check_positive_float(temperature, "temperature")
    squeeze = img.ndim == 2
    if squeeze:
        img, spot = img[None], spot[None]
    e, b = img.shape[:2]
    if mask is None:
        valid = torch.ones((e, b), dtype=torch.bool, device=img.device)
    else:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("`mask` must be a boolean torch.Tensor.")
        expected = (b,) if squeeze else (e, b)
        if tuple(mask.shape) != expected:
            raise ValueError(f"`mask` must have shape {expected}, got {tuple(mask.shape)}.")
        valid = mask.reshape(e, b).to(img.device)
    return img, spot, valid, squeeze
