"""HuggingFace BERT-family encoders: BERT, RoBERTa, XLM-RoBERTa and CamemBERT.

These models share one layout (RoBERTa and its relatives are generated from the BERT code):

* the embeddings see only the token ids, so they stay analog;
* self-attention is rebuilt as :class:`~ecmt.layers.SpikingAttention` with the query, key and
  value projections fused into one Linear (they read the same input, so one MT site before
  the fused Linear is exact); the padding mask reaches the softmax EC module and is applied
  to the mean scores inside F, never accumulated over steps;
* the post-norm residual blocks ``LayerNorm(dense(x) + input)``, the MLP activation and the
  pooler's ``Tanh`` get MT sites before their Linears and EC wrappers on their nonlinearities.

The model's output read per step is ``last_hidden_state``; wrap the model in
:class:`PooledOutput` to simulate the pooler output instead. Decoder (causal) and
cross-attention configurations are refused.

Example:
    >>> batches = [tokenizer(texts, padding=True, return_tensors="pt")]      # doctest: +SKIP
    >>> snn = ecmt.convert(bert, ecmt.calibrate(bert, batches), levels=8)     # doctest: +SKIP
    >>> ecmt.simulate(snn, batches[0], T=16).shape                             # doctest: +SKIP
    torch.Size([16, 2, 12, 768])
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from transformers.activations import ACT2CLS, LinearActivation
from transformers.models.bert import modeling_bert
from transformers.models.camembert import modeling_camembert
from transformers.models.roberta import modeling_roberta
from transformers.models.xlm_roberta import modeling_xlm_roberta

from ..errors import ConversionError
from ..layers import SpikingAttention
from ..registry import (register_analog_input, register_container, register_family, register_linear_leaf,
                        register_nonlinear, register_replacement)

MASKED_IMPLEMENTATIONS = ("eager", "sdpa")
"""Attention implementations whose mask is a dense 4-D tensor (float additive or bool)."""


class BertSpikingSelfAttention(SpikingAttention):
    """:class:`SpikingAttention` with the call convention of ``BertSelfAttention``.

    It takes ``(hidden_states, attention_mask, **kwargs)`` and returns ``(output, None)``;
    the output projection is left to the following ``*SelfOutput`` module, as in the ANN.
    """

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                **kwargs: Any) -> tuple[Tensor, None]:  # kwargs: cache, position ids (unused by encoders)
        return super().forward(hidden_states, attention_mask), None


def fused_qkv(m: nn.Module) -> nn.Linear:
    """One Linear computing ``[query; key; value]`` of a ``*SelfAttention`` module.

    The output is laid out as ``(3, heads, head_dim)``, which is what
    :class:`SpikingAttention` splits.
    """
    parts = (m.query, m.key, m.value)
    w = torch.cat([p.weight for p in parts])
    lin = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.cat([p.bias for p in parts]))
    return lin


def spiking_self_attention(m: nn.Module, site: Callable[[str], nn.Module],
                           convert_child: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """Rebuild a BERT-style ``*SelfAttention`` as :class:`BertSpikingSelfAttention`.

    The converted copy's config is switched to ``sdpa`` attention if it uses another
    implementation (flash or flex attention), so that the model builds a dense padding mask
    that the softmax EC module can apply. The config belongs to the copy that conversion
    made; the ANN is untouched.
    """
    if m.is_causal:
        raise ConversionError("causal (decoder) self-attention is not supported")
    if m.config._attn_implementation not in MASKED_IMPLEMENTATIONS:
        m.config._attn_implementation = "sdpa"
    return BertSpikingSelfAttention(
        convert_child(fused_qkv(m), "qkv"), None,
        num_heads=m.num_attention_heads, head_dim=m.attention_head_size, scale=m.scaling, make_site=site,
    )


def check_encoder_model(m: nn.Module) -> Optional[str]:
    """Only encoders are supported; decoders (causal masks, cross-attention) are refused."""
    if m.config.is_decoder:
        return "decoder configurations (is_decoder=True) are not supported"
    return None


class PooledOutput(nn.Module):
    """Wraps a BERT-family model so that its output is ``pooler_output``.

    Calibrate and convert the wrapper instead of the model to simulate the pooled first
    token (``Tanh(dense(h[:, 0]))``) rather than ``last_hidden_state``.

    Args:
        model: A BERT-family model built with its pooling layer.

    Raises:
        ConversionError: The model has no pooler (``add_pooling_layer=False``).

    Example:
        >>> pooled = PooledOutput(bert)                                           # doctest: +SKIP
        >>> snn = ecmt.convert(pooled, ecmt.calibrate(pooled, batches))           # doctest: +SKIP
        >>> ecmt.simulate(snn, batch, T=16).shape                                  # doctest: +SKIP
        torch.Size([16, 2, 768])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "pooler", None) is None:
            raise ConversionError(f"{type(model).__name__} has no pooler (built with add_pooling_layer=False)")
        self.model = model

    def forward(self, **inputs: Any) -> Tensor:
        return self.model(**inputs).pooler_output


def last_hidden_state(out: Any) -> Tensor:
    """The tensor a BERT-family model's output is simulated on."""
    return out.last_hidden_state


def register_bert_like(module: ModuleType, prefix: str) -> None:
    """Register the classes ``{prefix}Model``, ``{prefix}SelfAttention``, ... of a modeling module."""
    def cls(name: str) -> type:
        return getattr(module, prefix + name)

    register_replacement(cls("SelfAttention"))(spiking_self_attention)
    register_container(cls("Model"), check=check_encoder_model)
    register_container(*(cls(n) for n in ("Encoder", "Layer", "Attention", "SelfOutput", "Intermediate",
                                          "Output", "Pooler")))
    register_analog_input(cls("Embeddings"))
    register_family(cls("Model"), output=last_hidden_state)


for _module, _prefix in ((modeling_bert, "Bert"), (modeling_roberta, "Roberta"),
                         (modeling_xlm_roberta, "XLMRoberta"), (modeling_camembert, "Camembert")):
    register_bert_like(_module, _prefix)

register_container(PooledOutput)
register_linear_leaf(LinearActivation)
register_nonlinear(*{c if isinstance(c, type) else c[0] for c in ACT2CLS.values()} - {LinearActivation})
