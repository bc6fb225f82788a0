"""Calibration of the base thresholds (Algorithm 1, step 1).

Percentile estimator: every site keeps an exact histogram of its activations over 65,536
buckets, one per value of the top 16 bits of the float32 representation (sign, exponent and
7 mantissa bits). Buckets are ordered like the values, so a percentile is found by a cumulative
count, then interpolated linearly inside its bucket: the relative error is below 2⁻⁷ (0.8%)
whatever the range of the data. Memory is fixed (512 KiB per site) however many batches are
seen, the counts are exact integers, and the result does not depend on the batch order or on
how the data is split between processes (histograms add).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .conversion import build_spiking
from .distributed import all_reduce_sum
from .errors import CalibrationError, ConversionError
from .fusion import fusable
from .state import reset_net
from .thresholds import Override, Thresholds

BUCKETS = 1 << 16
_FLIP = 0x7FFFFFFF


@fusable
def _bucket_of(x: Tensor) -> Tensor:
    """Order-preserving bucket index in [0, 65536) of float32 values (int32; one fused kernel
    on large tensors, see :mod:`ecmt.fusion`)."""
    i = x.detach().float().contiguous().view(torch.int32)
    i = torch.where(i < 0, i ^ _FLIP, i)  # negative floats: reverse order of magnitude bits
    return (i >> 16) + (BUCKETS // 2)


def _bucket_edge(b: Tensor) -> Tensor:
    """The smallest float32 value in bucket ``b`` (inverse of :func:`_bucket_of`)."""
    i = ((b.to(torch.int64) - BUCKETS // 2) << 16).to(torch.int32)
    i = torch.where(i < 0, i ^ _FLIP, i)
    return i.view(torch.float32)


class SiteObserver(nn.Module):
    """Pass-through module that histograms the activations reaching one spiking site."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(BUCKETS, dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        self.counts += torch.bincount(_bucket_of(x, numel=x.numel()).flatten(), minlength=BUCKETS)
        return x

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1) of everything observed."""
        return histogram_quantile(self.counts, q)


def histogram_quantile(counts: Tensor, q: float) -> float:
    """The q-quantile of a bucket histogram, interpolated linearly inside its bucket."""
    counts = counts.detach().cpu().to(torch.float64)
    total = float(counts.sum())
    if total == 0:
        raise CalibrationError("no activations observed")
    rank = q * (total - 1)  # 0-based rank of the wanted value among all observed ones
    cum = torch.cumsum(counts, 0)
    b = min(int(torch.searchsorted(cum, torch.tensor([rank], dtype=torch.float64), right=True)), BUCKETS - 1)
    frac = (rank - float(cum[b] - counts[b]) + 0.5) / float(counts[b])
    lo, hi = _bucket_edge(torch.tensor([b, min(b + 1, BUCKETS - 1)])).tolist()
    if not (abs(lo) < float("inf") and abs(hi) < float("inf")):
        return lo
    return lo + min(max(frac, 0.0), 1.0) * (hi - lo)


@dataclass
class ActivationStats:
    """Histograms of the activations at every site, from :func:`collect_statistics`."""

    counts: dict[str, Tensor]

    def quantile(self, site: str, q: float) -> float:
        return histogram_quantile(self.counts[site], q)

    def thresholds(self, percentile: float = 99.0, overrides: Optional[Mapping[str, Override]] = None) -> Thresholds:
        """θ1 = p-th percentile and θ2 = −(100−p)-th percentile at every site.

        A side whose percentile has the wrong sign (e.g. the negative side of a softmax
        output) gets θ = 0, which disables it.
        """
        _check_percentile(percentile)
        q = percentile / 100.0
        sites = {name: (max(self.quantile(name, q), 0.0), max(-self.quantile(name, 1.0 - q), 0.0))
                 for name in self.counts}
        th = Thresholds(sites, percentile)
        return th.with_overrides(overrides) if overrides else th


def _check_percentile(p: float) -> None:
    if not (50.0 < float(p) <= 100.0):
        raise CalibrationError(f"percentile must be in (50, 100], got {p}")


def model_input(batch: Any) -> Any:
    """The model input in a batch: the batch itself, or the first item of an (input, target) pair."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationError("empty batch")
        return batch[0]
    return batch


def check_finite(x: Any, what: str) -> None:
    """Raise if a floating tensor (or a dict of tensors) holds NaN or Inf."""
    tensors = x.values() if isinstance(x, Mapping) else [x]
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ConversionError(f"{what} contains NaN or Inf values")


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in x.items()}
    return x.to(device)


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable[Any], *, max_batches: Optional[int] = None,
                       progress: bool = False) -> ActivationStats:
    """Run the ANN over ``batches`` and histogram the activation at every spiking site.

    The sites are the input of every Linear and both operands of every matrix product.

    Args:
        model: The ANN (not modified).
        batches: Iterable of inputs, ``(input, target)`` pairs, or dicts of tensors.
        max_batches: Stop after this many batches.
        progress: Show a progress bar.

    Under ``torchrun`` each rank passes its own share of the batches; the histograms are
    summed across ranks, so every rank gets the statistics of the whole calibration set.

    Raises:
        CalibrationError: No batch was given, or an input holds NaN/Inf.
    """
    observers: dict[str, SiteObserver] = {}

    def make_observer(name: str) -> nn.Module:
        observers[name] = SiteObserver()
        return observers[name]

    net = build_spiking(model, make_observer)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    net.to(device)
    seen = 0
    it = batches if max_batches is None else itertools.islice(batches, max_batches)
    for batch in tqdm(it, desc="calibrating", total=max_batches, disable=not progress, leave=False):
        x = to_device(model_input(batch), device)
        try:
            check_finite(x, "calibration input")
        except ConversionError as e:
            raise CalibrationError(str(e)) from None
        reset_net(net)  # a single step with fresh state: every EC computes exactly F(x)
        net(**x) if isinstance(x, Mapping) else net(x)
        seen += 1
    seen = int(all_reduce_sum(torch.tensor([seen], device=device))[0])  # under torchrun: all ranks
    if seen == 0:
        raise CalibrationError("the calibration set is empty")
    for obs in observers.values():
        all_reduce_sum(obs.counts)
    return ActivationStats({name: obs.counts for name, obs in observers.items()})


def calibrate(model: nn.Module, batches: Iterable[Any], percentile: float = 99.0,
              overrides: Optional[Mapping[str, Override]] = None, *, max_batches: Optional[int] = None,
              progress: bool = False) -> Thresholds:
    """Base thresholds at every site from the activation percentiles (Algorithm 1, step 1).

    Args:
        model: The ANN (not modified).
        batches: Iterable of inputs, ``(input, target)`` pairs, or dicts of tensors.
        percentile: p; θ1 is the p-th percentile and −θ2 the (100−p)-th. The paper uses 99.
        overrides: Per-site thresholds by name or pattern, e.g. ``{"*.attn_neuron": 0.0125}``
            (see :meth:`Thresholds.with_overrides`).
        max_batches: Stop after this many batches.
        progress: Show a progress bar.

    Example:
        >>> th = ecmt.calibrate(vit, loader, percentile=99.0, max_batches=8)   # doctest: +SKIP
        >>> th["blocks.0.attn.qkv.neuron"]                                      # doctest: +SKIP
        (1.93, 2.05)
    """
    _check_percentile(percentile)
    stats = collect_statistics(model, batches, max_batches=max_batches, progress=progress)
    return stats.thresholds(percentile, overrides)
