"""mclSTExp's spot encoder: expression + position embeddings, a transformer over a set of spots."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sq_spade._validation import check_positive_int
from sq_spade.nn.heads import ProjectionHead

_SELF = "self"


class _Attention(nn.Module):
    """Pre-LayerNorm multi-head self-attention over a set (vit-pytorch layout, as mclSTExp)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.dropout_p = heads, dim_head, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor | None, self_only: bool) -> Tensor:
        # x: (S, N, dim); mask: (S, N, N) boolean, True where attention is allowed
        s, n, _ = x.shape
        x = self.norm(x)
        inner = self.heads * self.dim_head
        p = self.dropout_p if self.training else 0.0
        if self_only:
            # softmax over a single key is exactly 1: the output is the value itself, no N x N
            v = F.linear(x, self.to_qkv.weight[2 * inner:])
            if p > 0:  # attention dropout of the lone weight drops a whole head
                keep = torch.ones(s, n, self.heads, 1, dtype=v.dtype, device=v.device)
                v = (v.view(s, n, self.heads, self.dim_head) * F.dropout(keep, p)).view(s, n, inner)
            return self.to_out(v)
        q, k, v = self.to_qkv(x).view(s, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.to_out(out.transpose(1, 2).reshape(s, n, inner))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, dim), nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = _Attention(dim, heads, dim_head, dropout)
        self.ff = _FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: Tensor, mask: Tensor | None, self_only: bool) -> Tensor:
        x = x + self.attn(x, mask, self_only)
        return x + self.ff(x)


