import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sq_spade._files import ModelFileError, load_model_files, save_model_files

WRITER = r"""
import sys, numpy as np
from sq_spade._files import save_model_files
path = sys.argv[1]
i = 0
print("ready", flush=True)
while True:
    i += 1
    save_model_files(path, cls="T", config={"n": i}, tensors={"w": np.full((256, 1024), i, np.float32)}, version="x")
"""


def test_roundtrip_and_no_path_outside_the_folder(tmp_path):
    save_model_files(tmp_path / "m", cls="T", config={"n": 3}, tensors={"w": np.ones((2, 2), np.float32)}, version="x")
    cfg, ten = load_model_files(tmp_path / "m", cls="T")
    assert cfg == {"n": 3} and ten["w"].sum() == 4
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc["tensors_file"] = "../outside.safetensors"
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="tensors_file"):
        load_model_files(tmp_path / "m", cls="T")


def test_killed_writer_leaves_a_loadable_model(tmp_path):
    path = tmp_path / "m"
    save_model_files(path, cls="T", config={"n": 0}, tensors={"w": np.zeros((256, 1024), np.float32)}, version="x")
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cfg, ten = load_model_files(path, cls="T")
        # whatever instant the writer died, config and tensors belong together
        assert np.all(ten["w"].numpy() == cfg["n"])


def test_saved_files_follow_the_umask_like_open(tmp_path):
    # mkstemp makes 0600 files: a model saved into a shared folder would be unreadable to the group
    import os

    old = os.umask(0o022)
    try:
        save_model_files(tmp_path / "m", cls="T", config={"n": 1}, tensors={"w": np.ones(2, np.float32)}, version="x")
    finally:
        os.umask(old)
    for f in (tmp_path / "m").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name
