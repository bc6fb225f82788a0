"""Small random-initialized models of every supported configuration, shared by the tests."""
from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

BASE = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)

CONFIGS = {
    "class_token": (VisionTransformer, {}),
    "avg_pool": (VisionTransformer, dict(class_token=False, global_pool="avg")),
    "registers": (VisionTransformer, dict(reg_tokens=2)),
    "no_qkv_bias_layer_scale": (VisionTransformer, dict(qkv_bias=False, init_values=0.5)),
    "qk_norm": (VisionTransformer, dict(qk_norm=True)),
    "rectangular_deeper": (VisionTransformer, dict(img_size=(16, 24), patch_size=(4, 8), depth=3, num_heads=4)),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "eva01": (Eva, dict(qkv_bias=True, use_rot_pos_emb=False)),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build configuration ``name`` with weights large enough to make every site matter.

    timm's default initialisation (std 0.02) leaves a random ViT nearly constant; unit-gain
    weights and random biases and tokens give activations of order one everywhere.
    """
    cls, kw = CONFIGS[name]
    torch.manual_seed(seed)
    model = cls(**{**BASE, **kw}).eval()
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=mod.in_features ** -0.5)
            if mod.bias is not None:
                nn.init.normal_(mod.bias, std=0.1)
    for n, p in model.named_parameters():
        if any(k in n for k in ("q_bias", "v_bias", "token", "pos_embed")):
            nn.init.normal_(p, std=0.5)
    size = kw.get("img_size", BASE["img_size"])
    size = (size, size) if isinstance(size, int) else size
    return model, (3, *size)
