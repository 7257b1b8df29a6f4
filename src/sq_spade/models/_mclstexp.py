"""The user-facing mclSTExp model: an image head, a spot encoder and a fine-tuned image encoder."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._config import check
from sq_spade._files import ModelFileError
from sq_spade._utils import resolve_device
from sq_spade.models._base import Model, ModelConfig, member_prefix, run_batches

#: Prefixes of the three modules' tensors inside the tensors file.
IMAGE_HEAD, SPOT_ENCODER, IMAGE_ENCODER = "image_head.", "spot_encoder.", "image_encoder."


def _positive(v: Any) -> bool:
    return v > 0


@dataclass(eq=False, kw_only=True)
class MclSTExpConfig(ModelConfig):
    """Configuration of a :class:`MclSTExp` model (saved as JSON beside its tensors).

    Besides :class:`~sq_spade.models.ModelConfig`'s keys: ``gene_input`` (the spot encoder's
    input), ``position`` (``"grid"``, ``"pixel"`` or ``None``) with the position tables'
    sizes ``n_x`` / ``n_y`` and ``position_bin_um`` (pixel positions), ``context`` and
    ``tile_size`` (which spots attend to each other), ``out_dim``, ``dropout``,
    ``spot_encoder`` (the :class:`~sq_spade.nn.spot_encoder.SpotEncoder`'s arguments),
    ``finetune`` with ``patch_px`` and ``input_size`` (fine-tuned image encoders),
    ``history`` (losses), ``keys`` (retrieval keys: ``"spot"``, ``"image"`` or ``"both"``),
    ``n_members`` (seeds of the ensemble, each an image head and a spot encoder) and
    ``conformal`` (the calibration of :func:`sq_spade.tl.calibrate_conformal` or of
    ``train_contrastive(coverage=...)``'s held-out sections, or ``None``).
    Folders saved before ``keys`` / ``n_members`` existed read as ``"spot"`` / 1.
    """

    gene_input: K.GeneInput
    context: K.Context
    out_dim: int = field(metadata=check(_positive))
    dropout: float = field(metadata=check(lambda v: 0 <= v < 1))
    spot_encoder: dict[str, Any]
    finetune: K.Finetune
    position: K.Position | None = None
    n_x: int | None = field(default=None, metadata=check(_positive))
    n_y: int | None = field(default=None, metadata=check(_positive))
    position_bin_um: float | None = field(default=None, metadata=check(_positive))
    tile_size: int | None = field(default=None, metadata=check(_positive))
    patch_px: int | None = field(default=None, metadata=check(_positive))
    input_size: int | None = field(default=None, metadata=check(_positive))
    history: dict[str, Any] | None = None
    keys: K.Keys = "spot"
    n_members: int = field(default=1, metadata=check(_positive))
    conformal: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # folders saved before these keys existed: one member retrieving with spot keys
        if self.keys is None:
            object.__setattr__(self, "keys", "spot")
        if self.n_members is None:
            object.__setattr__(self, "n_members", 1)
        super().__post_init__()


class MclSTExp(Model):
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
    members
        ``[(image_head, spot_encoder), ...]``, one pair per seed of the ensemble (the first is
        ``image_head``, ``spot_encoder``); predictions average over them.
    config
        Backbone, panel, positions, context rule, hyper-parameters, provenance (a
        :class:`MclSTExpConfig`, read like a dict).
    history
        Loss per epoch (``train_loss``, ``val_loss``, ``best_epoch``...).

    Examples
    --------
    >>> model = sqs.tl.train_contrastive(sdata, method="mclstexp")  # doctest: +SKIP
    >>> model.save("mclstexp_model")  # doctest: +SKIP
    >>> same = sqs.models.MclSTExp.load("mclstexp_model")  # doctest: +SKIP
    """

    config_class = MclSTExpConfig
    file_class = "MclSTExp"

    def __init__(self, image_head: Any, spot_encoder: Any, config: Mapping[str, Any],
                 image_encoder: Any = None, members: Any = None):
        extra = [(h.eval(), sp_.eval()) for h, sp_ in (members or [])]
        given = config.get("n_members")
        super().__init__(config)
        if given is None:
            self.config["n_members"] = 1 + len(extra)
        self.image_head = image_head.eval()
        self.spot_encoder = spot_encoder.eval()
        self.members = [(self.image_head, self.spot_encoder), *extra]
        if int(self.config.n_members) != len(self.members):
            raise ValueError(f"config['n_members'] is {self.config.n_members} but {len(self.members)} members "
                             f"(image head, spot encoder) were given.")
        self.image_encoder = None if image_encoder is None else image_encoder.eval()
        if self.finetuned and self.image_encoder is None:
            raise ValueError(f"A model fine-tuned with finetune={self.config.finetune!r} needs its `image_encoder`.")
        if self.finetuned and len(self.members) > 1:
            raise ValueError("A fine-tuned model has one member (its image encoder is shared by none).")

    @property
    def n_members(self) -> int:
        """Seeds in the ensemble (1: a single model)."""
        return len(self.members)

    @property
    def finetuned(self) -> bool:
        """Whether the image encoder was trained (then predictions need patches, not features)."""
        return self.config.finetune != "none"

    @property
    def context(self) -> str:
        """Which spots attend to each other in the spot encoder."""
        return self.config.context

    @property
    def position(self) -> str | None:
        """Positions of the spot encoder (``None``: no position embeddings)."""
        return self.config.position

    def __repr__(self) -> str:
        pos = self.position or "none"
        return (f"MclSTExp(backbone={self.backbone!r}, finetune={self.config['finetune']!r}, "
                f"context={self.context!r}, position={pos!r}, keys={self.config.keys!r}, "
                f"n_members={self.n_members}, panel={len(self.panel)} genes)")

    # --- image side ---------------------------------------------------------------------------
    def embed_images(self, features: np.ndarray, *, batch_size: int = 8192, member: int = 0) -> np.ndarray:
        """Image embeddings ``(N, out_dim)`` of frozen backbone features ``(N, feature_dim)``.

        Only for frozen-backbone models; a fine-tuned model embeds patches
        (:meth:`embed_patches`). ``member``: which seed of the ensemble embeds.
        """
        if self.finetuned:
            raise ValueError("This model fine-tuned its image encoder: frozen backbone features do not fit it; "
                             "use `embed_patches` with uint8 patches.")
        x = self._check_features(features, finite=True)
        return run_batches(self._member(member)[0], x, self.config.out_dim, batch_size)

    def _member(self, member: int) -> tuple[Any, Any]:
        if not isinstance(member, (int, np.integer)) or not 0 <= member < len(self.members):
            raise ValueError(f"`member` must be an integer in [0, {len(self.members)}), got {member!r}.")
        return self.members[int(member)]

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

        from sq_spade.nn.inference import encode_images, resize_preprocess

        if not self.finetuned:
            raise ValueError("This model uses frozen backbone features: compute them "
                             "(sqs.pp.compute_features) and use `embed_images`.")
        dev = resolve_device(device)
        pre = resize_preprocess(self.config.input_size, self.config.patch_px)
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
                    out.append(head(encode_images(enc, x, pre)).float().cpu().numpy())
        finally:
            enc.cpu()
            head.cpu()
        return np.concatenate(out) if out else np.zeros((0, int(self.config.out_dim)), np.float32)

    # --- spot side ----------------------------------------------------------------------------
    def embed_spots(self, expr: np.ndarray, pos: np.ndarray | None = None, context: Any = None, *,
                    batch_size: int = 4096, member: int = 0) -> np.ndarray:
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
        member
            Which seed of the ensemble embeds.
        """
        import torch

        encoder = self._member(member)[1]
        g = np.asarray(expr, dtype=np.float32)
        n_genes = len(self.panel)
        if g.ndim != 2 or g.shape[1] != n_genes:
            raise ValueError(f"`expr` must be (N, {n_genes}) over the model's panel, got shape {g.shape}.")
        if not np.isfinite(g).all():
            raise ValueError("`expr` contains NaN or infinite values.")
        n = len(g)
        has_pos = self.config.n_x is not None
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
        out = np.zeros((n, int(self.config.out_dim)), np.float32)
        with torch.inference_mode():
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if b <= a:
                    continue
                rows = order[a:b]
                et = torch.from_numpy(np.ascontiguousarray(g[rows]))
                pt = None if p is None else torch.from_numpy(np.ascontiguousarray(p[rows]))
                ct = "self" if ids is None else torch.from_numpy(ids[rows])
                out[rows] = encoder(et, pt, ct).numpy()
        return out

    # --- persistence ----------------------------------------------------------------------------
    def _to_files(self) -> tuple[dict[str, Any], Mapping[str, Any]]:
        # one safetensors file: the image head, the spot encoder and (fine-tuned models) the image
        # encoder under the prefixes image_head., spot_encoder. and image_encoder.
        # under the prefixes image_head., spot_encoder. and image_encoder.; the other seeds of an
        # ensemble under member<i>.image_head. and member<i>.spot_encoder.
        tensors = {}
        for i, (head, spot) in enumerate(self.members):
            tensors.update({member_prefix(i) + IMAGE_HEAD + k: v for k, v in head.state_dict().items()})
            tensors.update({member_prefix(i) + SPOT_ENCODER + k: v for k, v in spot.state_dict().items()})
        if self.image_encoder is not None:
            tensors.update({IMAGE_ENCODER + k: v for k, v in self.image_encoder.state_dict().items()})
        return self.config.to_json(), tensors

    @classmethod
    def load(cls, path: Any) -> MclSTExp:
        """Load a model saved with :meth:`save` (safetensors and JSON only: no code runs).

        A fine-tuned model rebuilds its backbone's architecture from the registry
        (``get_backbone(name, pretrained=False)``: nothing is downloaded) and loads the saved
        weights into it strictly.
        """
        return super().load(path)

    @classmethod
    def _expected_shapes(cls, config: MclSTExpConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        import torch

        with torch.device("meta"):
            head, spot, encoder = build_modules(config)
        parts = {IMAGE_HEAD: head, SPOT_ENCODER: spot}
        if encoder is not None:
            parts[IMAGE_ENCODER] = encoder
        out = {prefix + k: tuple(v.shape) for prefix, m in parts.items() for k, v in m.state_dict().items()}
        # the other seeds of an ensemble: the same head and spot encoder under member<i>.
        for i in range(1, int(config.n_members)):
            for prefix, m in ((IMAGE_HEAD, head), (SPOT_ENCODER, spot)):
                out.update({member_prefix(i) + prefix + k: tuple(v.shape) for k, v in m.state_dict().items()})
        return out

    @classmethod
    def _from_files(cls, config: MclSTExpConfig, tensors: dict[str, Any]) -> MclSTExp:
        head, spot, encoder = build_modules(config)
        parts = {IMAGE_HEAD: head, SPOT_ENCODER: spot}
        if encoder is not None:
            parts[IMAGE_ENCODER] = encoder
        extra = []
        for i in range(1, int(config.n_members)):
            h, s, _ = build_modules({**config.to_json(), "finetune": "none"})
            parts[member_prefix(i) + IMAGE_HEAD], parts[member_prefix(i) + SPOT_ENCODER] = h, s
            extra.append((h, s))
        # longest prefix first: "member1.image_head." before "image_head."
        owner = sorted(parts, key=len, reverse=True)
        unknown = [k for k in tensors if not k.startswith(tuple(parts))]

        def prefix_of(key: str) -> str:
            return next(p for p in owner if key.startswith(p))

        if unknown:
            raise ModelFileError(f"The tensors file holds tensors that fit no part of the MclSTExp config: {unknown[:10]}.")
        for prefix, module in parts.items():
            state = {k[len(prefix):]: v for k, v in tensors.items() if prefix_of(k) == prefix}
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
        return cls(head, spot, config, image_encoder=encoder, members=extra)


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
