import inspect

import pytest

import sq_spade as sqs
from sq_spade._docs import PARAMS, inject_docs


def test_placeholders_become_indented_descriptions():
    @inject_docs
    def f(sdata, *, table_key="table", device=None):
        """Do it.

        Parameters
        ----------
        sdata
            Data.
        %(table_key)s
        %(device)s
        """

    doc = inspect.getdoc(f)
    assert "%(" not in doc
    assert "\ntable_key\n    Table of a SpatialData" in doc and "\ndevice\n    Torch device" in doc


def test_unknown_placeholder_is_refused():
    with pytest.raises(KeyError, match="nope"):
        @inject_docs
        def g():
            """%(nope)s"""


SHARED = [(sqs.tl.train_experts, ["features_key", "seed", "device", "table_key", "key_added", "checkpoints",
                                  "spade_training"]),
          (sqs.tl.train_experts_from_store, ["spade_training", "seed", "device", "checkpoints"]),
          (sqs.tl.embed, ["features_key", "key_added", "table_key", "device"]),
          (sqs.tl.train_contrastive, ["features_key", "seed", "device", "table_key", "key_added", "checkpoints"]),
          (sqs.tl.train_baseline, ["features_key", "device", "table_key"]),
          (sqs.tl.predict_expression, ["device"]),
          (sqs.tl.cross_validate, ["device", "table_key"])]


@pytest.mark.parametrize(("fn", "names"), SHARED, ids=[f.__name__ for f, _ in SHARED])
def test_public_functions_share_the_parameter_texts(fn, names):
    doc = fn.__doc__
    assert "%(" not in doc
    for name in names:
        first_line = PARAMS[name].splitlines()[1].strip()
        assert first_line in doc, f"{fn.__name__}: {name}"
