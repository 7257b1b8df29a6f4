"""The user-facing SPADE model: routed experts over frozen backbone features."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sq_spade import _constants as K
from sq_spade._config import check
from sq_spade._files import ModelFileError
from sq_spade._validation import check_choice, check_positive_float
from sq_spade.models._base import Model, ModelConfig, member_prefix, run_batches

#: The tensors of one ensemble member (its heads and rotations); the routing (fine centroids and
#: their experts) is shared by every member and stored once.
MEMBER_PARTS = ("image_heads.", "gene_heads.", "rotation")


@dataclass(eq=False, kw_only=True)
class SpadeConfig(ModelConfig):
    """Configuration of a :class:`Spade` model (saved as JSON beside its tensors).

    Besides :class:`~sq_spade.models.ModelConfig`'s keys: ``gene_input`` (what the gene heads
    read), ``n_experts``, ``n_fine`` (fine centroids), ``out_dim``, ``dropout``,
    ``routing_temperature`` (soft routing at inference), ``reference_side`` (what
    :func:`sq_spade.tl.predict_expression` retrieves against), ``centroid_groups`` (group of
    each fine centroid), ``history`` (losses of member 0), ``selection`` (the number of experts and how it
    was chosen, validation scores of the reference sides) and ``alignment`` (how the experts
    share one space: ``"shared_genes"``, ``"procrustes"`` or ``"none"``, the published
    independent experts and the value of models saved before the option), ``n_members``
    (seeds of the ensemble: sets of heads trained on the same experts; folders saved before
    the key read as 1).
    """

    gene_input: K.GeneInput
    n_experts: int = field(metadata=check(lambda v: v > 0))
    n_fine: int = field(metadata=check(lambda v: v > 0))
    out_dim: int = field(metadata=check(lambda v: v > 0))
    dropout: float = field(metadata=check(lambda v: 0 <= v < 1))
    routing_temperature: float = field(metadata=check(lambda v: v > 0))
    reference_side: K.ReferenceSide
    centroid_groups: list[Any] | None = None
    history: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    alignment: K.Alignment = field(default="none", metadata=check(lambda v: v in K.ALIGNMENTS))
    n_members: int = field(default=1, metadata=check(lambda v: v > 0))

    def __post_init__(self) -> None:
        if self.n_members is None:  # folders saved before ensembles: one member
            object.__setattr__(self, "n_members", 1)
        super().__post_init__()


class Spade(Model):
    """SPADE: a mixture of contrastive experts over frozen image features.

    Build it with :func:`sq_spade.tl.train_experts`; use it with :func:`sq_spade.tl.embed`
    and :func:`sq_spade.tl.predict_expression`. The torch module (``.module``, a
    :class:`sq_spade.nn.experts.MixtureOfExperts`) holds the stacked image and gene heads, the
    fine centroids and the fine-to-expert map.

    An ensemble (``train_experts(n_seeds=...)``) holds several sets of heads trained on the same
    experts (the same fine centroids and routing): ``members``. Predictions average over them;
    embeddings (:meth:`embed_images`, :func:`sq_spade.tl.embed`) are member 0's by default,
    each member living in its own space.

    Attributes
    ----------
    module
        The :class:`~sq_spade.nn.experts.MixtureOfExperts` (member 0).
    members
        ``[module, ...]``, one MixtureOfExperts per seed of the ensemble, sharing the routing.
    config
        Backbone, panel, sizes and provenance (a :class:`SpadeConfig`, read like a dict).
    history
        Loss per epoch and expert (``train_loss``, ``val_loss``).

    Examples
    --------
    >>> model = sqs.tl.train_experts(sdata)  # doctest: +SKIP
    >>> model.save("spade_model")  # doctest: +SKIP
    >>> same = sqs.models.Spade.load("spade_model")  # doctest: +SKIP
    """

    config_class = SpadeConfig
    file_class = "Spade"

    def __init__(self, module: Any, config: Mapping[str, Any], members: Any = None):
        extra = [m.eval() for m in (members or [])]
        given = config.get("n_members")
        super().__init__(config)
        if given is None:
            self.config["n_members"] = 1 + len(extra)
        self.members = [module.eval(), *extra]
        if int(self.config.n_members) != len(self.members):
            raise ValueError(f"config['n_members'] is {self.config.n_members} but {len(self.members)} members "
                             f"(MixtureOfExperts) were given.")
        for m in extra:
            if (m.n_experts, m.image_heads.out_dim) != (module.n_experts, module.image_heads.out_dim) or not (
                    m.centroids.shape == module.centroids.shape and bool((m.centroids == module.centroids).all())
                    and bool((m.fine_to_expert == module.fine_to_expert).all())):
                raise ValueError("Every member must share the first's experts: the same fine centroids, "
                                 "fine-to-expert map, number of experts and out_dim.")

    @property
    def module(self) -> Any:
        """Member 0's :class:`~sq_spade.nn.experts.MixtureOfExperts` (that of a single model)."""
        return self.members[0]

    @module.setter
    def module(self, value: Any) -> None:
        self.members[0] = value

    @property
    def n_members(self) -> int:
        """Seeds in the ensemble (1: a single model)."""
        return len(self.members)

    def _member(self, member: int) -> Any:
        if not isinstance(member, (int, np.integer)) or not 0 <= member < len(self.members):
            raise ValueError(f"`member` must be an integer in [0, {len(self.members)}), got {member!r}.")
        return self.members[int(member)]

    @property
    def n_experts(self) -> int:
        """Number of experts."""
        return int(self.config.n_experts)

    def __repr__(self) -> str:
        return (f"Spade(backbone={self.backbone!r}, experts={self.n_experts}, fine centroids="
                f"{int(self.module.centroids.shape[0])}, n_members={self.n_members}, panel={len(self.panel)} genes)")

    # --- maths ------------------------------------------------------------------------------------
    def _run(self, fn: Any, x: np.ndarray) -> np.ndarray:
        return run_batches(fn, x, self.config.out_dim)

    def embed_images(self, features: np.ndarray, *, routing: K.Routing = "soft",
                     temperature: float | None = None, space: K.Space = "aligned", member: int = 0) -> np.ndarray:
        """SPADE image embeddings ``(N, out_dim)`` of backbone features ``(N, D)``.

        ``space="published"``: the routed sum of the experts' image heads, as the published code
        computes it; ``"aligned"``: the same sum once every expert is in the common space (the
        Procrustes rotations applied; a model with a shared gene head is aligned by training, so
        both are equal; for ``alignment="none"`` there is no common space and both are equal).
        ``member``: which seed of the ensemble embeds (each has its own space).
        """
        check_choice(routing, "routing", K.ROUTINGS)
        check_choice(space, "space", K.SPACES)
        t = self.config.routing_temperature if temperature is None else check_positive_float(temperature,
                                                                                              "temperature")
        x = self._check_features(features)
        mod = self._member(member)
        return self._run(lambda b: mod.embed_images(b, temperature=t, hard=routing == "hard",
                                                    aligned=space == "aligned"), x)

    def embed_images_by(self, features: np.ndarray, expert: int, *, member: int = 0) -> np.ndarray:
        """Image embeddings ``(N, out_dim)`` of backbone features ``(N, D)`` by one expert's image head.

        ``member``: which seed of the ensemble embeds.

        Examples
        --------
        >>> z = model.embed_images_by(features, 0)  # doctest: +SKIP
        """
        e = int(expert)
        if not 0 <= e < self.n_experts:
            raise ValueError(f"`expert` must lie in [0, {self.n_experts}), got {expert!r}.")
        mod = self._member(member)
        return self._run(lambda b: mod.embed_images_by(b, e), self._check_features(features))

    def routing_weights(self, features: np.ndarray, *, temperature: float | None = None) -> np.ndarray:
        """Soft routing weights ``(N, n_experts)``."""
        t = self.config.routing_temperature if temperature is None else float(temperature)
        return self._run(lambda b: self.module.route(b, temperature=t), self._check_features(features))

    def assign(self, features: np.ndarray) -> np.ndarray:
        """Expert of each row: that of its nearest fine centroid."""
        return self._run(lambda b: self.module.assign(b)[:, None].float(), self._check_features(features))[:, 0].astype(np.int64)

    def embed_genes(self, genes: np.ndarray, expert: np.ndarray, *, member: int = 0) -> np.ndarray:
        """Gene-side embeddings of expression rows ``(N, G)`` by their experts' gene heads (of ``member``)."""
        import torch

        mod = self._member(member)
        g = np.asarray(genes, dtype=np.float32)
        if g.ndim != 2 or g.shape[1] != len(self.panel):
            raise ValueError(f"`genes` must be (N, {len(self.panel)}) over the model's panel, got {g.shape}.")
        e = np.asarray(expert, dtype=np.int64)
        out = []
        with torch.inference_mode():
            for s in range(0, len(g), 8192):
                out.append(mod.embed_genes(torch.as_tensor(g[s: s + 8192]), torch.as_tensor(e[s: s + 8192])).numpy())
        return np.concatenate(out) if out else np.zeros((0, int(self.config.out_dim)), np.float32)

    # --- persistence ----------------------------------------------------------------------------
    def _to_files(self) -> tuple[dict[str, Any], Mapping[str, Any]]:
        # member 0 under the names of single models (old readers load it); the heads (and
        # rotations) of the other seeds under member<i>.; the shared routing once
        tensors = dict(self.module.state_dict())
        for i, m in enumerate(self.members[1:], start=1):
            tensors.update({member_prefix(i) + k: v for k, v in m.state_dict().items() if k.startswith(MEMBER_PARTS)})
        return self.config.to_json(), tensors

    @classmethod
    def _expected_shapes(cls, config: SpadeConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        import torch

        from sq_spade.nn.experts import ExpertHeads

        e, d, g = int(config["n_experts"]), int(config["feature_dim"]), len(config["panel"])
        # the number of fine centroids is the stored one (as in build_module); their width is the config's
        k = int(shapes["centroids"][0]) if len(shapes.get("centroids", ())) == 2 else int(config["n_fine"])
        out = {"centroids": (k, d), "fine_to_expert": (k,)}
        with torch.device("meta"):  # sizes only: nothing is allocated
            for name, n_in in (("image_heads", d), ("gene_heads", g)):
                heads = ExpertHeads(e, n_in, int(config["out_dim"]), float(config["dropout"]))
                out.update({f"{name}.{key}": tuple(v.shape) for key, v in heads.state_dict().items()})
        if "rotation" in shapes or config["alignment"] == "procrustes":  # Procrustes rotations, per expert
            o = int(config["out_dim"])
            out["rotation"] = (e, o, o)
        # the other seeds of an ensemble: the same heads (and rotations) under member<i>.
        own = {k: v for k, v in out.items() if k.startswith(MEMBER_PARTS)}
        for i in range(1, int(config["n_members"])):
            out.update({member_prefix(i) + k: v for k, v in own.items()})
        return out

    @classmethod
    def _from_files(cls, config: SpadeConfig, tensors: dict[str, Any]) -> Spade:
        shared = {k: tensors[k] for k in ("centroids", "fine_to_expert") if k in tensors}
        modules = []
        for i in range(int(config["n_members"])):
            p = member_prefix(i)
            own = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p) and (
                i > 0 or not k.startswith("member"))}
            state = {**own, **shared} if i else own
            try:
                module = build_module(config, centroids=shared.get("centroids"),
                                      fine_to_expert=shared.get("fine_to_expert"), rotation=state.get("rotation"))
            except (ValueError, TypeError) as e:  # e.g. a fine-to-expert map outside [0, n_experts)
                raise ModelFileError(f"The tensors file does not fit the Spade config: {e}") from e
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ModelFileError(f"The tensors file does not fit the Spade config ({p or 'member 0'}): missing "
                                     f"{missing[:10]}, unexpected {unexpected[:10]}.")
            modules.append(module)
        return cls(modules[0], config, members=modules[1:])

    @classmethod
    def from_original(cls, expert_checkpoints: Sequence[str | os.PathLike],
                      centroids: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray,
                      fine_to_expert: str | os.PathLike | np.ndarray, *, backbone: str, panel: Sequence[str],
                      gene_input: str = "raw", routing_temperature: float = 0.1) -> Spade:
        """Import checkpoints of the original SPADE repository, safely and strictly.

        Parameters
        ----------
        expert_checkpoints
            One ``.pt`` per expert, in expert order, each a dict with a ``model`` state dict holding
            ``image_projection.{projection,fc,layer_norm}.*`` and ``spot_projection.*``. Read with
            ``torch.load(weights_only=True)``: a checkpoint that needs code to load is refused.
        centroids
            The fine centroids: a ``.npy`` file (read with ``allow_pickle=False``) or an array of
            shape ``(K, D)``, or the original's per-organ layout ``(1, K, D)`` (one organ) or
            ``(G, K, D)`` (``G`` organs, flattened organ by organ to ``(G * K, D)``); or a list of
            such files, one per organ, concatenated in order.
        fine_to_expert
            ``.npy`` file or array mapping each fine centroid (in the order above) to its expert.
        backbone
            Backbone the features came from (e.g. ``"uni"``).
        panel
            The gene names of the gene heads' inputs, in order.
        gene_input
            The original fed raw counts (``"raw"``).
        routing_temperature
            Routing temperature (0.1).
        """
        import torch

        from sq_spade.nn.experts import ExpertHeads
        from sq_spade.nn.heads import ProjectionHead

        c = _original_centroids(centroids)
        f2e = np.asarray(fine_to_expert if isinstance(fine_to_expert, np.ndarray)
                         else np.load(fine_to_expert, allow_pickle=False)).astype(np.int64)
        img_heads, gene_heads = [], []
        for path in expert_checkpoints:
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"`expert_checkpoints`: {str(path)!r} cannot be loaded safely "
                                 f"(weights_only=True): {type(e).__name__}: {str(e)[:200]}") from e
            sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
            if not isinstance(sd, dict):
                raise ValueError(f"`expert_checkpoints`: {str(path)!r} holds no state dict.")
            for prefix, store in (("image_projection.", img_heads), ("spot_projection.", gene_heads)):
                sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                # our ProjectionHead keeps the original parameter names, so the map is explicit identity
                mapped = {_ORIGINAL_KEYS[k]: v for k, v in sub.items() if k in _ORIGINAL_KEYS}
                mapped.update({k: v for k, v in sub.items() if k not in _ORIGINAL_KEYS})
                if "projection.weight" not in mapped:
                    raise ValueError(f"`expert_checkpoints`: {str(path)!r} lacks {prefix}projection.weight.")
                out_dim, in_dim = mapped["projection.weight"].shape
                head = ProjectionHead(in_dim, out_dim)
                _load_head_strict(head, mapped, path, prefix)
                store.append(head)
            extra = [k for k in sd if not k.startswith(("image_projection.", "spot_projection."))]
            if extra:
                raise ValueError(f"`expert_checkpoints`: unexpected keys in {str(path)!r}: {extra[:10]}.")
        if c.shape[1] != img_heads[0].projection.in_features:
            raise ValueError(f"`centroids` are {c.shape[1]}-d but the image heads take "
                             f"{img_heads[0].projection.in_features}-d features: centroids and checkpoints come "
                             "from different feature spaces.")
        if len(panel) != gene_heads[0].projection.in_features:
            raise ValueError(f"`panel` has {len(panel)} genes but the gene heads take {gene_heads[0].projection.in_features}.")
        n_exp = len(img_heads)
        if f2e.shape != (len(c),) or f2e.min() < 0 or f2e.max() >= n_exp:
            raise ValueError(f"`fine_to_expert` must map {len(c)} centroids to experts in [0, {n_exp}).")
        from sq_spade.nn.experts import MixtureOfExperts

        module = MixtureOfExperts(ExpertHeads.from_heads(img_heads), ExpertHeads.from_heads(gene_heads),
                                  torch.as_tensor(c), torch.as_tensor(f2e), temperature=routing_temperature)
        config = {"backbone": backbone, "feature_dim": int(c.shape[1]), "panel": [str(g) for g in panel],
                  "gene_input": gene_input, "n_experts": n_exp, "n_fine": int(len(c)),
                  "out_dim": int(img_heads[0].projection.out_features), "dropout": 0.0,
                  "routing_temperature": float(routing_temperature), "reference_side": "genes",
                  # the original routes the backbone's final pooled features, raw
                  "params": {"imported_from": "original SPADE checkpoints",
                             "feature_recipe": {"layers": ["final"], "tta": False, "zscore": None}}}
        return cls(module, config)


