"""The README's quick start is a test: its code block runs verbatim on the real her2st sections."""

from __future__ import annotations

import re
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from tests.conftest import HER2ST_FILES, require_data

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    """The first ``python`` code block of the README."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_the_block_is_the_quick_start():
    code = quick_start()
    assert code.startswith("import sq_spade as sqs")
    for call in ("sqs.tl.train_experts", "sqs.tl.predict_expression", "sqs.tl.evaluate_expression", "sqs.pl.spatial"):
        assert call in code


@pytest.mark.realdata
@pytest.mark.slow
def test_readme_quick_start_runs_verbatim(tmp_path, monkeypatch):
    require_data(*HER2ST_FILES["C2"], *HER2ST_FILES["C3"], *HER2ST_FILES["C4"])
    monkeypatch.chdir(tmp_path)
    plt.close("all")
    ns: dict = {}
    t0 = time.perf_counter()
    exec(compile(quick_start(), str(README), "exec"), ns)  # noqa: S102  (the README, verbatim)
    seconds = time.perf_counter() - t0
    model, query, best = ns["model"], ns["query"], ns["best"]
    # what it promises: predictions in the panel, scored, and a figure of in-panel genes
    assert len(best) == 4 and set(best) <= set(model.panel)
    assert ns["metrics"]["ACG"].iloc[0] > 0.05
    pred = query.tables["predicted"]
    assert pred.X.shape == (query.tables["table"].n_obs, len(model.panel))
    fig = plt.gcf()
    titles = [a.get_title() for a in fig.axes]
    assert all(any(g in t for t in titles) for g in best)
    # one colour scale per panel, said on the colourbars
    assert sum("own scale" in a.get_ylabel() for a in fig.axes) == 2 * len(best)
    fig.savefig(tmp_path / "quick_start.png", dpi=60)  # kept by pytest under its basetemp, to look at
    plt.close("all")
    print(f"README quick start: {seconds:.0f} s")
