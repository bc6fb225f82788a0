"""A tiny random causal LM with a byte tokenizer, for the language-modelling tests (no download)."""
from __future__ import annotations

from typing import Sequence

import torch

from ecmt.lm import LanguageModel


class ByteTokenizer:
    """Bytes as tokens (ids 2..257; 0 pad, 1 eos), with the parts of the HF tokenizer API ecmt uses."""

    pad_token = "<pad>"
    eos_token = "<eos>"
    eos_token_id = 1
    padding_side = "right"

    def __call__(self, texts: Sequence[str], padding: bool = True, truncation: bool = True, max_length: int = 64,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        rows = [[b + 2 for b in t.encode()][:max_length] for t in texts]
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


def tiny_lm(kind: str = "llama") -> LanguageModel:
    import transformers as tr

    torch.manual_seed(0)
    if kind == "llama":
        config = tr.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, vocab_size=258)
        model = tr.LlamaForCausalLM(config)
    else:
        model = tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=258, bos_token_id=1,
                                                 eos_token_id=1))
    return LanguageModel(ByteTokenizer(), model.eval(), max_length=24, source=f"tiny-{kind}")


TEXTS = ["The cat sat on the mat.", "A dog ran far.", "Rain fell all day long.", "Birds sing at dawn."]
CALIB = ["Ships sail over the sea.", "Green hills roll on.", "We ate bread and cheese.", "Snow is cold and white."]
