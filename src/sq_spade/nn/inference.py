"""Running image encoders: uint8 patch batches in, float features out.

This module knows nothing of AnnData or SpatialData. :func:`embed_batches` takes any iterable
of uint8 ``(B, H, W, 3)`` batches (typically a :class:`torch.utils.data.DataLoader`, pinned or
not) and a :class:`~sq_spade.nn.backbones.Backbone`, and returns an ``(N, D)`` array (frozen
features). :func:`encode_images` is the one forward step of a trainable encoder, shared by
mclSTExp's training (:func:`sq_spade.train.fit_contrastive`) and its inference
(:meth:`sq_spade.models.MclSTExp.embed_patches`), with :func:`resize_preprocess` in front, so
both see the same pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sq_spade._utils import progress as _progress
from sq_spade._utils import resolve_device

__all__ = ["dihedral_transforms", "embed_batches", "encode_images", "resize_preprocess"]


def dihedral_transforms(x: Tensor) -> list[Tensor]:
    """The 8 dihedral views of images ``x`` (``(..., H, W)``): 4 rotations, with and without flip.

    Views ``0..3`` rotate ``x`` by 0, 90, 180 and 270 degrees (``torch.rot90`` over the last
    two dimensions); views ``4..7`` do the same to the horizontally flipped ``x``. View 0 is
    ``x`` itself. Rotations by 90 degrees swap ``H`` and ``W``.

    Parameters
    ----------
    x
        Tensor whose last two dimensions are height and width, e.g. ``(B, 3, H, W)``.

    Returns
    -------
    A list of 8 tensors.

    Examples
    --------
    >>> x = torch.arange(4.0).view(1, 1, 2, 2)
    >>> views = dihedral_transforms(x)
    >>> len(views), torch.equal(views[0], x), torch.equal(views[4], x.flip(-1))
    (8, True, True)
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(f"`x` must have at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}.")
    flipped = torch.flip(x, dims=(-1,))
    return ([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
            + [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)])


def _as_uint8_batch(batch: Tensor | np.ndarray, i: int) -> Tensor:
    if isinstance(batch, np.ndarray):
        if not batch.flags.writeable:  # torch warns on read-only memory
            batch = batch.copy()
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if not isinstance(batch, Tensor):
        raise TypeError(f"`batches` must yield uint8 tensors or arrays (B, H, W, 3); item {i} is "
                        f"a {type(batch).__name__}.")
    if batch.dtype != torch.uint8:
        raise TypeError(f"`batches` must yield uint8 (B, H, W, 3) batches; item {i} has dtype "
                        f"{batch.dtype}.")
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"`batches` must yield (B, H, W, 3) batches; item {i} has shape "
                         f"{tuple(batch.shape)}.")
    return batch


