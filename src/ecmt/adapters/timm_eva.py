"""timm Eva family, EVA-01 configurations (no rotary embedding, GELU MLP).

EVA-02 features (rotary embeddings, SwiGLU) are not registered, so conversion names them
as unsupported.
"""
from __future__ import annotations

import torch
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from ..errors import ConversionError
from ..layers import SpikingAttention
from ..registry import register_container, register_replacement
from .timm_vit import check_vit, pre_norm_block


def fused_qkv(m: EvaAttention) -> nn.Linear:
    """One Linear computing q, k and v, with EVA's separate q and v biases (k has none)."""
    if m.qkv is not None:
        w = m.qkv.weight
        bias = None if m.q_bias is None else torch.cat((m.q_bias, torch.zeros_like(m.q_bias), m.v_bias))
    else:
        w = torch.cat((m.q_proj.weight, m.k_proj.weight, m.v_proj.weight))
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features, device=w.device, dtype=w.dtype)
                  for p in (m.q_proj, m.k_proj, m.v_proj)]
        bias = None if m.q_proj.bias is None and m.v_proj.bias is None else torch.cat(biases)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


@register_replacement(EvaAttention)
def spiking_eva_attention(m: EvaAttention, site, convert_child) -> nn.Module:
    if getattr(m, "gate", None) is not None:
        raise ConversionError("gated attention is not supported")
    return SpikingAttention(
        convert_child(fused_qkv(m), "qkv"), convert_child(m.proj, "proj"),
        num_heads=m.num_heads, head_dim=m.head_dim, scale=m.scale, make_site=site,
        q_norm=m.q_norm, k_norm=m.k_norm, norm=m.norm,
    )


def check_eva(m: nn.Module):
    if getattr(m, "rope", None) is not None:
        return "rotary position embeddings (EVA-02) are not supported"
    return check_vit(m)


register_container(Eva, check=check_eva)
register_replacement(EvaBlock)(pre_norm_block)
register_container(EvaBlockPostNorm)