def _original_centroids(centroids: Any) -> np.ndarray:
    """The fine centroids ``(K, D)`` float32 of :meth:`Spade.from_original`, from any of its accepted layouts."""
    if isinstance(centroids, np.ndarray):
        parts = [centroids]
    elif isinstance(centroids, (str, os.PathLike)):
        parts = [np.load(centroids, allow_pickle=False)]
    elif isinstance(centroids, Sequence) and centroids:
        parts = [np.load(p, allow_pickle=False) for p in centroids]
    else:
        raise TypeError(f"`centroids` must be a .npy path, a list of them (one per organ) or an array, got "
                        f"{type(centroids).__name__}.")
    flat = []
    for i, a in enumerate(parts):
        a = np.asarray(a)
        where = f" (file {i})" if len(parts) > 1 else ""
        if a.ndim == 3:  # the original's per-organ layout (organs, K, D)
            a = a.reshape(-1, a.shape[-1])
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or min(a.shape) == 0:
            raise ValueError(f"`centroids`{where} must be fine centroids (K, D), or per organ (1, K, D) / "
                             f"(G, K, D); got shape {np.shape(parts[i])} of dtype {np.asarray(parts[i]).dtype}.")
        flat.append(a.astype(np.float32))
    if len({a.shape[1] for a in flat}) > 1:
        raise ValueError(f"`centroids` files have different dimensions: {[a.shape[1] for a in flat]}.")
    return np.concatenate(flat)


