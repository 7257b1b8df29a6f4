"""Shared fixtures: real data from ../shared/data (fail under CI, skip elsewhere), synthetic sections."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SQ_SPADE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
os.environ.setdefault("SQ_SPADE_DATA_DIR", str(DATA_DIR))
# features of real sections are computed once per machine and shared by tests and tutorials
# (the cache key is a hash of the patches' pixels and the weights, so it cannot go stale)
os.environ.setdefault("SQ_SPADE_CACHE_DIR", str(ROOT / ".cache" / "features"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

import sq_spade as sqs  # noqa: E402

sqs.settings.progress = False
sqs.settings.data_dir = DATA_DIR
sqs.settings.cache_dir = Path(os.environ["SQ_SPADE_CACHE_DIR"])


#: the test running now (set by the autouse fixture below), so that data access can check its marker
_CURRENT: dict[str, object] = {}
#: fixtures that read the data folder: a test using one needs ``@pytest.mark.realdata``
DATA_FIXTURES = ("her2st_section", "mob_section", "lite0_features")


@pytest.fixture(autouse=True)
def _current_test(request):
    _CURRENT["node"] = request.node
    yield
    _CURRENT.pop("node", None)


def _check_marked() -> None:
    node = _CURRENT.get("node")
    if node is not None and node.get_closest_marker("realdata") is None:
        pytest.fail(f"{node.nodeid} reads the data folder but lacks @pytest.mark.realdata "
                    "(so `-m 'not realdata'` would not deselect it).", pytrace=False)


def pytest_collection_modifyitems(config, items):
    """A test using a data fixture without the realdata marker fails (it is not silently run or skipped)."""
    for item in items:
        uses = sorted(set(getattr(item, "fixturenames", ())) & set(DATA_FIXTURES))
        if uses and item.get_closest_marker("realdata") is None:
            msg = f"uses {uses} (the data folder) but lacks @pytest.mark.realdata"
            item.add_marker(pytest.mark.usefixtures("_unmarked_realdata"))
            item.user_properties.append(("unmarked_realdata", msg))


@pytest.fixture
def _unmarked_realdata(request):
    msg = dict(request.node.user_properties).get("unmarked_realdata", "")
    pytest.fail(f"{request.node.nodeid} {msg}.", pytrace=False)


def require_data(*relpaths: str) -> Path:
    """Path of the data folder, failing under CI (skipping elsewhere) when a file is missing.

    The calling test must carry ``@pytest.mark.realdata`` (checked here and at collection).
    """
    _check_marked()
    missing = [p for p in relpaths if not (DATA_DIR / p).exists()]
    if missing:
        msg = f"real data missing under {DATA_DIR}: {missing} (set SQ_SPADE_DATA_DIR)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return DATA_DIR


HER2ST_FILES = {
    s: [f"her2st/data/ST-cnts/{s}.tsv.gz", f"her2st/data/ST-spotfiles/{s}_selection.tsv"]
    for s in ("A1", "A2", "B4", "C2", "C3", "C4")
}


@pytest.fixture(scope="session")
def her2st_section():
    """Factory reading (and caching) her2st sections from the shared data folder."""
    cache: dict[str, object] = {}

    def get(section: str):
        require_data(*HER2ST_FILES[section])
        if section not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                cache[section] = sqs.datasets.her2st(section)
        return cache[section]

    return get


@pytest.fixture(scope="session")
def mob_section():
    cache: dict[str, object] = {}

    def get(section: str):
        require_data(f"stutility/inst/extdata/counts/{section}.tsv")
        if section not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                cache[section] = sqs.datasets.stutility_mob(section)
        return cache[section]

    return get


@pytest.fixture
def synth():
    return sqs.datasets.synthetic_section()


@pytest.fixture(scope="session")
def lite0_features(her2st_section, mob_section):
    """Lite0 features (default patches) of a real section, computed once per test session."""
    cache: dict[str, object] = {}

    def get(section: str):
        if section not in cache:
            sd = mob_section(section) if section.startswith("MOB") else her2st_section(section)
            t = sd.tables["table"]
            if "X_efficientnet_lite0" not in t.obsm:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    sqs.pp.compute_features(sd, backbone="efficientnet_lite0")
            cache[section] = t.obsm["X_efficientnet_lite0"]
        return cache[section]

    return get


@pytest.fixture
def no_progress():
    """Progress bars off for the test, restored after."""
    from sq_spade import settings

    old = settings.progress
    settings.progress = False
    yield
    settings.progress = old


def write_signed(config_path, doc) -> None:
    """Write an edited model ``config.json`` re-signed as a writer would sign it.

    Format 2 folders record the config's sha256 in the config and in the tensors file, so a
    plain edit is refused as such; tests of the checks behind that one (a crafted file whose
    signatures were recomputed) write their edits with this.
    """
    import hashlib
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from sq_spade._files import TENSORS_PATTERN, config_digest

    config_path = Path(config_path)
    doc = dict(doc)
    if "config_sha256" in doc:
        doc["config_sha256"] = config_digest(doc)
        name = doc.get("tensors_file")
        ten = config_path.parent / str(name)
        if isinstance(name, str) and TENSORS_PATTERN.match(name) and ten.is_file():
            save_file(load_file(str(ten)), str(ten), metadata={"config_sha256": doc["config_sha256"]})
            doc["tensors_sha256"] = hashlib.sha256(ten.read_bytes()).hexdigest()
    config_path.write_text(json.dumps(doc))


def colour_feature_sections(n: int = 3, size: int = 8):
    """Synthetic sections whose fake features (mean patch colour + noise, ``obsm['X_fake']``) and
    counts share a hidden tissue type: a learnable image-expression link for accuracy tests."""
    import numpy as np

    import sq_spade as sqs

    sd = sqs.io.combine_sections([sqs.datasets.synthetic_section(section=f"s{i}", seed=i, n_rows=size, n_cols=size,
                                                                  patient=f"p{i}") for i in range(n)])
    t = sd.tables["table"]
    p = sqs.pp.patches(sd, patch_size_um=30, microns_per_pixel=1.0)
    rng = np.random.default_rng(0)
    colour = np.stack([p[i].reshape(-1, 3).mean(0) for i in range(len(p))]) / 255
    t.obsm["X_fake"] = np.hstack([colour, rng.normal(0, 0.05, (len(p), 5))]).astype(np.float32)
    return sd
