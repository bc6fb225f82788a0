"""Model-family adapters. Each module registers one family's types with :mod:`ecmt.registry`.

Families whose library is not installed are skipped.
"""
from torch import nn

from ..registry import register_container

register_container(nn.Sequential, nn.ModuleList, nn.ModuleDict)

from . import timm_vit, timm_eva  # noqa: E402,F401

try:  # optional: HuggingFace transformers
    from . import hf_bert  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pass
