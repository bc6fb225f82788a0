"""How exact the spiking KV cache is on a real LM, against the rounding noise of batching.

A text is simulated for T steps three ways: position by position with the cache
(:mod:`ecmt.kvcache`), as a whole prefix alone, and as a whole prefix in a right-padded batch
of two (another GEMM shape, the same mathematics). The last ``--positions`` positions' logits
are compared: the relative difference (Frobenius) of cached to whole, of batched to whole, and
of the SNN to the ANN, and whether the top-1 tokens agree. An SNN amplifies last-bit
differences, so cached and uncached generation may part after some tokens even though both
compute the same function; this shows by how much each departs from the other.

    python benchmarks/lm_cache_check.py --T 8 --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ecmt import lm
from ecmt.kvcache import SpikingKVCache
from ecmt.simulation import simulate
from ecmt.text import packaged_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

TEXT = "The capital of France is Paris. The capital of"
OTHER = " Germany is Berlin and"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a - b).norm() / b.norm()), 9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--positions", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="smollm2_cache_check")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = lm.load_lm(a.model)
    snn = lm.convert_lm(model, packaged_texts("calibration")[:16], rule="eq25", per_channel=True)
    ids = model.tokenize([TEXT])["input_ids"]
    L, s0 = ids.shape[1], ids.shape[1] - a.positions
    cache = SpikingKVCache(snn)
    cache.extend(ids[:, :s0], a.T)
    cached = torch.stack([cache.extend(ids[:, :k], a.T)[0, -1] for k in range(s0 + 1, L + 1)])
    whole = simulate(snn, {"input_ids": ids}, a.T)[-1, 0, s0:]
    pair = model.tokenize([TEXT, TEXT + OTHER])
    batched = simulate(snn, pair, a.T)[-1, 0, s0:L]
    ann = model.logits({"input_ids": ids})[0, s0:]

    def same(x: torch.Tensor) -> list[bool]:
        return (x.argmax(-1) == whole.argmax(-1)).tolist()

    write(a.name, {"model": a.model, "T": a.T, "text": TEXT, "positions": list(range(s0, L)),
                   "cached_vs_whole": {"relative_difference": relative(cached, whole), "top1_equal": same(cached)},
                   "batched_vs_whole": {"relative_difference": relative(batched, whole), "top1_equal": same(batched)},
                   "snn_vs_ann": {"relative_difference": relative(whole, ann), "top1_equal": same(ann)},
                   "environment": environment(a.threads)})


if __name__ == "__main__":
    main()
