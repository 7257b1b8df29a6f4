"""Which parameters of an image encoder train: ``finetune="none"``, ``"last"``, ``"all"`` or prefixes.

One meaning of ``"last"`` for the whole package: the encoder's last *block*
(:func:`last_block_prefixes`), the same whether :func:`sq_spade.tl.train_contrastive` or
:func:`sq_spade.train.fit_contrastive` is asked, and whether the network comes wrapped in a
registry :class:`~sq_spade.nn.backbones.Backbone` or bare.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from sq_spade import _constants as K
from sq_spade._validation import check_choice


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def last_block_prefixes(encoder: nn.Module) -> list[str]:
    """Parameter-name prefixes of an encoder's last block (what ``finetune="last"`` trains).

    Wrappers with a single child holding parameters are descended (a registry backbone wraps
    its network in ``.model``); at the first level with several, the last element of the last
    container of blocks (``Sequential`` / ``ModuleList`` / ``ModuleDict``) and every child with
    parameters after it are chosen: EfficientNet's last stage + ``conv_head`` + ``bn2``, ResNet's
    ``layer4[-1]``, DenseNet's last dense layer + ``norm5``, a ViT's last block + final norm.
    Without such a container, the last child with parameters. ``[""]`` (every parameter) when no
    child holds parameters.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.LayerNorm(4))
    >>> last_block_prefixes(net)
    ['1.1.', '2.']
    """
    prefix, m = "", encoder
    while True:
        kids = [(n, c) for n, c in m.named_children() if _has_params(c)]
        if len(kids) == 1 and not any(True for _ in m.parameters(recurse=False)):
            prefix, m = f"{prefix}{kids[0][0]}.", kids[0][1]
            continue
        break
    if not kids:
        return [prefix]
    containers = [i for i, (_, c) in enumerate(kids) if isinstance(c, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
                  and sum(_has_params(g) for g in c.children()) >= 2]
    if not containers:
        return [f"{prefix}{kids[-1][0]}."]
    i = containers[-1]
    name, cont = kids[i]
    sub = [n for n, g in cont.named_children() if _has_params(g)][-1]
    return [f"{prefix}{name}.{sub}."] + [f"{prefix}{n}." for n, _ in kids[i + 1:]]


def finetune_prefixes(encoder: nn.Module, finetune: K.Finetune | Sequence[str]) -> K.Finetune | list[str]:
    """``finetune`` with ``"last"`` spelt out as the prefixes of :func:`last_block_prefixes`.

    ``"none"``, ``"all"`` and explicit prefixes are returned as they are; ``"last"`` on an
    encoder without parameters stays ``"last"``.
    """
    if isinstance(finetune, str) and finetune == "last" and _has_params(encoder):
        return last_block_prefixes(encoder)
    return finetune if isinstance(finetune, str) else list(finetune)


def select_finetune(encoder: nn.Module, finetune: K.Finetune | Sequence[str], quiet: bool = False,
                    ) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """Parameters to train and the modules to put in train mode.

    Parameters
    ----------
    encoder
        The image encoder.
    finetune
        ``"all"``, ``"last"`` (:func:`last_block_prefixes`), ``"none"``, or parameter-name
        prefixes.
    quiet
        Do not warn when ``"last"`` finds no block (then every parameter trains).
    """
    if isinstance(finetune, str):
        check_choice(finetune, "finetune", K.FINETUNES)
        if finetune == "all":
            return list(encoder.parameters()), [encoder]
        if finetune == "none":
            return [], []
        prefixes = last_block_prefixes(encoder)
        if prefixes == [""]:  # no child holds parameters: the whole encoder is its last block
            if not quiet:
                warnings.warn("finetune='last': the encoder has no child with parameters; "
                              "training all its parameters.", UserWarning, stacklevel=3)
            return list(encoder.parameters()), [encoder]
        finetune = prefixes
    prefixes = list(finetune)
    if not prefixes or not all(isinstance(p, str) for p in prefixes):
        raise ValueError("`finetune` must be 'all', 'last', 'none' or a non-empty sequence of "
                         "parameter-name prefixes.")
    chosen = [p for name, p in encoder.named_parameters()
              if any(name.startswith(pre) for pre in prefixes)]
    if not chosen:
        raise ValueError(f"`finetune` prefixes {prefixes} match no parameter of the encoder.")
    mods = [m for name, m in encoder.named_modules()
            if name and any(name == pre.rstrip(".") for pre in prefixes)]
    return chosen, mods
