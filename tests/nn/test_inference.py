from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sq_spade.nn.backbones import BACKBONES, get_backbone, register_backbone
from sq_spade.nn.inference import dihedral_transforms, embed_batches


@pytest.fixture
def registry():
    saved = dict(BACKBONES)
    yield BACKBONES
    BACKBONES.clear()
    BACKBONES.update(saved)


@pytest.fixture
def dummy():
    return get_backbone("dummy")


def patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Random, orientation-asymmetric uint8 patches (B, H, W, 3)."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    p[:, : size // 4, : size // 3] = 255  # a bright corner breaks rotational symmetry
    return p


def by_hand(model, p: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(p)).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        return model(x)


class Capture(nn.Module):
    """Records its inputs; features are a 2x2 average pool (12-d)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


def test_shape_dtype_order_and_values(dummy):
    p = patches(5, 32)
    out = embed_batches(dummy, [p[:3], torch.from_numpy(p[3:])], device="cpu", progress=False)
    assert out.shape == (5, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, by_hand(dummy, p).numpy(), atol=1e-6)
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_dataloader_batches_and_read_only_arrays(dummy):
    p = patches(6, 32, seed=1)
    loader = torch.utils.data.DataLoader(torch.from_numpy(p), batch_size=4)
    ro = p.copy()
    ro.setflags(write=False)
    a = embed_batches(dummy, loader, total=len(loader), progress=False)
    b = embed_batches(dummy, [ro], progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_resizes_112_px_patches_for_a_224_model(registry):
    cap = Capture()
    register_backbone("capture", lambda w: cap, dim=12, input_size=224, mean=(0, 0, 0),
                      std=(1, 1, 1))
    bb = get_backbone("capture")
    p = patches(2, 112)
    out = embed_batches(bb, [p], progress=False)
    assert cap.seen[0].shape == (2, 3, 224, 224)
    x = torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255
    up = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(cap.seen[0], up)
    np.testing.assert_allclose(out, F.adaptive_avg_pool2d(up, 2).flatten(1).numpy(), atol=1e-6)
    # patches already at the input size go through untouched
    p2 = patches(1, 224)
    embed_batches(bb, [p2], progress=False)
    torch.testing.assert_close(cap.seen[-1], torch.from_numpy(p2).permute(0, 3, 1, 2) / 255.0)


def test_tta_equals_mean_of_eight_views_by_hand(dummy):
    p = patches(3, 32, seed=2)
    views = [np.rot90(p, k, axes=(1, 2)) for k in range(4)]
    views += [np.rot90(p[:, :, ::-1], k, axes=(1, 2)) for k in range(4)]
    assert len({v.tobytes() for v in views}) == 8  # eight distinct views
    expected = np.mean([by_hand(dummy, v).numpy() for v in views], axis=0)
    tta = embed_batches(dummy, [p], tta=True, progress=False)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    plain = embed_batches(dummy, [p], progress=False)
    assert np.abs(tta - plain).max() > 1e-3  # TTA does change the features
    # the average over the dihedral group is invariant to rotating or flipping the input
    for moved in (np.rot90(p, 1, axes=(1, 2)), p[:, ::-1]):
        np.testing.assert_allclose(embed_batches(dummy, [moved], tta=True, progress=False), tta,
                                   atol=1e-5)


def test_dihedral_transforms_views():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = dihedral_transforms(x)
    assert len(views) == 8 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[4], x.flip(-1))
    assert torch.equal(views[2], x.flip(-1).flip(-2))  # 180 degrees
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    # the 8 views form a group: transforming any view again stays within the set
    keys = {tuple(v.flatten().tolist()) for v in views}
    assert {tuple(v.flatten().tolist()) for v in dihedral_transforms(views[5])} == keys
    rect = dihedral_transforms(torch.zeros(1, 3, 2, 5))
    assert rect[1].shape == (1, 3, 5, 2)
    with pytest.raises(TypeError, match="`x`"):
        dihedral_transforms(np.zeros((4, 4)))


def test_model_put_in_eval_mode_and_amp_ignored_on_cpu(registry):
    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 4))
    register_backbone("drop", lambda w: net, dim=4, input_size=16)
    bb = get_backbone("drop").train()
    p = patches(4, 16)
    a = embed_batches(bb, [p], progress=False, amp=True)
    assert not bb.training
    b = embed_batches(bb, [p], progress=False, amp=False, channels_last=False)
    np.testing.assert_array_equal(a, b)  # no dropout, no reduced precision on CPU


def test_empty_input_gives_zero_rows(dummy):
    out = embed_batches(dummy, [], progress=False)
    assert out.shape == (0, 64) and out.dtype == np.float32


def test_bad_inputs(dummy):
    p = patches(2, 32)
    with pytest.raises(TypeError, match="uint8"):
        embed_batches(dummy, [p.astype(np.float32)], progress=False)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        embed_batches(dummy, [p[..., :2]], progress=False)
    with pytest.raises(ValueError, match="item 1"):
        embed_batches(dummy, [p, p[0]], progress=False)
    with pytest.raises(TypeError, match="wrap it in a list"):
        embed_batches(dummy, p, progress=False)
    with pytest.raises(TypeError, match="input_size"):
        embed_batches(nn.Flatten(), [p], progress=False)
    with pytest.raises(TypeError, match="`model`"):
        embed_batches("dummy", [p], progress=False)


def test_lite0_end_to_end_on_small_patches():
    bb = get_backbone("efficientnet_lite0")
    out = embed_batches(bb, [patches(2, 56)], progress=False)
    assert out.shape == (2, 1280) and np.isfinite(out).all()
    assert np.abs(out[0] - out[1]).max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last_close_to_cpu():
    bb = get_backbone("efficientnet_lite0")
    p = patches(4, 224)
    cpu = embed_batches(bb, [p], device="cpu", progress=False)
    loader = torch.utils.data.DataLoader(torch.from_numpy(p), batch_size=2, pin_memory=True)
    gpu = embed_batches(bb, loader, device="cuda", progress=False)
    fp32 = embed_batches(bb, loader, device="cuda", amp=False, channels_last=False, progress=False)
    assert gpu.dtype == np.float32
    np.testing.assert_allclose(fp32, cpu, atol=1e-3, rtol=1e-3)
    cos = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() > 0.99
