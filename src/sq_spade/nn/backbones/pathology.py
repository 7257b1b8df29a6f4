"""``"uni"``, ``"virchow2"``, ``"conch"``: pathology foundation models with gated weights.

Their weights are gated on Hugging Face: pass a local file, or accept the terms and log in.
The architectures are built with timm (and :class:`ConchVisionTower` for CONCH's image
encoder); a failed fetch raises :class:`~sq_spade.nn.backbones.WeightsUnavailableError` before
any ViT is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sq_spade._utils import sha256_file
from sq_spade.nn.backbones._registry import WeightsArg, register_backbone, tag_weights
from sq_spade.nn.backbones._weights import WeightsUnavailableError, load_into, read_weights_file

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ConchVisionTower"]

#: CONCH's normalisation (OpenAI CLIP's mean / std).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _hf_download(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename)


def _hf_weights_file(name: str, repo_id: str, filename: str) -> Path:
    try:
        return Path(_hf_download(repo_id, filename))
    except Exception as e:  # noqa: BLE001 - gated, offline, not logged in: all mean "pass a file"
        raise WeightsUnavailableError(
            f"could not fetch the weights of {name!r} from Hugging Face ({repo_id}/{filename}: "
            f"{type(e).__name__}). Access to {repo_id} is gated: accept its terms at "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login`), or download "
            f"{filename} and pass it with `get_backbone({name!r}, weights='/path/to/{filename}')`."
        ) from e


def _build_uni(**overrides: Any) -> nn.Module:
    import timm

    kwargs = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
              "dynamic_img_size": True, **overrides}
    return timm.create_model("vit_large_patch16_224", pretrained=False, **kwargs)


class _RegisterViTPool(nn.Module):
    """Virchow's embedding: CLS token concatenated with the mean of the patch tokens.

    The register tokens (timm's prefix tokens after the CLS) are excluded from the mean.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit.forward_features(x)  # (B, 1 + registers + patches, C), final norm
        n_prefix = int(self.vit.num_prefix_tokens)
        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=1)


def _build_virchow2(**overrides: Any) -> nn.Module:
    import timm
    from timm.layers import SwiGLUPacked

    kwargs = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4,
              "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
              "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, **overrides}
    return _RegisterViTPool(timm.create_model("vit_huge_patch14_224", pretrained=False, **kwargs))


class _AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: learned queries attend over LayerNorm'd tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim,
                                          batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class ConchVisionTower(nn.Module):
    """CONCH's image encoder: a ViT-B/16 trunk, attentional pooling and a 512-d projection.

    Mirrors the vision tower of the CONCH CoCa model (``visual.*`` in its checkpoint): timm
    ``vit_base_patch16_224`` at 448 px (``trunk``), a one-query attentional pooler
    (``attn_pool_contrast``), ``ln_contrast`` and the ``proj_contrast`` matrix. The output is
    CONCH's contrastive image embedding before L2 normalisation (``encode_image(...,
    normalize=False)``); with ``project=False`` it stops before ``proj_contrast``
    (``proj_contrast=False``, also 512-d). The captioning pooler is not built.

    Parameters
    ----------
    out_dim
        Embedding dimension (512).
    pooler_heads
        Heads of the attentional pooler (8).
    project
        Apply ``proj_contrast``.
    **trunk_kwargs
        Overrides for the timm trunk (``img_size``, ``embed_dim``, ``depth``, ...).

    Examples
    --------
    >>> tower = ConchVisionTower(embed_dim=32, depth=1, num_heads=2, img_size=32)
    >>> tower(torch.rand(1, 3, 32, 32)).shape
    torch.Size([1, 512])
    """

    def __init__(self, out_dim: int = 512, pooler_heads: int = 8, project: bool = True,
                 **trunk_kwargs: Any) -> None:
        super().__init__()
        import timm

        kwargs = {"img_size": 448, "num_classes": 0, "dynamic_img_size": True, **trunk_kwargs}
        self.trunk = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
        width = int(self.trunk.num_features)
        self.attn_pool_contrast = _AttentionalPooler(out_dim, width, pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(out_dim)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(out_dim, out_dim))
        self.project = project

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        pooled = self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])
        return pooled @ self.proj_contrast if self.project else pooled


def _conch_key(k: str) -> str | None:
    """CONCH checkpoint keys -> :class:`ConchVisionTower` (text and captioning parts dropped)."""
    if k.startswith(("text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption.",
                     "visual.ln_caption.", "attn_pool_caption.", "ln_caption.")):
        return None
    return k.removeprefix("visual.")


def _vit_factory(name: str, build: Callable[[], nn.Module], repo_id: str, filename: str,
                 key_map: Callable[[str], str | None] | None,
                 target: Callable[[nn.Module], nn.Module] = lambda m: m) -> Callable[..., nn.Module]:
    def factory(weights: WeightsArg = None, pretrained: bool = True) -> nn.Module:
        if weights is None and not pretrained:
            return tag_weights(build(), "random")
        # find the file before building: a failed fetch should not cost a ViT-L/H construction
        path = Path(weights) if weights is not None else _hf_weights_file(name, repo_id, filename)
        model = build()
        load_into(target(model), read_weights_file(path), source=path.name, key_map=key_map,
                   strict=True)
        return tag_weights(model, sha256_file(path))

    factory.__name__ = f"{name}_factory"
    return factory


_GATED = "CC-BY-NC-ND-4.0 (gated; academic, non-commercial use)"

register_backbone("uni", _vit_factory("uni", _build_uni, "MahmoodLab/UNI", "pytorch_model.bin",
                                      None),
                  dim=1024, weights_source="local file; else hf-hub:MahmoodLab/UNI (gated)",
                  license=_GATED)
register_backbone("virchow2", _vit_factory("virchow2", _build_virchow2, "paige-ai/Virchow2",
                                           "pytorch_model.bin", None, target=lambda m: m.vit),
                  dim=2560, weights_source="local file; else hf-hub:paige-ai/Virchow2 (gated)",
                  license=_GATED)
register_backbone("conch", _vit_factory("conch", ConchVisionTower, "MahmoodLab/CONCH",
                                        "pytorch_model.bin", _conch_key),
                  dim=512, input_size=448, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                  weights_source="local file; else hf-hub:MahmoodLab/CONCH (gated)",
                  license=_GATED)
