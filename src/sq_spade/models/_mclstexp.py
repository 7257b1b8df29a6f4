"""The user-facing mclSTExp model: an image head, a spot encoder and a fine-tuned image encoder."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sq_spade.models._files import ModelFileError, load_model_files, save_model_files

#: Prefixes of the three modules' tensors inside the tensors file.
IMAGE_HEAD, SPOT_ENCODER, IMAGE_ENCODER = "image_head.", "spot_encoder.", "image_encoder."

_SCHEMA = {
    "backbone": ("str", True, None),
    "weights_sha256": ("str", False, None),
    "feature_dim": ("int", True, lambda v: v > 0),
    "panel": ("list", True, lambda v: len(v) > 0 and all(isinstance(g, str) for g in v)),
    "gene_input": ("str", True, lambda v: v in ("log1p_cp10k", "raw")),
    "position": ("str", False, lambda v: v in ("grid", "pixel")),
    "n_x": ("int", False, lambda v: v > 0),
    "n_y": ("int", False, lambda v: v > 0),
    "position_bin_um": ("float", False, lambda v: v > 0),
    "context": ("str", True, lambda v: v in ("self", "batch", "tile")),
    "tile_size": ("int", False, lambda v: v > 0),
    "out_dim": ("int", True, lambda v: v > 0),
    "dropout": ("float", True, lambda v: 0 <= v < 1),
    "spot_encoder": ("dict", True, None),
    "finetune": ("str", True, lambda v: v in ("none", "last", "all")),
    "patch_px": ("int", False, lambda v: v > 0),
    "input_size": ("int", False, lambda v: v > 0),
    "train_sections": ("list", False, None),
    "validation_sections": ("list", False, None),
    "params": ("dict", False, None),
    "history": ("dict", False, None),
}


def resize_preprocess(input_size: int | None, patch_px: int | None) -> Callable | None:
    """The preprocessing of fine-tuned mclSTExp: resize to the backbone's input size if needed.

    Training (:func:`sq_spade.train.fit_contrastive`'s ``preprocess``) and inference
    (:meth:`MclSTExp.embed_patches`) share this function, so both see the same pixels.
    ``None`` when the patches already have the backbone's size (mclSTExp: 224 native pixels).
    """
    if input_size is None or patch_px is None or int(input_size) == int(patch_px):
        return None
    size = int(input_size)

    def resize(x: Any) -> Any:
        import torch.nn.functional as F

        if tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    return resize


class MclSTExp:
    """mclSTExp: contrastive image and spot encoders, for expression prediction by retrieval.

    Build it with :func:`sq_spade.tl.train_contrastive`; use it with
    :func:`sq_spade.tl.predict_expression`. Two modes:

    - **frozen backbone** (``config["finetune"] == "none"``): the image side is a projection
      head over cached backbone features (:meth:`embed_images`);
    - **fine-tuned** (``"last"`` / ``"all"``): the image encoder's weights are part of the model
      (:meth:`embed_patches` takes uint8 patches).

    The spot side (:meth:`embed_spots`) embeds normalised panel expression plus learned grid
    position embeddings with a small transformer whose attention set is given by ``context``.

    Attributes
    ----------
    image_head
        :class:`sq_spade.nn.heads.ProjectionHead`, ``feature_dim -> out_dim``.
    spot_encoder
        :class:`sq_spade.nn.spot_encoder.SpotEncoder`.
    image_encoder
        The fine-tuned :class:`sq_spade.nn.backbones.Backbone`, or ``None``.
    config
        Backbone, panel, positions, context rule, hyper-parameters, provenance (JSON-able).
    history
        Loss per epoch (``train_loss``, ``val_loss``, ``best_epoch``...).

    Examples
    --------
    >>> model = sqs.tl.train_contrastive(sdata, method="mclstexp")  # doctest: +SKIP
    >>> model.save("mclstexp_model")  # doctest: +SKIP
    >>> same = sqs.models.MclSTExp.load("mclstexp_model")  # doctest: +SKIP
    """

    def __init__(self, image_head: Any, spot_encoder: Any, config: Mapping[str, Any],
                 image_encoder: Any = None):
        self.image_head = image_head.eval()
        self.spot_encoder = spot_encoder.eval()
        self.image_encoder = None if image_encoder is None else image_encoder.eval()
        self.config = dict(config)
        self.history = self.config.get("history") or {}
        if self.finetuned and self.image_encoder is None:
            raise ValueError(f"A model fine-tuned with finetune={self.config['finetune']!r} needs its `image_encoder`.")

    # --- properties ---------------------------------------------------------------------------
    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    @property
    def panel(self) -> list[str]:
        return list(self.config["panel"])

    @property
    def finetuned(self) -> bool:
        """Whether the image encoder was trained (then predictions need patches, not features)."""
        return self.config["finetune"] != "none"

    @property
    def context(self) -> str:
        return self.config["context"]

    @property
    def position(self) -> str | None:
        return self.config.get("position")

    def __repr__(self) -> str:
        pos = self.position or "none"
        return (f"MclSTExp(backbone={self.backbone!r}, finetune={self.config['finetune']!r}, "
                f"context={self.context!r}, position={pos!r}, panel={len(self.panel)} genes)")

    # --- image side ---------------------------------------------------------------------------
    def embed_images(self, features: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
        """Image embeddings ``(N, out_dim)`` of frozen backbone features ``(N, feature_dim)``.

        Only for frozen-backbone models; a fine-tuned model embeds patches
        (:meth:`embed_patches`).
        """
        import torch

        if self.finetuned:
            raise ValueError("This model fine-tuned its image encoder: frozen backbone features do not fit it; "
                             "use `embed_patches` with uint8 patches.")
        x = np.asarray(features, dtype=np.float32)
        d = int(self.config["feature_dim"])
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"`features` must be (N, {d}) features of backbone {self.backbone!r}, got shape {x.shape}.")
        if not np.isfinite(x).all():
            raise ValueError("`features` contains NaN or infinite values.")
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                out.append(self.image_head(torch.from_numpy(np.ascontiguousarray(x[s: s + batch_size]))).numpy())
        return np.concatenate(out) if out else np.zeros((0, int(self.config["out_dim"])), np.float32)

    def embed_patches(self, patches: Any, *, batch_size: int = 64, device: str | None = None,
                      num_workers: int = 0) -> np.ndarray:
        """Image embeddings ``(N, out_dim)`` of uint8 patches, through the fine-tuned encoder.

        Parameters
        ----------
        patches
            A uint8 array or tensor ``(N, H, W, 3)``, or a map-style dataset whose items are
            uint8 ``(H, W, 3)`` patches (e.g. :func:`sq_spade.pp.patches`).
        batch_size
            Patches per forward pass.
        device
            ``"auto"``, ``"cpu"``, ``"cuda"``... (default ``settings.device``); the modules go
            back to the CPU afterwards.
        num_workers
            DataLoader workers when ``patches`` is a dataset.
        """
        import torch

        from sq_spade._utils import resolve_device
        from sq_spade.train._contrastive import _encode

        if not self.finetuned:
            raise ValueError("This model uses frozen backbone features: compute them "
                             "(sqs.pp.compute_features) and use `embed_images`.")
        dev = resolve_device(device)
        pre = resize_preprocess(self.config.get("input_size"), self.config.get("patch_px"))
        if isinstance(patches, (np.ndarray, torch.Tensor)):
            arr = patches if isinstance(patches, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(patches))
            if arr.dtype != torch.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"`patches` must be uint8 (N, H, W, 3), got dtype {arr.dtype} and shape "
                                 f"{tuple(arr.shape)}.")
            batches: Any = arr.split(batch_size)
        else:
            if not hasattr(patches, "__getitem__") or not hasattr(patches, "__len__"):
                raise TypeError("`patches` must be a uint8 (N, H, W, 3) array or a map-style dataset of patches, "
                                f"got {type(patches).__name__}.")
            batches = torch.utils.data.DataLoader(patches, batch_size=batch_size, shuffle=False,
                                                  num_workers=num_workers)
        out = []
        enc, head = self.image_encoder, self.image_head
        try:
            enc.to(dev)
            head.to(dev)
            with torch.inference_mode():
                for b in batches:
                    b = torch.as_tensor(b)
                    if b.dtype != torch.uint8 or b.ndim != 4 or b.shape[-1] != 3:
                        raise ValueError(f"`patches` must yield uint8 (H, W, 3) patches, got {b.dtype} {tuple(b.shape)}.")
                    x = b.to(dev).permute(0, 3, 1, 2)
                    out.append(head(_encode(enc, x, pre)).float().cpu().numpy())
        finally:
            enc.cpu()
            head.cpu()
        return np.concatenate(out) if out else np.zeros((0, int(self.config["out_dim"])), np.float32)

    # --- spot side ----------------------------------------------------------------------------
    def embed_spots(self, expr: np.ndarray, pos: np.ndarray | None = None, context: Any = None, *,
                    batch_size: int = 4096) -> np.ndarray:
        """Spot-encoder embeddings ``(N, out_dim)``: the keys of retrieval.

        Parameters
        ----------
        expr
            Panel expression ``(N, G)`` on the model's ``gene_input`` scale.
        pos
            Integer positions ``(N, 2)`` (x, y) inside the position tables; ``None`` for a model
            without position embeddings.
        context
            Which spots attend to which: ``"self"`` (each spot alone), an integer array ``(N,)``
            of group ids (spots of one group attend to each other), or ``None``: the model's
            inference rule (``"self"`` for the contexts ``"self"`` and ``"batch"``; a
            ``"tile"`` model needs the tile ids, see :func:`sq_spade.tl.train_contrastive`).
        batch_size
            Spots per forward pass; groups are never split across passes, so the result does
            not depend on it (beyond float rounding).
        """
        import torch

        g = np.asarray(expr, dtype=np.float32)
        n_genes = len(self.panel)
        if g.ndim != 2 or g.shape[1] != n_genes:
            raise ValueError(f"`expr` must be (N, {n_genes}) over the model's panel, got shape {g.shape}.")
        if not np.isfinite(g).all():
            raise ValueError("`expr` contains NaN or infinite values.")
        n = len(g)
        has_pos = self.config.get("n_x") is not None
        if has_pos and pos is None:
            raise ValueError("`pos` is required: this model has position embeddings "
                             f"(position={self.position!r}).")
        if not has_pos and pos is not None:
            raise ValueError("`pos` must be None: this model has no position embeddings.")
        p = None
        if pos is not None:
            p = np.asarray(pos)
            if p.shape != (n, 2) or not np.issubdtype(p.dtype, np.integer):
                raise ValueError(f"`pos` must be an integer array of shape ({n}, 2), got {p.dtype} {p.shape}.")
            p = p.astype(np.int64)
        if context is None:
            if self.context == "tile":
                raise ValueError("`context`: this model attends within spatial tiles; pass the tile id of each spot "
                                 "(sq_spade.tl.train_contrastive documents them).")
            context = "self"
        if isinstance(context, str):
            if context != "self":
                raise ValueError(f"`context` must be None, 'self' or an integer array of {n} group ids, got {context!r}.")
            order, bounds = np.arange(n), list(range(0, n, batch_size)) + [n]
            ids = None
        else:
            ids = np.asarray(context)
            if ids.shape != (n,) or ids.dtype.kind not in "iuOU":
                raise ValueError(f"`context` must be None, 'self' or an array of {n} group ids (integers or "
                                 f"strings), got {ids.dtype} {ids.shape}.")
            ids = np.unique(ids, return_inverse=True)[1].astype(np.int64).ravel()
            order = np.argsort(ids, kind="stable")
            # chunk boundaries at group boundaries only: a group is always embedded whole
            starts = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1]])
            bounds, last = [0], 0
            for s in starts[1:]:
                if s - last >= batch_size:
                    bounds.append(int(s))
                    last = int(s)
            bounds.append(n)
        out = np.zeros((n, int(self.config["out_dim"])), np.float32)
        with torch.inference_mode():
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if b <= a:
                    continue
                rows = order[a:b]
                et = torch.from_numpy(np.ascontiguousarray(g[rows]))
                pt = None if p is None else torch.from_numpy(np.ascontiguousarray(p[rows]))
                ct = "self" if ids is None else torch.from_numpy(ids[rows])
                out[rows] = self.spot_encoder(et, pt, ct).numpy()
        return out

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as ``config.json`` + ``model-<sha>.safetensors`` into the folder ``path``.

        The image head, the spot encoder and (fine-tuned models) the image encoder's state dict
        share one safetensors file under the prefixes ``image_head.``, ``spot_encoder.`` and
        ``image_encoder.``.
        Under ``torchrun`` only rank 0 writes (every rank may call this; the models are the
        same); call ``torch.distributed.barrier()`` before other ranks read the folder.
        """
        import sq_spade

        tensors = {IMAGE_HEAD + k: v for k, v in self.image_head.state_dict().items()}
        tensors.update({SPOT_ENCODER + k: v for k, v in self.spot_encoder.state_dict().items()})
        if self.image_encoder is not None:
            tensors.update({IMAGE_ENCODER + k: v for k, v in self.image_encoder.state_dict().items()})
        return save_model_files(path, cls="MclSTExp", config=self.config, tensors=tensors,
                                version=sq_spade.__version__)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MclSTExp:
        """Load a model saved with :meth:`save` (safetensors only: no code runs).

        A fine-tuned model rebuilds its backbone's architecture from the registry
        (``get_backbone(name, pretrained=False)``: nothing is downloaded) and loads the saved
        weights into it strictly.
        """
        config, tensors = load_model_files(path, cls="MclSTExp", schema=_SCHEMA)
        head, spot, encoder = build_modules(config)
        parts = {IMAGE_HEAD: head, SPOT_ENCODER: spot}
        if encoder is not None:
            parts[IMAGE_ENCODER] = encoder
        unknown = [k for k in tensors if not k.startswith(tuple(parts))]
        if unknown:
            raise ModelFileError(f"The tensors file holds tensors that fit no part of the MclSTExp config: {unknown[:10]}.")
        for prefix, module in parts.items():
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            own = set(module.state_dict())
            missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
            if missing or unexpected:
                raise ModelFileError(f"The tensors file does not fit the MclSTExp config ({prefix}*): "
                                     f"missing {missing[:10]}, unexpected {unexpected[:10]}.")
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:  # shapes that do not fit the config
                raise ModelFileError(f"The tensors file does not fit the MclSTExp config ({prefix}*): "
                                     f"{str(e)[:300]}") from e
        return cls(head, spot, config, image_encoder=encoder)


def build_modules(config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Untrained image head, spot encoder and (fine-tuned) image encoder shaped by ``config``."""
    from sq_spade.nn.heads import ProjectionHead
    from sq_spade.nn.spot_encoder import SpotEncoder

    enc_cfg = dict(config["spot_encoder"])
    if enc_cfg.get("n_genes") != len(config["panel"]):
        raise ModelFileError(f"The spot encoder takes {enc_cfg.get('n_genes')} genes but the panel has "
                             f"{len(config['panel'])}.")
    if enc_cfg.get("out_dim") != config["out_dim"]:
        raise ModelFileError("The spot encoder's `out_dim` differs from the model's.")
    if (enc_cfg.get("n_x"), enc_cfg.get("n_y")) != (config.get("n_x"), config.get("n_y")):
        raise ModelFileError("The spot encoder's position tables differ from the config's `n_x`/`n_y`.")
    if (config.get("position") is None) != (config.get("n_x") is None):
        raise ModelFileError("Config keys `position` and `n_x`/`n_y` must be set together.")
    if config.get("position") == "pixel" and config.get("position_bin_um") is None:
        raise ModelFileError("`position='pixel'` needs `position_bin_um`.")
    try:
        head = ProjectionHead(int(config["feature_dim"]), int(config["out_dim"]), float(config["dropout"]))
        spot = SpotEncoder(**enc_cfg)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"The MclSTExp config does not describe valid modules: {e}") from e
    encoder = None
    if config["finetune"] != "none":
        from sq_spade.nn.backbones import get_backbone

        if config.get("patch_px") is None:
            raise ModelFileError("A fine-tuned MclSTExp config needs `patch_px`.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = get_backbone(config["backbone"], pretrained=False)
        if encoder.dim != int(config["feature_dim"]):
            raise ModelFileError(f"Backbone {config['backbone']!r} gives {encoder.dim}-d features; the config says "
                                 f"{config['feature_dim']}.")
    return head, spot, encoder