def embed_batches(
    model: nn.Module,
    batches: Iterable[Tensor | np.ndarray],
    *,
    device: str | torch.device = "auto",
    tta: bool = False,
    layers: str | Sequence[str] | None = None,
    views: bool = False,
    amp: bool | None = None,
    channels_last: bool = True,
    total: int | None = None,
    desc: str = "features",
    progress: bool | None = None,
) -> np.ndarray:
    """Features of every patch of ``batches`` with ``model``, as float32 ``(N, D)`` (or ``(N, 8, D)`` views).

    Each batch is moved to ``device`` (``non_blocking``, so pinned DataLoader batches overlap
    the copy with compute), converted to float in ``[0, 1]``, permuted to ``(B, 3, H, W)`` and
    resized (bilinear, antialiased) to ``model.input_size`` when its size differs. The forward
    passes run under :func:`torch.inference_mode` with the model in eval mode; on CUDA the
    model and inputs use ``channels_last`` and autocast (bfloat16 where supported, else
    float16).

    Parameters
    ----------
    model
        A :class:`~sq_spade.nn.backbones.Backbone` (any module with an ``input_size``
        attribute mapping float ``(B, 3, S, S)`` in ``[0, 1]`` to ``(B, D)``). It is moved to
        ``device`` and left in eval mode.
    batches
        Iterable of uint8 ``(B, H, W, 3)`` tensors or arrays.
    device
        ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda[:i]"`` or a torch device.
    tta
        Average the outputs over the 8 dihedral views of each patch (4 rotations x optional
        horizontal flip, see :func:`dihedral_transforms`); 8 times the compute.
    layers
        ``None``: ``model(x)``. Else the pooled outputs of these layers, concatenated
        (:meth:`~sq_spade.nn.backbones.Backbone.forward_layers`; ``model`` must offer them).
    views
        With ``tta``: return the 8 views' features ``(N, 8, D)`` instead of their mean.
    amp
        Mixed precision on CUDA: ``None`` or ``True`` use it there, ``False`` never. Ignored
        on other devices (float32).
    channels_last
        Use the channels-last memory format on CUDA (faster convolutions).
    total
        Number of batches, for the progress bar.
    desc
        Progress bar label.
    progress
        Show a progress bar; ``None`` follows ``sq_spade.settings.progress``.

    Returns
    -------
    Float32 array ``(N, D)`` in the order of the batches (``(0, D)`` when there are none and
    ``model.dim`` is known); ``(N, 8, D)`` with ``views=True``.

    Examples
    --------
    >>> from sq_spade.nn.backbones import get_backbone
    >>> patches = np.zeros((5, 16, 16, 3), np.uint8)
    >>> embed_batches(get_backbone("dummy"), [patches[:3], patches[3:]], progress=False).shape
    (5, 64)
    >>> embed_batches(get_backbone("dummy"), [patches], layers="pool", tta=True, views=True,
    ...               progress=False).shape
    (5, 8, 96)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (a Backbone), got {type(model).__name__}.")
    size = getattr(model, "input_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise TypeError("`model` must have a positive integer `input_size` (use "
                        "sq_spade.nn.backbones.get_backbone), got "
                        f"{type(model).__name__} with input_size={size!r}.")
    if isinstance(batches, (Tensor, np.ndarray)):
        raise TypeError("`batches` must be an iterable of (B, H, W, 3) batches (e.g. a DataLoader "
                        "or a list), not a single array: wrap it in a list.")
    if views and not tta:
        raise ValueError("`views=True` needs `tta=True` (the views are the 8 dihedral transforms).")
    if layers is not None and not callable(getattr(model, "forward_layers", None)):
        raise TypeError(f"`layers` needs a Backbone with `forward_layers`, got {type(model).__name__}.")
    forward = model if layers is None else (lambda v: model.forward_layers(v, layers))
    dev = resolve_device(device)
    use_amp = dev.type == "cuda" and amp is not False
    amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16)
    fmt = torch.channels_last if channels_last and dev.type == "cuda" else torch.contiguous_format

    model.to(dev)
    if fmt is torch.channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    outs: list[Tensor] = []
    with torch.inference_mode():
        for i, batch in enumerate(_progress(batches, total=total, desc=desc, enabled=progress)):
            x = _as_uint8_batch(batch, i).to(dev, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)
            with autocast():
                ys = [forward(v.contiguous(memory_format=fmt)).float()
                      for v in (dihedral_transforms(x) if tta else [x])]
            for y in ys:
                if y.ndim != 2 or y.shape[0] != x.shape[0]:
                    raise RuntimeError(f"`model` returned shape {tuple(y.shape)} for a batch of "
                                       f"{x.shape[0]}, expected ({x.shape[0]}, D).")
            y = torch.stack(ys, 1) if views else sum(ys[1:], ys[0]) / len(ys)
            outs.append(y.cpu())
    if not outs:
        dim = getattr(model, "dim", None)
        if layers is not None:
            dim = model.spec.layer_dim(layers)
        shape = (0, 8, dim if isinstance(dim, int) else 0) if views else (0, dim if isinstance(dim, int) else 0)
        return np.zeros(shape, np.float32)
    return torch.cat(outs).numpy().astype(np.float32, copy=False)


def encode_images(encoder: nn.Module, imgs: Tensor, preprocess: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Features ``(B, D)`` of uint8 images ``(B, 3, H, W)``: scaled to ``[0, 1]``, ``preprocess``, ``encoder``.

    A 4-D output (a feature map) is average-pooled. Gradients flow (call it under
    :func:`torch.no_grad` for inference).

    Examples
    --------
    >>> enc = nn.Sequential(nn.Conv2d(3, 4, 1))
    >>> encode_images(enc, torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape
    torch.Size([2, 4])
    """
    x = imgs.float() / 255.0
    if preprocess is not None:
        x = preprocess(x)
    out = encoder(x)
    if out.ndim == 4:  # feature map: global average pooling
        out = out.mean(dim=(2, 3))
    if out.ndim != 2:
        raise ValueError(f"`image_encoder` must return (B, D) or (B, D, h, w) features, "
                         f"got shape {tuple(out.shape)}.")
    return out


def resize_preprocess(input_size: int | None, patch_px: int | None) -> Callable[[Tensor], Tensor] | None:
    """Resize float images to the encoder's ``input_size`` when the patches differ (else ``None``).

    The preprocessing of fine-tuned mclSTExp: training (:func:`sq_spade.train.fit_contrastive`'s
    ``preprocess``) and inference (:meth:`sq_spade.models.MclSTExp.embed_patches`) share it.
    ``None`` when the patches already have the backbone's size (mclSTExp: 224 native pixels).

    Examples
    --------
    >>> resize_preprocess(224, 224) is None
    True
    >>> resize_preprocess(16, 32)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 3, 16, 16])
    """
    if input_size is None or patch_px is None or int(input_size) == int(patch_px):
        return None
    size = int(input_size)

    def resize(x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    return resize
