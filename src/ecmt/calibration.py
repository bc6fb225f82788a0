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
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .conversion import build_spiking
from .distributed import all_reduce_max, all_reduce_sum
from .errors import CalibrationError, ConversionError, InvalidInputError
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


_ZERO = BUCKETS // 2
"""The bucket of +0.0 and of the positive denormals below 2⁻¹³³; −0.0 is in the one below."""
_SMALLEST_POSITIVE = float(_bucket_edge(torch.tensor([_ZERO + 1])))
"""The smallest value above the zero buckets (about 9e-41): smaller magnitudes count as zero."""


def real_tokens(x: Tensor, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Where a site's activation ``x`` belongs to real tokens of a text batch, or None for everywhere.

    ``attention_mask`` is the batch's ``[B, L]`` mask (0 at padding). The result is a boolean
    tensor broadcastable to ``x``, for the layouts of the sites of a text Transformer:

    * ``(B, L, C)``: the input of a Linear; padded positions are left out;
    * ``(B, heads, L, D)``: q, k or v; padded positions are left out;
    * ``(B, heads, L, L)``: the attention map; padded queries are left out, and so are the
      padded keys, which the masked softmax makes exactly 0. An entry counts as a padded key
      only if every such entry is 0, so a q, k or v whose head width happens to equal L is
      never mistaken for an attention map.

    Activations of other shapes (and of batches without padding) all count.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(device=x.device, dtype=torch.bool)
    B, L = mask.shape
    if x.dim() == 3 and tuple(x.shape[:2]) == (B, L):
        return mask[:, :, None]  # (B, L, 1)
    if x.dim() != 4 or x.shape[0] != B or x.shape[2] != L:
        return None
    queries = mask[:, None, :, None]  # (B, 1, L, 1)
    if x.shape[3] == L:
        keys = mask[:, None, None, :]  # (B, 1, 1, L)
        if not bool(x.masked_select(queries & ~keys).any()):
            return queries & keys
    return queries


@dataclass
class BatchMask:
    """The attention mask of the text batch being observed, shared by all observers of a network.

    ``mask`` is None for image batches and for text batches without padding.
    """

    mask: Optional[Tensor] = None

    def set(self, x: Any) -> None:
        """Take the ``attention_mask`` of batch ``x`` (a dict of tensors), if it pads anything."""
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        self.mask = None if mask is None or bool(mask.all()) else mask


class SiteObserver(nn.Module):
    """Pass-through module that histograms the activations reaching one spiking site.

    Args:
        batch_mask: Holds the attention mask of the text batch being observed (see
            :func:`collect_statistics`); activations at padded positions are not counted
            (:func:`real_tokens`). None: everything counts.
        scale: Per-channel scales (``[C]``, the last dimension): the activations are divided
            by them before they are counted (per-channel calibration, second pass).
        track_max: Record the largest magnitude per channel in ``channel_max`` instead of
            the histogram (per-channel calibration, first pass).
    """

    def __init__(self, batch_mask: Optional[BatchMask] = None, scale: Optional[Tensor] = None,
                 track_max: bool = False) -> None:
        super().__init__()
        self.batch_mask = batch_mask
        self.scale = scale
        self.track_max = track_max
        self.channel_max: Optional[Tensor] = None
        self.register_buffer("counts", torch.zeros(BUCKETS, dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        keep = real_tokens(x, self.batch_mask.mask) if self.batch_mask is not None else None
        if self.track_max:
            a = x.detach().abs().float()
            if keep is not None:
                a = a * keep
            m = a.reshape(-1, a.shape[-1]).amax(0)  # (C,)
            self.channel_max = m if self.channel_max is None else torch.maximum(self.channel_max, m)
            return x
        y = x if self.scale is None else x.detach().float() / self.scale.to(x.device)
        buckets = _bucket_of(y, numel=y.numel())
        if keep is not None:
            buckets = buckets.masked_select(keep)
        self.counts += torch.bincount(buckets.flatten(), minlength=BUCKETS)
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


def bucket_values(counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(values, counts)`` of the non-empty buckets of a histogram, zero and non-finite ones excepted.

    Each value is the middle of its bucket (float64), within 2⁻⁸ relative of every value counted there.
    """
    counts = counts.detach().cpu()
    b = torch.arange(BUCKETS)
    finite = (b >= NON_FINITE_BUCKETS) & (b < BUCKETS - NON_FINITE_BUCKETS)
    used = (counts > 0) & finite & ((b < _ZERO - 1) | (b > _ZERO))
    b = b[used]
    lo, hi = _bucket_edge(b).double(), _bucket_edge(b + 1).double()
    return (lo + hi) / 2, counts[used]


@dataclass
class ActivationStats:
    """Histograms of the activations at every site, from :func:`collect_statistics`."""

    counts: dict[str, Tensor]
    example: Optional[dict] = None  # the signature of the inputs (ecmt.graph.capture.signature)
    scales: Optional[dict[str, Tensor]] = None  # per-channel scales: counts are of x / scale (per_channel)

    def apply_scales(self, th: Thresholds) -> Thresholds:
        """Thresholds found on the scaled activations, for the activations themselves:
        ``θ_c = scale_c · θ`` at every per-channel site (Algorithm 1, step 1, per channel)."""
        if not self.scales:
            return th
        sites = dict(th.sites)
        for name, scale in self.scales.items():
            a, b = sites[name]
            values = scale.double().tolist()
            sites[name] = (tuple(a * v for v in values), tuple(b * v for v in values))
        return replace(th, sites=sites)

    def quantile(self, site: str, q: float) -> float:
        return histogram_quantile(self.counts[site], q)

    def percentile_of(self, site: str, value: float) -> float:
        """The percentile rank (0 to 100) of ``value`` among the site's activations, to one bucket."""
        counts = self.counts[site].detach().cpu().to(torch.float64)
        b = int(_bucket_of(torch.tensor([float(value)]), numel=1))
        return 100.0 * float(counts[:b].sum() + counts[b] / 2) / max(float(counts.sum()), 1.0)

    def site_thresholds(self, site: str, percentile: float) -> tuple[float, float]:
        """``(θ1, θ2)`` of one site at percentile p (see :func:`base_thresholds`)."""
        return base_thresholds(self.counts[site], percentile / 100.0)

    def thresholds(self, percentile: float = 99.0, overrides: Optional[Mapping[str, Override]] = None) -> Thresholds:
        """θ1 = p-th percentile and θ2 = −(100−p)-th percentile at every site.

        A side whose percentile has the wrong sign takes its threshold from the values of
        its own sign, and a side with no such values (the negative side of a softmax
        output) gets θ = 0, which disables it: see :func:`base_thresholds`.
        """
        _check_percentile(percentile)
        sites = {name: self.site_thresholds(name, percentile) for name in self.counts}
        th = self.apply_scales(Thresholds(sites, percentile, example=self.example))
        return th.with_overrides(overrides) if overrides else th


def base_thresholds(counts: Tensor, q: float) -> tuple[float, float]:
    """``(θ1, θ2)`` from a site's histogram at quantile q = p/100 (Algorithm 1, step 1).

    Algorithm 1 sets θ1 to the p-th percentile of the activations and −θ2 to the (100−p)-th.
    **Deviation:** when that percentile has the wrong sign (θ1 ≤ 0, or −θ2 ≥ 0) but values
    of the side's sign exist, the side's threshold is taken from those values alone: θ1 is the
    p-th percentile of the positive values, −θ2 the (100−p)-th percentile of the negative
    ones. Without this, a site whose activations are mostly small negatives (after a GELU)
    gets θ1 = 0 for p below about 80, loses its positive side, and the SNN's output collapses.
    Only a side with no values of its sign at all (the negative side of a softmax output) is
    disabled (θ = 0). Exact zeros and denormals below 1e-40 count as neither sign.

    Example:
        >>> obs = SiteObserver()
        >>> _ = obs(torch.tensor([-0.1] * 80 + [1.0] * 20))
        >>> th1, th2 = base_thresholds(obs.counts, 0.7)   # the 70th percentile is -0.1
        >>> round(th1, 1), round(th2, 1)
        (1.0, 0.1)
    """
    positive, negative = slice(_ZERO + 1, None), slice(None, _ZERO - 1)
    th1 = histogram_quantile(counts, q)
    if th1 < _SMALLEST_POSITIVE:  # the percentile is not positive
        th1 = histogram_quantile(_keep(counts, positive), q) if counts[positive].any() else 0.0
    th2 = -histogram_quantile(counts, 1.0 - q)
    if th2 < _SMALLEST_POSITIVE:
        th2 = -histogram_quantile(_keep(counts, negative), 1.0 - q) if counts[negative].any() else 0.0
    return th1, th2


def _keep(counts: Tensor, buckets: slice) -> Tensor:
    """The histogram of the values in ``buckets`` only."""
    out = torch.zeros_like(counts)
    out[buckets] = counts[buckets]
    return out


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


def check_finite(x: Any, what: str, error: type[ConversionError] = InvalidInputError) -> None:
    """Raise ``error`` if a floating tensor (or a dict of tensors) holds NaN or Inf, saying where.

    One device synchronisation per tensor: check an input once, not at every time step.
    """
    named = x.items() if isinstance(x, Mapping) else [(None, x)]
    for key, t in named:
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            first = tuple(int(i) for i in bad.nonzero()[0])
            where = what if key is None else f"{what}[{key!r}]"
            raise error(f"{where} holds {int(bad.sum())} NaN or Inf value(s), the first at index {first}: "
                        "fix the data or its preprocessing (or replace them with torch.nan_to_num)")


@contextmanager
def input_errors(x: Any, what: str, error: type[ConversionError]) -> Iterator[None]:
    """Report a failure of the model on ``x`` as ``error``, with the input's shape.

    An input the model cannot take fails inside it: timm asserts the image size
    (AssertionError), layers check shapes and channels (RuntimeError).
    """
    try:
        yield
    except (AssertionError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        tensors = x if isinstance(x, Mapping) else {None: x}
        shape = {k: tuple(v.shape) for k, v in x.items()} if isinstance(x, Mapping) else tuple(x.shape)
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
        reason = " ".join(str(e).split())
        if _DTYPE_ERROR.search(reason):
            raise error(f"the model cannot take {what} of dtype {', '.join(dtypes)} ({reason}): give inputs of "
                        "the dtype of its weights (float32 images unless the model was cast)") from e
        raise error(f"the model cannot take {what} of shape {shape} ({reason}): "
                    "give inputs of the size and channels it was built for") from e


_DTYPE_ERROR = re.compile(r"type \(|dtype|scalar type")
"""How torch words a dtype mismatch ("Input type (unsigned char) and bias type (float) should be the same",
"expected scalar type Float but found Double", "mat1 and mat2 must have the same dtype")."""


NON_FINITE_BUCKETS = 128
"""The first and the last 128 buckets hold exactly the NaN and ±Inf values."""


def non_finite(counts: Tensor) -> int:
    """How many NaN or Inf values a site's histogram holds."""
    return int(counts[:NON_FINITE_BUCKETS].sum() + counts[-NON_FINITE_BUCKETS:].sum())


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in x.items()}
    return x.to(device)


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable[Any], *, max_batches: Optional[int] = None,
                       progress: bool = False, example: Any = None, path: str = "auto",
                       per_channel: bool = False) -> ActivationStats:
    """Run the ANN over ``batches`` and histogram the activation at every spiking site.

    The sites are the input of every Linear and both operands of every matrix product. In
    text batches with an ``attention_mask``, activations at padded token positions are left
    out: the model's output there is never used (see :func:`real_tokens`).

    Args:
        model: The ANN (not modified).
        batches: Iterable of inputs, ``(input, target)`` pairs, or dicts of tensors.
        max_batches: Stop after this many batches.
        progress: Show a progress bar.
        example, path: How the model is converted (see :func:`ecmt.conversion.build_spiking`).
        per_channel: At the inputs of Linear layers (sites ``*.neuron``), histogram each
            channel's activations divided by the channel's largest magnitude (found in a first
            pass over the batches), so that a percentile there scales per channel
            (:meth:`ActivationStats.apply_scales`): a few outlier channels, 10-100x larger than
            the rest (LLMs), then no longer take all the levels of their site.

    Under ``torchrun`` each rank passes its own share of the batches; the histograms are
    summed across ranks, so every rank gets the statistics of the whole calibration set.

    Raises:
        CalibrationError: No batch was given, an input holds NaN/Inf or does not fit the
            model, or the model's activations do.
    """
    from .graph.capture import signature

    if per_channel:  # two passes: the largest magnitude per channel, then the scaled histograms
        batches = list(batches if max_batches is None else itertools.islice(batches, max_batches))
        maxima = _channel_maxima(model, batches, example=example, path=path)
        scales = {n: torch.where(m > 0, m, torch.ones_like(m)) for n, m in maxima.items()}
        stats = _histograms(model, batches, None, progress, example, path, scales)
        return ActivationStats(stats.counts, stats.example, scales)
    return _histograms(model, batches, max_batches, progress, example, path, None)


def _is_linear_input(name: str) -> bool:
    """Sites at the input of a Linear layer are named ``<layer>.neuron``."""
    return name.endswith(".neuron")


def _channel_maxima(model: nn.Module, batches: list, *, example: Any, path: str) -> dict[str, Tensor]:
    """The largest magnitude per channel (last dimension) at every Linear input, over ``batches``."""
    observers: dict[str, SiteObserver] = {}
    batch_mask = BatchMask()

    def make(name: str) -> nn.Module:
        observers[name] = SiteObserver(batch_mask, track_max=_is_linear_input(name))
        return observers[name]

    if example is None and batches:
        example = model_input(batches[0])
    net = build_spiking(model, make, example=example, path=path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    net.to(device)
    for batch in batches:
        x = to_device(model_input(batch), device)
        batch_mask.set(x)
        reset_net(net)
        with input_errors(x, "the calibration input", CalibrationError):
            net(**x) if isinstance(x, Mapping) else net(x)
    out = {}
    for name, obs in observers.items():
        if obs.track_max and obs.channel_max is not None:
            m = obs.channel_max.clone()
            out[name] = all_reduce_max(m)
    return out


def _histograms(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int], progress: bool,
                example: Any, path: str, scales: Optional[dict[str, Tensor]]) -> ActivationStats:
    from .graph.capture import signature

    observers: dict[str, SiteObserver] = {}
    batch_mask = BatchMask()
    it = batches if max_batches is None else itertools.islice(batches, max_batches)
    it = iter(it)
    first = next(it, None)
    if first is not None:
        it = itertools.chain([first], it)
        if example is None:  # the graph is captured on the first batch, whose signature convert reuses
            example = model_input(first)

    def make_observer(name: str) -> nn.Module:
        observers[name] = SiteObserver(batch_mask, scale=(scales or {}).get(name))
        return observers[name]

    net = build_spiking(model, make_observer, example=example, path=path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    net.to(device)
    seen = 0
    hidden = None if progress is None else not progress  # None: shown on terminals only
    for batch in tqdm(it, desc="calibrating", total=max_batches, disable=hidden, leave=False):
        x = to_device(model_input(batch), device)
        check_finite(x, "calibration input", CalibrationError)
        batch_mask.set(x)
        reset_net(net)  # a single step with fresh state: every EC computes exactly F(x)
        with input_errors(x, "the calibration input", CalibrationError):
            net(**x) if isinstance(x, Mapping) else net(x)
        seen += 1
    seen = int(all_reduce_sum(torch.tensor([seen], device=device))[0])  # under torchrun: all ranks
    if seen == 0:
        raise CalibrationError("the calibration set is empty: give at least one batch of inputs")
    for obs in observers.values():
        all_reduce_sum(obs.counts)
    broken = [name for name, obs in observers.items() if non_finite(obs.counts)]
    if broken:
        raise CalibrationError(f"the model's activations hold NaN or Inf at {len(broken)} site(s), first at "
                               f"{broken[0]}, on finite inputs: check the model's weights (and its dtype)")
    return ActivationStats({name: obs.counts for name, obs in observers.items()},
                           signature(example) if example is not None else None)


def calibrate(model: nn.Module, batches: Iterable[Any], percentile: float = 99.0,
              overrides: Optional[Mapping[str, Override]] = None, *, max_batches: Optional[int] = None,
              progress: bool = False, example: Any = None, path: str = "auto", per_channel: bool = False) -> Thresholds:
    """Base thresholds at every site from the activation percentiles (Algorithm 1, step 1).

    Args:
        model: The ANN (not modified).
        batches: Iterable of inputs, ``(input, target)`` pairs, or dicts of tensors.
        percentile: p; θ1 is the p-th percentile and −θ2 the (100−p)-th. The paper uses 99.
        overrides: Per-site thresholds by name or pattern, e.g. ``{"*.attn_neuron": 0.0125}``
            (see :meth:`Thresholds.with_overrides`).
        max_batches: Stop after this many batches.
        progress: Show a progress bar.
        example, path: How the model is converted (see :func:`ecmt.conversion.build_spiking`);
            give :func:`ecmt.convert` the same.
        per_channel: Base thresholds per input channel of every Linear layer (see
            :func:`collect_statistics`); other sites keep one pair.

    Example:
        >>> th = ecmt.calibrate(vit, loader, percentile=99.0, max_batches=8)   # doctest: +SKIP
        >>> th["blocks.0.attn.qkv.neuron"]                                      # doctest: +SKIP
        (1.93, 2.05)
    """
    _check_percentile(percentile)
    stats = collect_statistics(model, batches, max_batches=max_batches, progress=progress, example=example, path=path,
                               per_channel=per_channel)
    return stats.thresholds(percentile, overrides)
