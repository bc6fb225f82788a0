"""Small random-initialised models of every Transformer family the generic graph path converts."""
from __future__ import annotations

from typing import Any, Callable

import torch

VISION = {  # timm name, kwargs of a small configuration
    "vit": ("vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8)),
    "vit_qknorm_avg": ("vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8, qk_norm=True, global_pool="avg",
                                                    class_token=False)),
    "deit": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=32, patch_size=8)),
    "deit3": ("deit3_small_patch16_224", dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=2)),
    "eva01": ("eva_giant_patch14_224", dict(depth=2, img_size=28, patch_size=14, embed_dim=64, num_heads=2)),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=2, img_size=28, patch_size=14)),
    "beit": ("beit_base_patch16_224", dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(2, 2), num_heads=(2, 4), embed_dim=32, img_size=56,
                                                  window_size=7)),
    "cait": ("cait_xxs24_224", dict(depth=2, depth_token_only=1, img_size=32, patch_size=8, embed_dim=64, num_heads=2)),
    "clip": ("vit_base_patch16_clip_quickgelu_224", dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=2)),
    "siglip": ("vit_base_patch16_siglip_224", dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=2)),
    "vit_relpos": ("vit_relpos_small_patch16_224", dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=2)),
    "dinov2": ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=28, embed_dim=64, num_heads=2)),
    "xcit": ("xcit_nano_12_p16_224", dict(depth=2, img_size=32)),
}
"""timm families: name -> (architecture, kwargs)."""


def timm_model(key: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import timm

    name, kwargs = VISION[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    from ecmt.graph import example_input

    x = torch.randn(2, *example_input(model).shape[1:], generator=torch.Generator().manual_seed(1))
    return model, x


def _text(vocab: int = 100, B: int = 2, L: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hf(key: str) -> tuple[torch.nn.Module, Any]:
    import transformers as tr

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    vision = {k: v for k, v in common.items() if k != "vocab_size"}
    makers: dict[str, Callable[[], tuple[torch.nn.Module, Any]]] = {
        "BertModel": lambda: (tr.BertModel(tr.BertConfig(**common)), _text()),
        "RobertaModel": lambda: (tr.RobertaModel(tr.RobertaConfig(**common, pad_token_id=1)), _text()),
        "DistilBertModel": lambda: (tr.DistilBertModel(tr.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                           vocab_size=100)), _text()),
        "MPNetModel": lambda: (tr.MPNetModel(tr.MPNetConfig(**common)), _text()),
        "ViTModel": lambda: (tr.ViTModel(tr.ViTConfig(**vision, image_size=32, patch_size=8)),
                             {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}),
        "Dinov2Model": lambda: (tr.Dinov2Model(tr.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                               image_size=28, patch_size=14)),
                                {"pixel_values": torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))}),
        "LlamaForCausalLM": lambda: (tr.LlamaForCausalLM(tr.LlamaConfig(**common, num_key_value_heads=2)), _text()),
        "GPT2LMHeadModel": lambda: (tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                                     bos_token_id=0, eos_token_id=0)), _text()),
    }
    torch.manual_seed(0)
    model, x = makers[key]()
    return model.eval(), x


HF = ("BertModel", "RobertaModel", "DistilBertModel", "MPNetModel", "ViTModel", "Dinov2Model", "LlamaForCausalLM",
      "GPT2LMHeadModel")
"""HuggingFace classes."""


def family_model(key: str) -> tuple[torch.nn.Module, Any]:
    return _hf(key) if key in HF else timm_model(key)


FAMILIES = (*VISION, *HF)
