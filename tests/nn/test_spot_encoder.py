from __future__ import annotations

import numpy as np
import pytest
import torch

from sq_spade.nn.spot_encoder import SpotEncoder

G = 12


def make(**kw):
    torch.manual_seed(0)
    args = {"n_genes": G, "n_x": 7, "n_y": 5, "heads": 2, "dim_head": 4, "out_dim": 8}
    args.update(kw)
    return SpotEncoder(**args).eval()


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, G, generator=g), torch.stack(
        [torch.randint(0, 7, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)], 1)


def test_shapes_and_table_sizes():
    enc = make(mlp_dim=None)
    expr, pos = data(6)
    assert enc(expr, pos).shape == (6, 8)
    assert enc.x_embed.num_embeddings == 7 and enc.y_embed.num_embeddings == 5
    assert enc.x_embed.embedding_dim == G
    assert enc.blocks[0].ff.net[1].out_features == G  # mlp_dim defaults to n_genes
    assert len(enc.blocks) == 2
    assert SpotEncoder(**enc.config()).config() == enc.config()


def test_self_context_independent_of_batch_mates_none_is_not():
    enc = make()
    expr, pos = data(10)
    other_expr, other_pos = data(10, seed=1)
    a_self = enc(expr[:4], pos[:4], context="self")
    b_self = enc(torch.cat([expr[:4], other_expr]), torch.cat([pos[:4], other_pos]),
                 context="self")[:4]
    torch.testing.assert_close(a_self, b_self)
    a_none = enc(expr[:4], pos[:4])
    b_none = enc(torch.cat([expr[:4], other_expr]), torch.cat([pos[:4], other_pos]))[:4]
    assert not torch.allclose(a_none, b_none, atol=1e-4)
    # "self" equals running each spot alone through full attention
    alone = torch.cat([enc(expr[i:i + 1], pos[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(a_self, alone)
    # all-distinct group ids mean the same as "self"
    torch.testing.assert_close(enc(expr, pos, torch.arange(10)), enc(expr, pos, "self"))


def test_group_ids_restrict_attention():
    enc = make()
    expr, pos = data(8)
    ctx = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    out = enc(expr, pos, ctx)
    # each group alone gives the same result
    for gid in range(3):
        sel = ctx == gid
        torch.testing.assert_close(out[sel], enc(expr[sel], pos[sel]))
    changed = expr.clone()
    changed[1] = torch.rand(G) * 3  # a spot of group 1
    out2 = enc(changed, pos, ctx)
    torch.testing.assert_close(out2[ctx == 0], out[ctx == 0])
    assert not torch.allclose(out2[3], out[3], atol=1e-5)  # same group as the changed spot


def test_group_packing_does_not_change_results():
    enc = make()
    expr, pos = data(30)
    ctx = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(3))
    big = enc(expr, pos, ctx)
    enc.chunk_size = 4  # forces several sets, some groups larger than a set
    torch.testing.assert_close(enc(expr, pos, ctx), big, atol=1e-5, rtol=1e-5)


def test_permutation_equivariant_without_context():
    enc = make()
    expr, pos = data(9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(enc(expr[perm], pos[perm]), enc(expr, pos)[perm],
                               atol=1e-5, rtol=1e-5)


def test_position_embeddings_matter():
    enc = make()
    expr, pos = data(5)
    moved = pos.clone()
    moved[:, 0] = (moved[:, 0] + 1) % 7
    assert not torch.allclose(enc(expr, pos, "self"), enc(expr, moved, "self"))


@pytest.mark.parametrize("bad", [[[7, 0]], [[0, 5]], [[-1, 0]]])
def test_out_of_range_positions_raise(bad):
    enc = make()
    with pytest.raises(ValueError, match="pos"):
        enc(torch.rand(1, G), torch.tensor(bad))


def test_no_position_embeddings():
    enc = make(n_x=None, n_y=None)
    assert enc.x_embed is None
    expr, pos = data(3)
    assert enc(expr).shape == (3, 8)
    with pytest.raises(ValueError, match="pos"):
        enc(expr, pos)
    with pytest.raises(ValueError, match="n_y"):
        SpotEncoder(G, 4, None)
    with pytest.raises(ValueError, match="pos"):
        make()(expr, None)


def test_bad_context_and_expr():
    enc = make()
    expr, pos = data(3)
    with pytest.raises(ValueError, match="context"):
        enc(expr, pos, "batch")
    with pytest.raises(ValueError, match="context"):
        enc(expr, pos, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="expr"):
        enc(torch.rand(3, G + 1), pos)


def test_gradients_flow_in_all_modes():
    enc = make()
    enc.train()
    expr, pos = data(6)
    for ctx in (None, "self", torch.tensor([0, 0, 1, 1, 2, 2])):
        enc.zero_grad()
        enc(expr, pos, ctx).sum().backward()
        assert enc.x_embed.weight.grad.abs().sum() > 0
        assert enc.blocks[0].attn.to_qkv.weight.grad.abs().sum() > 0


# --- values: a hand-computed forward pass (depth 1, one head, fixed weights) ---------------------------------------
def _np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _np_forward(p, expr, pos, groups):
    """mclSTExp's spot encoder in numpy: tokens, one pre-LN attention + MLP block, projection head."""
    x = expr + p["x_embed.weight"][pos[:, 0]] + p["y_embed.weight"][pos[:, 1]]
    xn = _np_layer_norm(x, p["blocks.0.attn.norm.weight"], p["blocks.0.attn.norm.bias"])
    qkv = xn @ p["blocks.0.attn.to_qkv.weight"].T
    inner = qkv.shape[1] // 3
    q, k, v = qkv[:, :inner], qkv[:, inner:2 * inner], qkv[:, 2 * inner:]
    s = q @ k.T / np.sqrt(inner)
    s = np.where(groups[:, None] == groups[None, :], s, -np.inf)
    a = np.exp(s - s.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    x = x + (a @ v) @ p["blocks.0.attn.to_out.0.weight"].T + p["blocks.0.attn.to_out.0.bias"]
    h = _np_layer_norm(x, p["blocks.0.ff.net.0.weight"], p["blocks.0.ff.net.0.bias"])
    h = _np_gelu(h @ p["blocks.0.ff.net.1.weight"].T + p["blocks.0.ff.net.1.bias"])
    x = x + h @ p["blocks.0.ff.net.4.weight"].T + p["blocks.0.ff.net.4.bias"]
    h = x @ p["head.projection.weight"].T + p["head.projection.bias"]
    branch = _np_gelu(h) @ p["head.fc.weight"].T + p["head.fc.bias"]
    return _np_layer_norm(h + branch, p["head.layer_norm.weight"], p["head.layer_norm.bias"])


def _fixed_encoder():
    enc = SpotEncoder(n_genes=6, n_x=4, n_y=3, depth=1, heads=1, dim_head=5, mlp_dim=7, out_dim=3).eval()
    rng = np.random.default_rng(42)
    params = {}
    with torch.no_grad():
        for name, t in enc.state_dict().items():
            w = rng.normal(0, 0.5, tuple(t.shape))
            if name.endswith("norm.weight") or name.endswith("net.0.weight") or name.endswith("layer_norm.weight"):
                w = 1 + 0.2 * w  # LayerNorm gains near 1
            params[name] = w
            t.copy_(torch.as_tensor(w, dtype=t.dtype))
    return enc, params


@pytest.mark.parametrize("context", ["all", "groups", "self"])
def test_forward_matches_a_hand_computed_pass(context):

    enc, p = _fixed_encoder()
    rng = np.random.default_rng(1)
    expr = rng.random((5, 6))
    pos = np.array([[0, 0], [3, 2], [1, 1], [2, 0], [3, 1]])
    groups = {"all": np.zeros(5, int), "groups": np.array([0, 1, 0, 1, 1]), "self": np.arange(5)}[context]
    arg = {"all": None, "groups": torch.as_tensor(groups), "self": "self"}[context]
    got = enc(torch.as_tensor(expr, dtype=torch.float32), torch.as_tensor(pos), arg).detach().numpy()
    np.testing.assert_allclose(got, _np_forward(p, expr, pos, groups), atol=2e-5)
