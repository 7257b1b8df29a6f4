"""Shared parameter descriptions of the public functions (squidpy's ``_docs.py``, scvi's ``_docstrings.py``).

A numpy-style docstring names a shared parameter with a placeholder on a line of its own,
indented like a parameter name, and the function is decorated with :func:`inject_docs`::

    @inject_docs
    def f(sdata, *, table_key="table"):
        '''Do something.

Parameters
----------
        %(table_key)s
        '''

The placeholder becomes the parameter's name and description, indented to match, so a
parameter is described once for every function that takes it.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: Parameter name(s) and description, numpy style, without indentation.
PARAMS: dict[str, str] = {
    "table_key": """\
table_key
    Table of a SpatialData (default ``"table"``); an AnnData is its own table.""",
    "device": """\
device
    Torch device: ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda[:i]"`` or ``"mps"``;
    ``None``: ``sqs.settings.device``.""",
    "seed": """\
seed
    Seed of every random draw of the call (clustering, initialisation, batching, augmentation);
    ``None``: ``sqs.settings.seed``. The caller's random state is left as it was.""",
    "key_added": """\
key_added
    ``obsm`` key of the embedding written for every spot.""",
    "features_key": """\
features_key
    ``obsm`` key of the frozen backbone features (default ``"X_<backbone>"``). When the key is
    absent from a SpatialData's table, the features are computed with the backbone first (as
    :func:`sq_spade.pp.compute_features` does).""",
    "checkpoints": """\
checkpoint_dir, checkpoint_every, resume
    Checkpoints of the training every ``checkpoint_every`` epochs (and when it ends) into the
    folder ``checkpoint_dir``, each replacing the last atomically; ``resume=True`` continues
    from the checkpoint in ``checkpoint_dir`` when it holds one (else starts fresh), a path
    continues from that folder. On the same device a resumed run ends with exactly the model
    of an uninterrupted one; the data and arguments must be the same (a ValueError says what
    differs). See :class:`sq_spade.train.FitOptions`.""",
    "spade_training": """\
n_fine, n_experts
    Fine centroids per group (16) and experts: ``"auto"`` (default) sizes the mixture to the
    data, one expert per 2,000 training spots (at least 1, at most
    16, the published count); pass ``16`` for the published mixture. Groups with fewer distinct
    spots than ``n_fine`` get one centroid per spot; ``n_experts`` above the number of fine
    centroids is clamped (each centroid its own expert) with a warning, and an expert that
    trains on fewer spots than the rule allows is warned about.
recipe
    ``"small_data"`` (default) or ``"published"``: the defaults of ``epochs``,
    ``temperature`` and ``n_seeds`` (see :func:`sq_spade.tl.train_experts`); arguments given
    explicitly override them.
epochs, batch_size, lr, weight_decay
    Training settings: epochs (``None``: the recipe's; ``"published"``: 100), 128, 1e-3, 1e-2
    (the published code uses ``lr=1e-4``).
loss
    ``"bleep"`` (soft targets, SPADE's) or ``"clip"``.
temperature
    Loss temperature (``None``: 32 in ``"small_data"``, 1 in ``"published"``).
dropout
    Dropout of the heads.
routing_temperature
    Default temperature of soft routing at inference (0.1).
patience
    Stop an expert after this many epochs without validation improvement.""",
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)%\((?P<name>\w+)\)s[ \t]*$", re.MULTILINE)


def inject_docs(fn: F) -> F:
    """Replace the ``%(name)s`` placeholder lines of ``fn``'s docstring by :data:`PARAMS` entries."""
    if fn.__doc__:
        def sub(m: re.Match) -> str:
            name = m.group("name")
            if name not in PARAMS:
                raise KeyError(f"{fn.__qualname__}'s docstring names an unknown shared parameter {name!r}.")
            return textwrap.indent(PARAMS[name], m.group("indent"))

        fn.__doc__ = _PLACEHOLDER.sub(sub, fn.__doc__)
    return fn
