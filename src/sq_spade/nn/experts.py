"""SPADE's mixture of data experts: stacked projection heads, routing, the mixture module.

Each expert is an independent :class:`~sq_spade.nn.heads.ProjectionHead`; :class:`ExpertHeads`
stores ``E`` of them as stacked parameters so that all experts run in one batched matrix
product (training all experts together costs about as much as training one on all spots).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sq_spade._validation import check_positive_float, check_positive_int
from sq_spade.nn.heads import ProjectionHead, _check_dims


class ExpertHeads(nn.Module):
    """``E`` independent projection heads stored as stacked parameters.

    Expert ``e`` computes ``h = x W1[e] + b1[e]``,
    ``out = LayerNorm_e(h + Dropout(GELU(h) W2[e] + b2[e]))``, exactly a
    :class:`~sq_spade.nn.heads.ProjectionHead` (see :meth:`from_heads` / :meth:`to_heads`).

    Parameters
    ----------
    n_experts
        Number of experts ``E``.
    in_dim
        Input dimension.
    out_dim
        Output dimension (256 in SPADE).
    dropout
        Dropout probability on each head's residual branch.

    Attributes
    ----------
    weight1
        ``(E, in_dim, out_dim)``.
    bias1
        ``(E, out_dim)``.
    weight2
        ``(E, out_dim, out_dim)``.
    bias2
        ``(E, out_dim)``.
    ln_weight, ln_bias
        LayerNorm scale and shift, ``(E, out_dim)``.

    Examples
    --------
    >>> import torch
    >>> heads = ExpertHeads(4, 32, 16)
    >>> x = torch.randn(10, 32)
    >>> heads.forward_all(x).shape
    torch.Size([10, 4, 16])
    >>> heads.forward_assigned(x, torch.randint(0, 4, (10,))).shape
    torch.Size([10, 16])
    """

    def __init__(self, n_experts: int, in_dim: int, out_dim: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        _check_dims(in_dim, out_dim, dropout)
        check_positive_int(n_experts, "n_experts")
        self.n_experts, self.in_dim, self.out_dim = int(n_experts), int(in_dim), int(out_dim)
        self.dropout_p = float(dropout)
        self.eps = 1e-5  # nn.LayerNorm's default
        e, i, o = self.n_experts, self.in_dim, self.out_dim
        self.weight1 = nn.Parameter(torch.empty(e, i, o))
        self.bias1 = nn.Parameter(torch.empty(e, o))
        self.weight2 = nn.Parameter(torch.empty(e, o, o))
        self.bias2 = nn.Parameter(torch.empty(e, o))
        self.ln_weight = nn.Parameter(torch.ones(e, o))
        self.ln_bias = nn.Parameter(torch.zeros(e, o))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert as :class:`torch.nn.Linear` would (uniform, 1/sqrt(fan_in))."""
        with torch.no_grad():
            b1, b2 = 1 / math.sqrt(self.in_dim), 1 / math.sqrt(self.out_dim)
            self.weight1.uniform_(-b1, b1)
            self.bias1.uniform_(-b1, b1)
            self.weight2.uniform_(-b2, b2)
            self.bias2.uniform_(-b2, b2)
            self.ln_weight.fill_(1.0)
            self.ln_bias.zero_()

    def config(self) -> dict[str, int | float]:
        """Constructor arguments, JSON-able (for saving next to a safetensors file)."""
        return {"n_experts": self.n_experts, "in_dim": self.in_dim, "out_dim": self.out_dim,
                "dropout": self.dropout_p}

    # --- forward variants ---------------------------------------------------------------------
    def _finish(self, h: Tensor, y: Tensor, ln_w: Tensor, ln_b: Tensor) -> Tensor:
        z = F.layer_norm(h + F.dropout(y, self.dropout_p, self.training), (self.out_dim,),
                         eps=self.eps)
        return z * ln_w + ln_b

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on every row: ``(N, in_dim) -> (N, E, out_dim)``."""
        self._check_x(x)
        h = torch.einsum("ni,eio->neo", x, self.weight1) + self.bias1
        y = torch.einsum("neo,eop->nep", F.gelu(h), self.weight2) + self.bias2
        return self._finish(h, y, self.ln_weight, self.ln_bias)

    def forward_stacked(self, xb: Tensor, experts: Tensor | None = None) -> Tensor:
        """Per-expert batches: ``(E, B, in_dim) -> (E, B, out_dim)`` (for training).

        Parameters
        ----------
        xb
            Batch ``e`` goes through expert ``e`` (or through ``experts[e]``).
        experts
            Optional ``(E',)`` expert indices when ``xb`` holds batches of a subset of experts.
        """
        if xb.ndim != 3 or xb.shape[-1] != self.in_dim:
            raise ValueError(f"`xb` must have shape (E, B, {self.in_dim}), got {tuple(xb.shape)}.")
        params = [self.weight1, self.bias1, self.weight2, self.bias2, self.ln_weight, self.ln_bias]
        if experts is not None:
            params = [p[experts] for p in params]
        w1, b1, w2, b2, lw, lb = params
        if xb.shape[0] != w1.shape[0]:
            raise ValueError(f"`xb` must hold {w1.shape[0]} batches (one per expert), "
                             f"got {xb.shape[0]}.")
        h = torch.baddbmm(b1[:, None, :], xb, w1)
        y = torch.baddbmm(b2[:, None, :], F.gelu(h), w2)
        return self._finish(h, y, lw[:, None, :], lb[:, None, :])

    def forward_one(self, x: Tensor, e: int) -> Tensor:
        """Expert ``e`` alone: ``(N, in_dim) -> (N, out_dim)``."""
        h = torch.addmm(self.bias1[e], x, self.weight1[e])
        y = torch.addmm(self.bias2[e], F.gelu(h), self.weight2[e])
        return self._finish(h, y, self.ln_weight[e], self.ln_bias[e])

    def forward_assigned(self, x: Tensor, expert: Tensor | int,
                         method: str = "group") -> Tensor:
        """Each row through its own expert only: ``(N, in_dim) -> (N, out_dim)``.

        Parameters
        ----------
        x
            Inputs, ``(N, in_dim)``.
        expert
            Expert of each row, integer ``(N,)``, or one int for all rows.
        method
            ``"group"``: sort rows by expert and run one matrix product per expert (fast);
            ``"gather"``: gather each row's weights and use batched vector-matrix products
            (in chunks; slower, kept for comparison, see ``benchmarks/bench_experts.py``).
        """
        self._check_x(x)
        n = x.shape[0]
        if isinstance(expert, numbers.Integral) and not isinstance(expert, bool):
            expert = torch.full((n,), int(expert), dtype=torch.long, device=x.device)
        expert = self._check_expert(expert, n).to(x.device)
        if method == "gather":
            return self._forward_gather(x, expert)
        if method != "group":
            raise ValueError(f"`method` must be 'group' or 'gather', got {method!r}.")
        if n == 0:
            return x.new_empty(0, self.out_dim)
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.n_experts).tolist()
        parts, start = [], 0
        xs = x[order]
        for e, c in enumerate(counts):
            if c:
                parts.append(self.forward_one(xs[start:start + c], e))
                start += c
        return torch.cat(parts)[torch.argsort(order)]

    def _forward_gather(self, x: Tensor, expert: Tensor, chunk: int = 256) -> Tensor:
        outs = []
        for s in range(0, x.shape[0], chunk):
            ex, xc = expert[s:s + chunk], x[s:s + chunk, None, :]
            h = torch.baddbmm(self.bias1[ex][:, None], xc, self.weight1[ex])
            y = torch.baddbmm(self.bias2[ex][:, None], F.gelu(h), self.weight2[ex])
            outs.append(self._finish(h, y, self.ln_weight[ex][:, None], self.ln_bias[ex][:, None])[:, 0])
        return torch.cat(outs) if outs else x.new_empty(0, self.out_dim)

    def forward_weighted(self, x: Tensor, weights: Tensor, min_weight: float = 0.0) -> Tensor:
        """Weighted sum of the experts' outputs: ``sum_e weights[:, e] * head_e(x)``.

        Only rows whose weight for an expert exceeds ``min_weight`` run through it. With the
        default 0 this is exact (a weight that is exactly 0 contributes nothing) and, since
        SPADE's routing softmax underflows to exact zeros for far experts, usually much cheaper
        than :meth:`forward_all`.

        Parameters
        ----------
        x
            Inputs, ``(N, in_dim)``.
        weights
            Non-negative expert weights, ``(N, E)``.
        min_weight
            Skip (row, expert) pairs with a weight at or below this.
        """
        self._check_x(x)
        if weights.shape != (x.shape[0], self.n_experts):
            raise ValueError(f"`weights` must have shape ({x.shape[0]}, {self.n_experts}), "
                             f"got {tuple(weights.shape)}.")
        out = x.new_zeros(x.shape[0], self.out_dim)
        for e in range(self.n_experts):
            rows = torch.nonzero(weights[:, e] > min_weight).flatten()
            if rows.numel():
                contrib = weights[rows, e, None].to(x.dtype) * self.forward_one(x[rows], e)
                out = out.index_add(0, rows, contrib)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Alias of :meth:`forward_all`."""
        return self.forward_all(x)

    # --- conversion --------------------------------------------------------------------------
    @classmethod
    def from_heads(cls, heads: Sequence[ProjectionHead]) -> ExpertHeads:
        """Stack independent :class:`ProjectionHead` modules (same dimensions) into one.

        Examples
        --------
        >>> from sq_spade.nn.heads import ProjectionHead
        >>> stacked = ExpertHeads.from_heads([ProjectionHead(8, 4) for _ in range(3)])
        >>> stacked.n_experts
        3
        """
        heads = list(heads)
        if not heads or not all(isinstance(h, ProjectionHead) for h in heads):
            raise TypeError("`heads` must be a non-empty sequence of ProjectionHead.")
        first = heads[0]
        if any((h.in_dim, h.out_dim) != (first.in_dim, first.out_dim) for h in heads):
            raise ValueError("`heads` must all have the same in_dim and out_dim.")
        new = cls(len(heads), first.in_dim, first.out_dim, first.dropout_p)
        ref = first.projection.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            new.weight1.copy_(torch.stack([h.projection.weight.T for h in heads]))
            new.bias1.copy_(torch.stack([h.projection.bias for h in heads]))
            new.weight2.copy_(torch.stack([h.fc.weight.T for h in heads]))
            new.bias2.copy_(torch.stack([h.fc.bias for h in heads]))
            new.ln_weight.copy_(torch.stack([h.layer_norm.weight for h in heads]))
            new.ln_bias.copy_(torch.stack([h.layer_norm.bias for h in heads]))
        return new

    def to_heads(self) -> list[ProjectionHead]:
        """Independent :class:`ProjectionHead` copies of the experts."""
        out = []
        for e in range(self.n_experts):
            h = ProjectionHead(self.in_dim, self.out_dim, self.dropout_p)
            h = h.to(device=self.weight1.device, dtype=self.weight1.dtype)
            with torch.no_grad():
                h.projection.weight.copy_(self.weight1[e].T)
                h.projection.bias.copy_(self.bias1[e])
                h.fc.weight.copy_(self.weight2[e].T)
                h.fc.bias.copy_(self.bias2[e])
                h.layer_norm.weight.copy_(self.ln_weight[e])
                h.layer_norm.bias.copy_(self.ln_bias[e])
            h.layer_norm.eps = self.eps
            out.append(h.train(self.training))
        return out

    # --- checks -------------------------------------------------------------------------------
    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`x` must be a tensor of shape (N, {self.in_dim}), got {shape}.")

    def _check_expert(self, expert: Tensor, n: int) -> Tensor:
        if (not isinstance(expert, Tensor) or expert.shape != (n,)
                or expert.dtype.is_floating_point or expert.dtype == torch.bool):
            raise ValueError(f"`expert` must be an int or an integer tensor of shape ({n},).")
        expert = expert.long()
        if n and (int(expert.min()) < 0 or int(expert.max()) >= self.n_experts):
            raise ValueError(f"`expert` must lie in [0, {self.n_experts}), got values in "
                             f"[{int(expert.min())}, {int(expert.max())}].")
        return expert


def route(features: Tensor, centroids: Tensor, fine_to_expert: Tensor, n_experts: int,
          temperature: float = 0.1, hard: bool = False) -> Tensor:
    r"""SPADE's routing weights of each feature vector over the experts.

    ``d_k = ||x - c_k||`` (Euclidean, not squared) to every fine centroid,
    ``w = softmax(-d / temperature)``, and expert ``e`` gets ``a_e = sum`` of ``w_k`` over its
    fine centroids. ``hard=True`` gives the one-hot of the expert of the nearest fine centroid
    (the limit of the soft weights as ``temperature -> 0``).

    Parameters
    ----------
    features
        ``(N, D)``.
    centroids
        Fine centroids, ``(K, D)``.
    fine_to_expert
        Expert of each fine centroid, integer ``(K,)`` in ``[0, n_experts)``.
    n_experts
        Number of experts ``E``.
    temperature
        Softmax temperature (0.1 in SPADE).
    hard
        One-hot routing to the nearest fine centroid's expert.

    Returns
    -------
    Weights ``(N, E)``, each row summing to 1.

    Examples
    --------
    >>> import torch
    >>> c = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    >>> route(torch.tensor([[9.0, 1.0]]), c, torch.tensor([0, 1, 1]), 2, hard=True)
    tensor([[0., 1.]])
    """
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError("`features` must be a tensor of shape (N, D).")
    if not isinstance(centroids, Tensor) or centroids.ndim != 2 \
            or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"`centroids` must be a tensor of shape (K, {features.shape[1]}).")
    k = centroids.shape[0]
    if (not isinstance(fine_to_expert, Tensor) or fine_to_expert.shape != (k,)
            or fine_to_expert.dtype.is_floating_point):
        raise ValueError(f"`fine_to_expert` must be an integer tensor of shape ({k},).")
    check_positive_int(n_experts, "n_experts")
    f2e = fine_to_expert.to(features.device).long()
    if k and (int(f2e.min()) < 0 or int(f2e.max()) >= n_experts):
        raise ValueError(f"`fine_to_expert` must lie in [0, {n_experts}).")
    if not hard:
        check_positive_float(temperature, "temperature")
    d = torch.cdist(features, centroids.to(features.device, features.dtype))
    if hard:
        nearest = f2e[d.argmin(dim=1)]
        return F.one_hot(nearest, n_experts).to(features.dtype)
    w = torch.softmax(-d / float(temperature), dim=1)
    out = features.new_zeros(features.shape[0], n_experts)
    return out.index_add(1, f2e, w)


