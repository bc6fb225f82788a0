"""timm VisionTransformer family (ViT, DeiT, DeiT distilled)."""
from __future__ import annotations

from typing import Optional

from timm.layers import DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from ..errors import ConversionError
from ..layers import SpikingAttention, SpikingLinear, SpikingMlp, link
from ..registry import (register_analog_input, register_container, register_linear_leaf,
                        register_replacement)

LINEAR_POOLS = ("token", "avg", "")

def check_vit(m: nn.Module) -> Optional[str]:
    """Pooling must be linear in the tokens; attention pooling is not supported."""
    if getattr(m, "attn_pool", None) is not None:
        return "attention pooling (attn_pool) is not supported"
    if getattr(m, "global_pool", "token") not in LINEAR_POOLS:
        return f"global_pool={m.global_pool!r} is nonlinear; use 'token' or 'avg'"
    return None

@register_replacement(Attention)
def spiking_attention(m: Attention, site, convert_child) -> nn.Module:
    """timm ``Attention`` (fused qkv, optional qk_norm and scale_norm) in ECMT form."""
    if getattr(m, "gate", None) is not None:
        raise ConversionError("gated attention is not supported")
    return SpikingAttention(
        convert_child(m.qkv, "qkv"), convert_child(m.proj, "proj"),
        num_heads=m.num_heads, head_dim=m.head_dim, scale=m.scale, make_site=site,
        q_norm=m.q_norm, k_norm=m.k_norm, norm=m.norm,
    )

@register_replacement(Mlp)
def spiking_mlp(m: Mlp, site, convert_child) -> nn.Module:
    """timm ``Mlp`` (Linear layers; dropout is inactive in evaluation)."""
    if not isinstance(m.fc1, nn.Linear):
        raise ConversionError("convolutional MLPs (use_conv=True) are not supported")
    return SpikingMlp(convert_child(m.fc1, "fc1"), convert_child(m.act, "act"), convert_child(m.fc2, "fc2"),
                      norm=convert_child(m.norm, "norm"))


def pre_norm_block(m: nn.Module, site, convert_child) -> nn.Module:
    """A pre-norm block (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``), kept with its own forward.

    Its children are converted in place; each norm's running mean is then handed to the first
    MT neuron after it (:func:`ecmt.layers.link`), as the norm's output reaches nothing else.
    """
    for name, child in list(m.named_children()):
        setattr(m, name, convert_child(child, name))
    if isinstance(m.attn, SpikingAttention) and isinstance(m.attn.qkv, SpikingLinear):
        link(m.norm1, m.attn.qkv.neuron)
    if isinstance(m.mlp, SpikingMlp) and isinstance(m.mlp.fc1, SpikingLinear):
        link(m.norm2, m.mlp.fc1.neuron)
    return m


register_replacement(Block)(pre_norm_block)
register_container(VisionTransformer, VisionTransformerDistilled, check=check_vit)
register_container(ResPostBlock)
register_linear_leaf(LayerScale, DropPath, PatchDropout)
register_analog_input(PatchEmbed)
