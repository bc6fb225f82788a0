"""Reference models shipped with ECMT.

``fmnist_vit`` is a small timm ``VisionTransformer`` trained on Fashion-MNIST
by :mod:`ecmt.zoo.train_fmnist`. Each model ``<name>`` consists of

* ``<name>.safetensors`` -- fp32 weights (a timm ``state_dict``);
* ``<name>.json`` -- the ``VisionTransformer`` keyword arguments
  (``"model_kwargs"``), the preprocessing (``"mean"``, ``"std"``,
  ``"input_size"``), the dataset name and the test accuracy;
* ``<name>_metrics.json`` and ``<name>_train.log`` -- training provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["ZOO_DIR", "load_model_config", "load_reference_model"]

#: Directory that holds the reference model files.
ZOO_DIR = Path(__file__).resolve().parent


def load_model_config(name: str = "fmnist_vit", root: str | Path | None = None) -> dict:
    """Reads the JSON config of a reference model.

    Args:
        name: Model name (file stem), e.g. ``"fmnist_vit"``.
        root: Directory holding the files; defaults to :data:`ZOO_DIR`.

    Returns:
        The parsed config dictionary.
    """
    root = Path(root) if root is not None else ZOO_DIR
    with open(root / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def load_reference_model(
    name: str = "fmnist_vit", root: str | Path | None = None
) -> tuple[torch.nn.Module, dict]:
    """Builds a reference model and loads its weights.

    Args:
        name: Model name (file stem), e.g. ``"fmnist_vit"``.
        root: Directory holding the files; defaults to :data:`ZOO_DIR`.

    Returns:
        ``(model, config)``: the model in eval mode and its config dictionary.
    """
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    root = Path(root) if root is not None else ZOO_DIR
    config = load_model_config(name, root)
    model = VisionTransformer(**config["model_kwargs"])
    model.load_state_dict(load_file(str(root / f"{name}.safetensors")))
    return model.eval(), config