class MixtureOfExperts(nn.Module):
    """SPADE: routed image experts and per-expert gene heads sharing one latent space.

    Parameters
    ----------
    image_heads
        Image-side experts (``D -> out_dim``).
    gene_heads
        Gene-side experts (``G -> out_dim``), same number of experts and ``out_dim``.
    centroids
        Fine centroids of the image features, ``(K, D)`` (stored as a buffer).
    fine_to_expert
        Expert of each fine centroid, ``(K,)`` (stored as a buffer).
    temperature
        Default routing temperature (0.1 in SPADE).
    rotation
        Optional orthogonal ``(E, out_dim, out_dim)`` rotations (a buffer): expert ``e``'s image
        and gene embeddings are multiplied by ``rotation[e]`` in the *aligned* space (see
        :func:`procrustes_rotations`). Rotations change no similarity within an expert.

    Examples
    --------
    >>> import torch
    >>> moe = MixtureOfExperts(ExpertHeads(2, 8, 4), ExpertHeads(2, 5, 4),
    ...                        torch.randn(6, 8), torch.tensor([0, 0, 0, 1, 1, 1]))
    >>> moe.eval().embed_images(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """

    centroids: Tensor
    fine_to_expert: Tensor
    rotation: Tensor | None

    def __init__(self, image_heads: ExpertHeads, gene_heads: ExpertHeads, centroids: Tensor,
                 fine_to_expert: Tensor, temperature: float = 0.1, rotation: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(image_heads, ExpertHeads):
            raise TypeError("`image_heads` must be an ExpertHeads.")
        if not isinstance(gene_heads, ExpertHeads):
            raise TypeError("`gene_heads` must be an ExpertHeads.")
        if (gene_heads.n_experts, gene_heads.out_dim) != (image_heads.n_experts, image_heads.out_dim):
            raise ValueError("`gene_heads` must have the n_experts and out_dim of `image_heads`.")
        centroids = torch.as_tensor(centroids, dtype=torch.float32)
        fine_to_expert = torch.as_tensor(fine_to_expert).long()
        if centroids.ndim != 2 or centroids.shape[1] != image_heads.in_dim:
            raise ValueError(f"`centroids` must have shape (K, {image_heads.in_dim}), "
                             f"got {tuple(centroids.shape)}.")
        if fine_to_expert.shape != (centroids.shape[0],):
            raise ValueError(f"`fine_to_expert` must have shape ({centroids.shape[0]},).")
        if int(fine_to_expert.min()) < 0 or int(fine_to_expert.max()) >= image_heads.n_experts:
            raise ValueError(f"`fine_to_expert` must lie in [0, {image_heads.n_experts}).")
        check_positive_float(temperature, "temperature")
        self.image_heads = image_heads
        self.gene_heads = gene_heads
        self.register_buffer("centroids", centroids)
        self.register_buffer("fine_to_expert", fine_to_expert)
        self.temperature = float(temperature)
        if rotation is not None:
            rotation = torch.as_tensor(rotation, dtype=torch.float32)
            d = image_heads.out_dim
            if rotation.shape != (image_heads.n_experts, d, d):
                raise ValueError(f"`rotation` must have shape ({image_heads.n_experts}, {d}, {d}), "
                                 f"got {tuple(rotation.shape)}.")
            self.register_buffer("rotation", rotation)
        else:
            self.rotation = None

    @property
    def n_experts(self) -> int:
        """Number of experts."""
        return self.image_heads.n_experts

    def config(self) -> dict[str, object]:
        """JSON-able description (the buffers and weights live in the state dict)."""
        return {"image_heads": self.image_heads.config(), "gene_heads": self.gene_heads.config(),
                "n_centroids": int(self.centroids.shape[0]), "temperature": self.temperature}

    def route(self, x: Tensor, temperature: float | None = None, hard: bool = False) -> Tensor:
        """Routing weights ``(N, E)`` of image features ``x`` (see :func:`route`)."""
        t = self.temperature if temperature is None else temperature
        return route(x, self.centroids, self.fine_to_expert, self.n_experts, t, hard)

    def assign(self, x: Tensor) -> Tensor:
        """Expert of the nearest fine centroid of each row of ``x``, ``(N,)``."""
        d = torch.cdist(x, self.centroids.to(x.dtype))
        return self.fine_to_expert[d.argmin(dim=1)]

    def embed_images_by(self, x: Tensor, expert: int, aligned: bool = True) -> Tensor:
        """Image embeddings of ``x`` by one expert's head (rotated into the aligned space if any)."""
        z = self.image_heads.forward_one(x, int(expert))
        return z @ self.rotation[int(expert)] if aligned and self.rotation is not None else z

    def embed_images(self, x: Tensor, temperature: float | None = None, hard: bool = False,
                     min_weight: float = 0.0, aligned: bool = True) -> Tensor:
        """SPADE image embedding ``z = sum_e a_e(x) * imagehead_e(x)``, ``(N, out_dim)``.

        Parameters
        ----------
        x
            Image features ``(N, D)``.
        temperature
            Routing temperature; ``None``: the module's (0.1 by default).
        hard
            Route each row to its nearest fine centroid's expert only.
        min_weight
            Skip (row, expert) pairs with routing weight at or below this (0: exact).
        aligned
            Rotate each expert into the aligned space first (with ``rotation`` only).
        """
        if aligned and self.rotation is not None:
            w = self.route(x, temperature, hard=hard)
            out = x.new_zeros(x.shape[0], self.image_heads.out_dim)
            for e in range(self.n_experts):
                rows = torch.nonzero(w[:, e] > min_weight).flatten()
                if rows.numel():
                    out = out.index_add(0, rows, w[rows, e, None] * self.embed_images_by(x[rows], e))
            return out
        if hard:
            return self.image_heads.forward_assigned(x, self.assign(x))
        return self.image_heads.forward_weighted(x, self.route(x, temperature), min_weight)

    def embed_genes(self, g: Tensor, expert: Tensor | int, aligned: bool = True) -> Tensor:
        """Gene-side embedding of each row by its expert's gene head, ``(N, out_dim)``."""
        z = self.gene_heads.forward_assigned(g, expert)
        if aligned and self.rotation is not None:
            e = torch.as_tensor(expert, device=z.device).long().expand(z.shape[0])
            z = torch.bmm(z[:, None, :], self.rotation[e])[:, 0]
        return z

    def forward(self, x: Tensor) -> Tensor:
        """Alias of :meth:`embed_images` with the default (soft) routing."""
        return self.embed_images(x)


def procrustes_rotations(z: Tensor, n_iter: int = 10) -> Tensor:
    r"""Orthogonal rotations aligning each expert's embeddings of the same rows (generalised Procrustes).

    ``z[e]`` holds expert ``e``'s embeddings of one set of rows. Starting from expert 0's,
    alternately solve each orthogonal Procrustes problem ``R_e = argmin ||z_e R - m||`` (``R = U
    V^T`` from the SVD of ``z_e^T m``) and average the rotated embeddings into the anchor ``m``.

    Parameters
    ----------
    z
        ``(E, N, d)`` embeddings of the same ``N`` rows by every expert.
    n_iter
        Alternations.

    Returns
    -------
    ``(E, d, d)`` orthogonal rotations.

    Examples
    --------
    >>> import torch
    >>> a = torch.randn(50, 4)
    >>> q, _ = torch.linalg.qr(torch.randn(4, 4))
    >>> r = procrustes_rotations(torch.stack([a, a @ q]))
    >>> bool(torch.allclose(a @ r[0], (a @ q) @ r[1], atol=1e-4))
    True
    """
    if not isinstance(z, Tensor) or z.ndim != 3:
        raise ValueError("`z` must be a tensor of shape (E, N, d).")
    zd = z.double()
    m = zd[0]
    rot = torch.eye(z.shape[2], dtype=torch.float64).expand(z.shape[0], -1, -1).clone()
    for _ in range(int(n_iter)):
        u, _, vh = torch.linalg.svd(zd.transpose(1, 2) @ m)
        rot = u @ vh
        m = (zd @ rot).mean(0)
    return rot.float()
