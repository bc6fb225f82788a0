"""The README's Python API snippets run as they stand (issue 19)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def api_snippets() -> list[str]:
    """The Python blocks of the README's "Python API" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_api_section_has_the_reference_timm_and_transformers_examples():
    snippets = api_snippets()
    assert len(snippets) == 3
    assert "load_model(\"fmnist-vit\")" in snippets[0] and "open_dataset(" in snippets[0]
    assert "timm.create_model" in snippets[1] and "BertModel" in snippets[2]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["reference", "timm", "transformers"])
def test_api_snippet_runs(index):
    if index == 0:
        from ecmt.data import candidate_roots, find_idx_file

        if find_idx_file(candidate_roots("fashion-mnist"), "t10k-images-idx3-ubyte") is None:
            pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {}
        exec(compile(api_snippets()[index], f"README.md (Python API, snippet {index + 1})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    if index == 0:
        accuracy = namespace["accuracy"]
        assert accuracy.shape == (4,) and float(accuracy[-1]) > 0.5  # the trained reference model
        assert namespace["thresholds"].rule.value == "nearest"
    elif index == 1:
        assert namespace["logits"].shape == (2, 2, 1000)
    else:
        assert namespace["hidden"].shape == (2, 4, 12, 64)