# original SPADE ProjectionHead parameter names -> ours (the same names, listed explicitly so an
# unknown key is refused rather than silently dropped)
_ORIGINAL_KEYS = {k: k for k in ("projection.weight", "projection.bias", "fc.weight", "fc.bias",
                                 "layer_norm.weight", "layer_norm.bias")}


def _load_head_strict(head: Any, state: Mapping[str, Any], path: Any, prefix: str) -> None:
    own = set(head.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"`expert_checkpoints`: {str(path)!r} ({prefix}*) does not fit a projection head: "
                         f"missing {missing}, unexpected {unexpected}.")
    head.load_state_dict(dict(state), strict=True)


def build_module(config: Mapping[str, Any], *, centroids: Any = None, fine_to_expert: Any = None,
                 rotation: Any = None) -> Any:
    """An untrained MixtureOfExperts shaped by ``config`` (weights come from a state dict)."""
    import torch

    from sq_spade.nn.experts import ExpertHeads, MixtureOfExperts

    e, d, g = int(config["n_experts"]), int(config["feature_dim"]), len(config["panel"])
    k = int(config["n_fine"]) if centroids is None else int(centroids.shape[0])
    c = torch.zeros(k, d) if centroids is None else torch.as_tensor(centroids, dtype=torch.float32)
    f2e = torch.arange(k) % e if fine_to_expert is None else torch.as_tensor(fine_to_expert).long()
    return MixtureOfExperts(ExpertHeads(e, d, int(config["out_dim"]), float(config["dropout"])),
                            ExpertHeads(e, g, int(config["out_dim"]), float(config["dropout"])),
                            c, f2e, temperature=float(config["routing_temperature"]),
                            rotation=None if rotation is None else torch.as_tensor(rotation, dtype=torch.float32))
