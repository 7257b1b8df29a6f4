"""sq_spade.nn.backbones._weights: safe loading (no unpickling), wrappers, key maps, mismatch reports."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sq_spade.nn.backbones import get_backbone, load_state_dict_safely


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

