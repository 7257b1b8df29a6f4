from __future__ import annotations

import pytest
import torch

from sq_spade.nn.experts import ExpertHeads, MixtureOfExperts, route
from sq_spade.nn.heads import ProjectionHead


def heads_and_stack(e=3, i=6, o=5, dropout=0.0):
    torch.manual_seed(0)
    heads = [ProjectionHead(i, o, dropout) for _ in range(e)]
    for h in heads:  # non-trivial LayerNorm parameters
        torch.nn.init.normal_(h.layer_norm.weight)
        torch.nn.init.normal_(h.layer_norm.bias)
    return heads, ExpertHeads.from_heads(heads)


def test_stacked_equals_independent_heads():
    heads, st = heads_and_stack()
    st.eval()
    x = torch.randn(11, 6)
    ref = torch.stack([h.eval()(x) for h in heads], 1)  # (N, E, O)
    torch.testing.assert_close(st.forward_all(x), ref)
    expert = torch.tensor([0, 2, 1, 1, 0, 2, 2, 2, 0, 1, 0])
    picked = ref[torch.arange(11), expert]
    torch.testing.assert_close(st.forward_assigned(x, expert), picked)
    torch.testing.assert_close(st.forward_assigned(x, expert, method="gather"), picked)
    torch.testing.assert_close(st.forward_assigned(x, 2), ref[:, 2])
    xb = torch.randn(3, 4, 6)
    out = st.forward_stacked(xb)
    for e in range(3):
        torch.testing.assert_close(out[e], heads[e](xb[e]))
        torch.testing.assert_close(st.forward_one(xb[e], e), heads[e](xb[e]))
    sub = st.forward_stacked(xb[:2], torch.tensor([2, 0]))
    torch.testing.assert_close(sub[0], heads[2](xb[0]))
    torch.testing.assert_close(sub[1], heads[0](xb[1]))


def test_stacked_gradients_equal_independent():
    heads, st = heads_and_stack()
    xb = torch.randn(3, 4, 6)
    st.forward_stacked(xb).pow(2).sum().backward()
    for e, h in enumerate(heads):
        h(xb[e]).pow(2).sum().backward()
        torch.testing.assert_close(st.weight1.grad[e], h.projection.weight.grad.T)
        torch.testing.assert_close(st.weight2.grad[e], h.fc.weight.grad.T)
        torch.testing.assert_close(st.ln_weight.grad[e], h.layer_norm.weight.grad)


def test_round_trip_through_heads():
    heads, st = heads_and_stack()
    back = st.to_heads()
    for a, b in zip(heads, back, strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    assert ExpertHeads(**st.config()).config() == st.config()


def test_dropout_and_init():
    torch.manual_seed(0)
    st = ExpertHeads(2, 64, 32, dropout=0.5)
    x = torch.randn(3, 64)
    assert not torch.equal(st.forward_all(x), st.forward_all(x))
    st.eval()
    assert torch.equal(st.forward_all(x), st.forward_all(x))
    # experts start different, with nn.Linear's init bound
    assert not torch.equal(st.weight1[0], st.weight1[1])
    assert st.weight1.abs().max() <= 1 / 8


def naive_route(x, c, f2e, n_experts, t):
    d = torch.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1))
    w = torch.softmax(-d / t, 1)
    return torch.stack([w[:, f2e == e].sum(1) for e in range(n_experts)], 1)


def test_route_matches_definition_and_hard_limit():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(40, 3, generator=g, dtype=torch.float64), \
        torch.randn(9, 3, generator=g, dtype=torch.float64)
    f2e = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    soft = route(x, c, f2e, 5, temperature=0.3)
    torch.testing.assert_close(soft, naive_route(x, c, f2e, 5, 0.3))
    torch.testing.assert_close(soft.sum(1), torch.ones(40, dtype=torch.float64))
    assert torch.all(soft[:, 4] == 0)  # an expert without fine centroid gets nothing
    hard = route(x, c, f2e, 5, hard=True)
    nearest = torch.cdist(x, c).argmin(1)
    torch.testing.assert_close(hard.argmax(1), f2e[nearest])
    assert torch.all(hard.sum(1) == 1)
    # away from (near) ties the soft weights converge to the hard ones as temperature -> 0
    d = torch.cdist(x, c).sort(1).values
    clear = (d[:, 1] - d[:, 0]) > 1e-2
    assert clear.sum() > 30
    torch.testing.assert_close(route(x[clear], c, f2e, 5, temperature=1e-4), hard[clear])
    # euclidean, not squared: with two centroids at distances 1 and 2, w = softmax(-[1, 2] / t)
    w = route(torch.zeros(1, 1), torch.tensor([[1.0], [2.0]]), torch.tensor([0, 1]), 2, 1.0)
    torch.testing.assert_close(w, torch.softmax(-torch.tensor([[1.0, 2.0]]), 1))


def make_moe():
    torch.manual_seed(1)
    img, gene = ExpertHeads(3, 4, 5, 0.0), ExpertHeads(3, 6, 5, 0.0)
    centroids = torch.randn(7, 4) * 2
    f2e = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    return MixtureOfExperts(img, gene, centroids, f2e, temperature=0.5).eval()


def test_mixture_embeddings():
    moe = make_moe()
    x = torch.randn(20, 4)
    w = route(x, moe.centroids, moe.fine_to_expert, 3, 0.5)
    dense = (w[:, :, None] * moe.image_heads.forward_all(x)).sum(1)
    torch.testing.assert_close(moe.embed_images(x), dense)
    torch.testing.assert_close(moe(x), dense)
    ex = moe.fine_to_expert[torch.cdist(x, moe.centroids).argmin(1)]
    torch.testing.assert_close(moe.assign(x), ex)
    hard = moe.embed_images(x, hard=True)
    torch.testing.assert_close(hard, moe.image_heads.forward_all(x)[torch.arange(20), ex])
    torch.testing.assert_close(moe.embed_images(x, temperature=1e-5), hard)
    g = torch.randn(20, 6)
    torch.testing.assert_close(moe.embed_genes(g, ex),
                               moe.gene_heads.forward_all(g)[torch.arange(20), ex])
    # pruning small weights only drops small contributions
    pruned = moe.embed_images(x, min_weight=0.05)
    assert (pruned - dense).abs().max() < 0.05 * 3 * dense.abs().max()


def test_forward_weighted_skips_zero_weights_exactly():
    _, st = heads_and_stack()
    st.eval()
    x = torch.randn(5, 6)
    w = torch.tensor([[1.0, 0, 0], [0.2, 0.8, 0], [0, 0, 1], [0.5, 0, 0.5], [0, 1, 0]])
    ref = (w[:, :, None] * st.forward_all(x)).sum(1)
    torch.testing.assert_close(st.forward_weighted(x, w), ref)


def test_bad_arguments():
    st = ExpertHeads(2, 3, 4)
    with pytest.raises(ValueError, match="expert"):
        st.forward_assigned(torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="x"):
        st.forward_all(torch.randn(2, 4))
    with pytest.raises(ValueError, match="method"):
        st.forward_assigned(torch.randn(2, 3), 0, method="loop")
    with pytest.raises(ValueError, match="n_experts"):
        ExpertHeads(0, 3)
    with pytest.raises(ValueError, match="fine_to_expert"):
        route(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 5]), 3)
    with pytest.raises(ValueError, match="centroids"):
        MixtureOfExperts(st, ExpertHeads(2, 5, 4), torch.randn(3, 2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="gene_heads"):
        MixtureOfExperts(st, ExpertHeads(3, 5, 4), torch.randn(3, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="heads"):
        ExpertHeads.from_heads([])
