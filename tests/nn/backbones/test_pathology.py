"""sq_spade.nn.backbones.pathology: UNI, Virchow2, CONCH (gated weights: random weights and tiny twins here)."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from sq_spade._utils import sha256_file
from sq_spade.nn.backbones import (
    BACKBONES,
    OPENAI_CLIP_MEAN,
    ConchVisionTower,
    WeightsUnavailableError,
    get_backbone,
)
from sq_spade.nn.backbones import pathology as P

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}


@pytest.mark.parametrize(("build", "size", "dim", "n_params"), [
    (P._build_uni, 224, 1024, (300e6, 306e6)),
    (P._build_virchow2, 224, 2560, (628e6, 634e6)),
    (ConchVisionTower, 448, 512, (85e6, 92e6)),
])
def test_full_size_vits_on_meta_device(build, size, dim, n_params):
    """Real architectures, built without memory or compute on the meta device."""
    with torch.device("meta"):
        model = build()
        out = model(torch.zeros(2, 3, size, size))
        small = model(torch.zeros(1, 3, 112, 112))  # dynamic image size
    assert tuple(out.shape) == (2, dim) and tuple(small.shape) == (1, dim)
    n = sum(p.numel() for p in model.parameters())
    assert n_params[0] < n < n_params[1]


def test_registered_vit_specs():
    assert (BACKBONES["uni"].dim, BACKBONES["uni"].input_size) == (1024, 224)
    assert (BACKBONES["virchow2"].dim, BACKBONES["virchow2"].input_size) == (2560, 224)
    conch = BACKBONES["conch"]
    assert (conch.dim, conch.input_size, conch.mean) == (512, 448, OPENAI_CLIP_MEAN)


def test_uni_key_mapping_roundtrip(tmp_path):
    torch.manual_seed(0)
    build = lambda: P._build_uni(**TINY, patch_size=8)  # noqa: E731
    ref = build().eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    factory = P._vit_factory("uni", build, "MahmoodLab/UNI", "pytorch_model.bin", None)
    model = factory(path).eval()
    assert model.weights_sha256 == sha256_file(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x))
        assert model(x).shape == (2, 32)
    broken = {k: v for k, v in ref.state_dict().items() if k != "cls_token"}
    torch.save(broken, tmp_path / "broken.bin")
    with pytest.raises(ValueError, match=r"1 missing keys \[cls_token\]"):
        factory(tmp_path / "broken.bin")


def test_virchow2_pooling_excludes_register_tokens(tmp_path):
    torch.manual_seed(0)
    build = lambda: P._build_virchow2(**TINY, patch_size=8)  # noqa: E731
    ref = build().eval()
    assert ref.vit.num_prefix_tokens == 5  # CLS + 4 registers
    path = tmp_path / "virchow2.safetensors"
    save_file({k: v.contiguous() for k, v in ref.vit.state_dict().items()}, str(path))
    model = P._vit_factory("virchow2", build, "paige-ai/Virchow2", "pytorch_model.bin", None,
                           target=lambda m: m.vit)(path).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        tokens = ref.vit.forward_features(x)
        assert tokens.shape == (2, 5 + 16, 32)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1)
        out = model(x)
    assert out.shape == (2, 64)
    torch.testing.assert_close(out, expected)
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1)
    assert (out - with_registers).abs().max() > 1e-3


def test_conch_loads_vision_tower_from_full_checkpoint(tmp_path):
    torch.manual_seed(0)
    build = lambda: ConchVisionTower(**TINY, patch_size=8)  # noqa: E731
    ref = build().eval()
    ckpt = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    ckpt |= {"text.token_embedding.weight": torch.zeros(4, 2), "text_decoder.ln.weight":
             torch.ones(2), "logit_scale": torch.tensor(1.0),
             "visual.attn_pool_caption.query": torch.zeros(3, 2),
             "visual.ln_caption.weight": torch.ones(2)}
    path = tmp_path / "conch.bin"
    torch.save(ckpt, path)
    model = P._vit_factory("conch", build, "MahmoodLab/CONCH", "pytorch_model.bin",
                           P._conch_key)(path).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        out = model(x)
        torch.testing.assert_close(out, ref(x))
        ref.project = False
        torch.testing.assert_close(out, ref(x) @ ref.proj_contrast)
    assert out.shape == (2, 512)


@pytest.mark.parametrize("name", ["uni", "virchow2", "conch"])
def test_gated_weights_error_says_pass_a_file(name, monkeypatch):
    def offline(repo_id, filename):
        raise OSError("offline")

    monkeypatch.setattr(P, "_hf_download", offline)
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="gated") as e:
        get_backbone(name)
    assert "weights=" in str(e.value)
    assert time.perf_counter() - t < 2  # fails before building the ViT


@pytest.mark.slow
def test_uni_random_weights_forward():
    bb = get_backbone("uni", pretrained=False)
    assert bb.weights_sha256 == "random"
    with torch.inference_mode():
        out = bb(torch.rand(1, 3, 112, 112))
    assert out.shape == (1, 1024) and torch.isfinite(out).all()

