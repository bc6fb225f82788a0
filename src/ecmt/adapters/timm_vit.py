"""timm VisionTransformer family (ViT, DeiT, DeiT distilled)."""
from __future__ import annotations

from typing import Optional

from timm.layers import DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from ..errors import ConversionError
from ..layers import SpikingAttention
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

register_container(VisionTransformer, VisionTransformerDistilled, check=check_vit)
register_container(Block, ResPostBlock, Mlp)
register_linear_leaf(LayerScale, DropPath, PatchDropout)
register_analog_input(PatchEmbed)
