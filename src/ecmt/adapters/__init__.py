"""Model-family adapters. Each module registers one family's types with :mod:`ecmt.registry`.

Families whose library is not installed are skipped.
"""
import importlib.util

from torch import nn

from ..registry import register_container

register_container(nn.Sequential, nn.ModuleList, nn.ModuleDict)

from . import timm_vit, timm_eva  # noqa: E402,F401

if importlib.util.find_spec("transformers") is not None:  # optional: HuggingFace transformers
    from . import hf_bert  # noqa: F401
