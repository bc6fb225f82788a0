"""Model-family adapters. Each module registers one family's types with :mod:`ecmt.registry`.

The timm families load with the package. The HuggingFace family loads, by
:func:`load_optional`, only once ``transformers`` has been imported: a model of that family
cannot exist before, and importing ``transformers`` costs seconds that image users should not pay.
"""
import importlib
import sys

from torch import nn

from ..registry import register_container

register_container(nn.Sequential, nn.ModuleList, nn.ModuleDict)

from . import timm_vit, timm_eva  # noqa: E402,F401



def load_optional() -> None:
    """Register the families whose library the process has imported (HuggingFace transformers)."""
    if "transformers" in sys.modules:
        importlib.import_module(f"{__name__}.hf_bert")