class SpotEncoder(nn.Module):
    """Encode spots from their expression and grid position (mclSTExp's spot branch).

    Each spot's token is its normalised expression plus learned ``x`` and ``y`` position
    embeddings (of dimension ``n_genes``); ``depth`` pre-LayerNorm transformer blocks then let
    the spots of a *set* attend to each other, and a :class:`ProjectionHead` maps the result to
    ``out_dim``. In mclSTExp the set is the mini-batch (128 random training spots), so an
    embedding depends on its batch-mates; ``context`` restricts attention to spots of the same
    group, or to the spot itself, which makes embeddings reproducible.

    Parameters
    ----------
    n_genes
        Number of genes ``G`` (the token dimension).
    n_x, n_y
        Sizes of the position tables: positions must lie in ``[0, n_x)`` and ``[0, n_y)``.
        Size them from the data (mclSTExp allocates 65,536 rows each). ``None`` for both
        disables position embeddings (then call with ``pos=None``).
    depth
        Number of transformer blocks.
    heads, dim_head
        Attention heads and their width (inner dimension ``heads * dim_head``).
    mlp_dim
        Hidden width of the blocks' MLP; ``None``: ``n_genes`` (as mclSTExp).
    dropout
        Dropout inside the transformer (0 in mclSTExp).
    out_dim
        Output dimension of the projection head.
    head_dropout
        Dropout on the residual branch of the projection head: 0.1 is this package's default;
        the original mclSTExp builds its heads without dropout (its ``ProjectionHead`` default, 0).
    chunk_size
        With group ids, groups are packed into sets of at most this many spots (a larger group
        forms one set on its own), so memory stays bounded by ``chunk_size**2`` per set.

    Examples
    --------
    >>> import torch
    >>> enc = SpotEncoder(n_genes=50, n_x=30, n_y=30)
    >>> expr, pos = torch.rand(10, 50), torch.randint(0, 30, (10, 2))
    >>> enc(expr, pos).shape
    torch.Size([10, 256])
    >>> enc.eval()(expr, pos, context="self").shape  # independent of batch-mates
    torch.Size([10, 256])
    """

    def __init__(self, n_genes: int, n_x: int | None, n_y: int | None, depth: int = 2,
                 heads: int = 8, dim_head: int = 64, mlp_dim: int | None = None,
                 dropout: float = 0.0, out_dim: int = 256, head_dropout: float = 0.1,
                 chunk_size: int = 2048) -> None:
        super().__init__()
        mlp_dim = n_genes if mlp_dim is None else mlp_dim
        for name, value in (("n_genes", n_genes), ("depth", depth), ("heads", heads),
                            ("dim_head", dim_head), ("mlp_dim", mlp_dim), ("out_dim", out_dim),
                            ("chunk_size", chunk_size)):
            check_positive_int(value, name, allow_zero=name == "depth")
        if (n_x is None) != (n_y is None):
            raise ValueError(f"`n_x` and `n_y` must both be set or both be None, got {n_x!r}, {n_y!r}.")
        if n_x is not None:
            check_positive_int(n_x, "n_x")
            check_positive_int(n_y, "n_y")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
        self.n_genes, self.n_x, self.n_y = int(n_genes), n_x, n_y
        self._config = {
            "n_genes": int(n_genes), "n_x": None if n_x is None else int(n_x),
            "n_y": None if n_y is None else int(n_y), "depth": int(depth), "heads": int(heads),
            "dim_head": int(dim_head), "mlp_dim": int(mlp_dim), "dropout": float(dropout),
            "out_dim": int(out_dim), "head_dropout": float(head_dropout),
            "chunk_size": int(chunk_size),
        }
        self.chunk_size = int(chunk_size)
        if n_x is not None:
            self.x_embed = nn.Embedding(int(n_x), n_genes)
            self.y_embed = nn.Embedding(int(n_y), n_genes)
        else:
            self.x_embed = self.y_embed = None
        self.blocks = nn.ModuleList(
            _Block(n_genes, heads, dim_head, mlp_dim, dropout) for _ in range(depth)
        )
        self.head = ProjectionHead(n_genes, out_dim, head_dropout)

    def config(self) -> dict[str, int | float | None]:
        """Constructor arguments, JSON-able (for saving next to a safetensors file)."""
        return dict(self._config)

    def tokens(self, expr: Tensor, pos: Tensor | None) -> Tensor:
        """Expression plus position embeddings, ``(N, n_genes)``."""
        if not isinstance(expr, Tensor) or expr.ndim != 2 or expr.shape[1] != self.n_genes:
            shape = tuple(expr.shape) if isinstance(expr, Tensor) else type(expr).__name__
            raise ValueError(f"`expr` must be a tensor of shape (N, {self.n_genes}), got {shape}.")
        if self.x_embed is None:
            if pos is not None:
                raise ValueError("`pos` must be None: this encoder has no position embeddings "
                                 "(it was built with n_x=None).")
            return expr
        if pos is None:
            raise ValueError("`pos` is required: this encoder has position embeddings.")
        if not isinstance(pos, Tensor) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
            raise ValueError("`pos` must be an integer tensor of shape (N, 2).")
        if pos.shape != (expr.shape[0], 2):
            raise ValueError(f"`pos` must have shape ({expr.shape[0]}, 2), got {tuple(pos.shape)}.")
        x, y = pos[:, 0].long(), pos[:, 1].long()
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.n_x
                          or int(y.min()) < 0 or int(y.max()) >= self.n_y):
            raise ValueError(
                f"`pos` must lie in [0, {self.n_x}) x [0, {self.n_y}) (the position tables' "
                f"sizes), got x in [{int(x.min())}, {int(x.max())}], "
                f"y in [{int(y.min())}, {int(y.max())}]."
            )
        return expr + self.x_embed(x) + self.y_embed(y)

    def forward(self, expr: Tensor, pos: Tensor | None = None,
                context: Tensor | str | None = None) -> Tensor:
        """Embed spots.

        Parameters
        ----------
        expr
            Normalised expression, ``(N, n_genes)``.
        pos
            Integer grid positions ``(N, 2)`` (x, y); ``None`` when built with ``n_x=None``.
        context
            Which spots attend to which: ``None``: all ``N`` spots of the call attend to each
            other (mclSTExp; the embedding depends on the call's other spots); an integer
            tensor ``(N,)`` of group ids: only spots of the same group; ``"self"``: each spot
            only to itself (the same as all-distinct group ids), so each embedding depends on
            that spot alone.

        Returns
        -------
        Embeddings, ``(N, out_dim)``.
        """
        x = self.tokens(expr, pos)
        n = x.shape[0]
        if isinstance(context, str):
            if context != _SELF:
                raise ValueError(f"`context` must be None, 'self' or a tensor of group ids, "
                                 f"got {context!r}.")
            return self.head(self._blocks(x[None], None, True)[0])
        if context is None or n == 0:
            return self.head(self._blocks(x[None], None, False)[0])
        return self.head(self._grouped(x, context))

    def _blocks(self, x: Tensor, mask: Tensor | None, self_only: bool) -> Tensor:
        for block in self.blocks:
            x = block(x, mask, self_only)
        return x

    def _grouped(self, x: Tensor, context: Tensor) -> Tensor:
        n = x.shape[0]
        if (not isinstance(context, Tensor) or context.shape != (n,)
                or context.dtype.is_floating_point):
            raise ValueError(f"`context` must be None, 'self' or an integer tensor of shape ({n},).")
        ids = context.to(x.device).long()
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        counts = counts.tolist()
        if max(counts) == 1:  # all distinct: each spot alone
            return self._blocks(x[None], None, True)[0]
        parts = []
        # pack consecutive groups into sets of at most chunk_size spots; sets never split a group
        start, k = 0, 0
        while start < n:
            end = start + counts[k]
            k += 1
            while k < len(counts) and end + counts[k] - start <= self.chunk_size:
                end += counts[k]
                k += 1
            sub = x[order[start:end]][None]
            sub_ids = sorted_ids[start:end]
            mask = sub_ids[:, None] == sub_ids[None, :]
            parts.append(self._blocks(sub, None if bool(mask.all()) else mask[None], False)[0])
            start = end
        # back from group order to the caller's order
        return torch.cat(parts)[torch.argsort(order)]
