from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sq_spade.nn.losses import bleep_loss, clip_loss


def naive_clip(img, spot, tau=1.0):
    """mclSTExp written out: CE with identity targets in both directions, averaged."""
    logits = spot @ img.T / tau
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_bleep(img, spot, tau=1.0):
    """BLEEP's loss written element by element."""
    b = len(img)
    logits = spot @ img.T / tau
    sim = (img @ img.T + spot @ spot.T) / 2 * tau
    total = 0.0
    for i in range(b):
        t_row = torch.softmax(sim[i], 0)
        spots_i = -(t_row * torch.log_softmax(logits[i], 0)).sum()
        t_col = torch.stack([torch.softmax(sim[j], 0)[i] for j in range(b)])
        images_i = -(t_col * torch.log_softmax(logits[:, i], 0)).sum()
        total = total + (spots_i + images_i) / 2
    return total / b


LOSSES = [(clip_loss, naive_clip), (bleep_loss, naive_bleep)]


@pytest.mark.parametrize(("loss", "naive"), LOSSES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_matches_naive_reference(loss, naive, tau):
    g = torch.Generator().manual_seed(1)
    img, spot = torch.randn(7, 5, generator=g, dtype=torch.float64), \
        torch.randn(7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(loss(img, spot, tau), naive(img, spot, tau))


def test_clip_prefers_matched_pairs():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(16, 8, generator=g) * 3
    assert clip_loss(img, img) < clip_loss(img, torch.randn(16, 8, generator=g) * 3)


@pytest.mark.parametrize(("loss", "naive"), LOSSES)
def test_padded_equals_unpadded_with_gradients(loss, naive):
    g = torch.Generator().manual_seed(2)
    img = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    spot = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    padded = loss(img, spot, 1.0, mask)
    padded.backward()
    gi, gs = img.grad.clone(), spot.grad.clone()
    img.grad = spot.grad = None
    unpadded = naive(img[mask], spot[mask])
    unpadded.backward()
    torch.testing.assert_close(padded, unpadded)
    torch.testing.assert_close(gi, img.grad)
    torch.testing.assert_close(gs, spot.grad)
    assert torch.all(gi[~mask] == 0) and torch.all(gs[~mask] == 0)
    # changing padded rows (even to huge values) changes nothing
    img2 = img.detach().clone()
    img2[~mask] = 1e6
    torch.testing.assert_close(loss(img2, spot.detach(), 1.0, mask), unpadded.detach())


@pytest.mark.parametrize("loss", [clip_loss, bleep_loss])
def test_batched_per_expert_losses(loss):
    g = torch.Generator().manual_seed(3)
    e, b, d = 4, 6, 5
    img, spot = torch.randn(e, b, d, generator=g), torch.randn(e, b, d, generator=g)
    counts = [6, 3, 1, 0]
    mask = torch.zeros(e, b, dtype=torch.bool)
    for i, c in enumerate(counts):
        mask[i, :c] = True
    out = loss(img, spot, 1.0, mask)
    assert out.shape == (e,)
    for i, c in enumerate(counts[:3]):
        torch.testing.assert_close(out[i], loss(img[i, :c], spot[i, :c]))
    assert out[3] == 0
    # summing the per-expert losses gives each expert the gradient it would get alone
    img.requires_grad_(True)
    loss(img, spot, 1.0, mask).sum().backward()
    alone = img.detach()[1, :3].clone().requires_grad_(True)
    loss(alone, spot[1, :3]).backward()
    torch.testing.assert_close(img.grad[1, :3], alone.grad)
    assert torch.all(img.grad[3] == 0)


def test_no_mask_batched_equals_loop():
    g = torch.Generator().manual_seed(4)
    img, spot = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    out = bleep_loss(img, spot)
    torch.testing.assert_close(out, torch.stack([bleep_loss(img[i], spot[i]) for i in range(3)]))


def test_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="spot"):
        clip_loss(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="temperature"):
        clip_loss(x, x, 0.0)
    with pytest.raises(ValueError, match="mask"):
        bleep_loss(x, x, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        bleep_loss(x, x, mask=torch.ones(4))
    with pytest.raises(ValueError, match="img"):
        clip_loss(torch.randn(4), torch.randn(4))
