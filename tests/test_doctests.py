"""The docstring examples run and give what they show.

Examples that need data, a GPU, a download or minutes of training carry ``# doctest: +SKIP``;
every other example of every module of sq_spade runs here, with ``sqs`` (the package) and
``np`` in scope, as the API pages show them.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import numpy as np
import pytest

import sq_spade as sqs

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    out, seen = [], set()
    for info in pkgutil.walk_packages(sqs.__path__, prefix="sq_spade."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for test in finder.find(module, extraglobs={"sqs": sqs, "np": np}):
            runnable = [ex for ex in test.examples if not ex.options.get(doctest.SKIP)]
            if runnable and test.name not in seen:
                seen.add(test.name)
                out.append(test)
    return sorted(out, key=lambda t: t.name)


TESTS = _tests()


def test_the_examples_are_found():
    assert len(TESTS) >= 20
    assert "sq_spade.nn.retrieval.retrieve_predict" in {t.name for t in TESTS}


@pytest.mark.parametrize("test", TESTS, ids=[t.name for t in TESTS])
def test_docstring_example(test, tmp_path, monkeypatch, no_progress):
    from sq_spade.nn.backbones import _registry

    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setattr(_registry, "BACKBONES", dict(_registry.BACKBONES))  # examples that register leave no trace
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)
