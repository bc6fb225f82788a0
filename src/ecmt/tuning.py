"""Threshold search: base thresholds that minimize the SNN's error at a target T.

The paper sets every base threshold at the 99th percentile. At small T a lower percentile
often does better: a lower θ sends the same value with more, smaller spikes, which the 2n
levels make affordable. :func:`tune` picks a percentile per *site type* (the same site in
every block, e.g. ``blocks.*.mlp.fc2.neuron``) by measuring the SNN's output error against
the ANN's on the calibration data only.

Search (at most ``budget`` SNN simulations of the calibration set, each T steps long):

1. one global percentile for all sites, from a coarse log-spaced grid of tail masses
   ``100 − p`` in {0.1, 0.3, 1, 3, 10};
2. coordinate descent over site types, largest types first: halve or double the tail mass of
   one type, keep the change if the error falls; stop when the budget is spent or a full pass
   brings no improvement.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import registry
from .calibration import ActivationStats, collect_statistics, model_input, to_device
from .conversion import convert
from .simulation import simulate_steps
from .thresholds import Thresholds

GLOBAL_TAILS = (0.1, 0.3, 1.0, 3.0, 10.0)
"""Tail masses 100 − p tried for the global percentile (p = 99.9 ... 90)."""


def site_type(name: str) -> str:
    """The site's name with block indices replaced by ``*``: its role in every block."""
    return re.sub(r"\.\d+(?=\.)", ".*", name)


def thresholds_at(stats: ActivationStats, percentile_of: Callable[[str], float]) -> Thresholds:
    """Thresholds with a percentile chosen per site."""
    return Thresholds({name: stats.site_thresholds(name, percentile_of(name)) for name in stats.counts})


def _valid_positions(x: Any, out: Tensor) -> Tensor:
    """Weights of the output entries: 0 at padded token positions of a text batch, else 1.

    A text model's output ``[B, L, H]`` at positions where ``attention_mask`` is 0 is never
    used (pooling ignores them), so it does not count in the error.
    """
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    if mask is None or out.dim() < 3 or tuple(out.shape[:2]) != tuple(mask.shape):
        return torch.ones((), device=out.device)
    return mask.to(out.dtype).reshape(*mask.shape, *(1,) * (out.dim() - 2))  # (B, L, 1)


@torch.no_grad()
def output_error(model: nn.Module, thresholds: Thresholds, inputs: list[Any], references: list[Tensor],
                 T: int, levels: int) -> float:
    """Relative squared error ``Σ‖SNN_T − ANN‖² / Σ‖ANN‖²`` of the running mean at step T.

    Padded token positions of text batches are left out (see :func:`_valid_positions`).
    """
    snn = convert(model, thresholds, levels)
    num = den = 0.0
    for x, ref in zip(inputs, references):
        *_, out = simulate_steps(snn, x, T)
        w = _valid_positions(x, ref)
        num += float((w * (out - ref) ** 2).sum())
        den += float((w * ref ** 2).sum())
    return num / max(den, 1e-30)


@torch.no_grad()
def tune(model: nn.Module, batches: Iterable[Any], T: int = 4, levels: int = 8, *, budget: int = 20,
         max_batches: Optional[int] = None, progress: bool = False) -> Thresholds:
    """Choose a base-threshold percentile per site type for the best SNN output at step T.

    Uses only ``batches`` (calibration data): their activation histograms for the thresholds
    and their ANN outputs as the target.

    Args:
        model: The ANN (not modified).
        batches: Calibration batches (inputs, ``(input, target)`` pairs, or dicts).
        T: The time step whose output error is minimized.
        levels: n of the MT neurons the thresholds are for.
        budget: Most SNN simulations of the calibration set to spend.
        max_batches: Use at most this many batches.
        progress: Show a progress bar.

    Returns:
        Thresholds in the form :func:`ecmt.calibrate` returns, for ``ecmt.convert(model, th,
        levels)``; ``meta`` records the chosen percentile per site type and the error reached.

    Example:
        >>> th = ecmt.tune(vit, calib_batches, T=4, levels=8)   # doctest: +SKIP
        >>> snn = ecmt.convert(vit, th, levels=8)               # doctest: +SKIP
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = [to_device(model_input(b), device) for b, _ in zip(batches, range(max_batches or 1 << 62))]
    stats = collect_statistics(model, inputs)
    output = registry.family_of(model).output
    model = model.eval()
    refs = [output(model(**x) if isinstance(x, Mapping) else model(x)).float() for x in inputs]

    bar = tqdm(total=budget, desc=f"tuning for T={T}", disable=None if progress is None else not progress, leave=False)
    spent = 0

    def error(tails: Mapping[str, float]) -> float:
        nonlocal spent
        spent += 1
        bar.update(1)
        th = thresholds_at(stats, lambda name: 100.0 - tails[site_type(name)])
        return output_error(model, th, inputs, refs, T, levels)

    types = [t for t, _ in Counter(site_type(n) for n in stats.counts).most_common()]
    best_err, best = float("inf"), {}
    for tail in GLOBAL_TAILS[: max(1, budget)]:  # 1. one global percentile
        cand = {t: tail for t in types}
        err = error(cand)
        if err < best_err:
            best_err, best = err, cand
    improved = True
    while improved and spent < budget:  # 2. coordinate descent per site type
        improved = False
        for t in types:
            for factor in (0.5, 2.0):
                if spent >= budget:
                    break
                tail = min(best[t] * factor, 49.0)
                cand = {**best, t: tail}
                err = error(cand)
                if err < best_err:
                    best_err, best, improved = err, cand, True
                    break
    bar.close()
    th = thresholds_at(stats, lambda name: 100.0 - best[site_type(name)])
    meta = {"tuned_T": T, "levels": levels, "relative_sq_error": best_err, "simulations": spent,
            "percentile_by_site_type": {t: 100.0 - v for t, v in best.items()}}
    return Thresholds(th.sites, None, meta)
