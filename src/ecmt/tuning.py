"""Threshold search: base thresholds, chosen per site, that minimize the SNN's error at a target T.

The paper sets every base threshold at the 99th percentile. At small T other thresholds do
better. :func:`tune` chooses ``(θ1, θ2)`` per site using the calibration data only.

Search (at most ``budget`` SNN simulations of the calibration set, each T steps long):

1. the paper's thresholds (p = 99, with the search's spike rule), the reference to beat;
2. a start per site, without simulation: the θ1 and θ2 that minimize the count-weighted
   squared error of the T-step mean of a lone MT neuron driven by each constant value of the
   site's histogram (:func:`lone_neuron_thresholds`);
3. without refits (the default): one factor for all sites on that start, ``2**s`` for s in
   {0, 1, −1}, then ±1/2 around the best;
   with ``refits > 0``, refits on recorded inputs instead (at most ``refits`` simulations): the
   SNN is simulated and, at ``samples`` positions of every site, the input each neuron
   integrates at each of the T steps is recorded (:func:`recorded_inputs`). Behind spiking
   layers these inputs are not constant, as the start assumes: upstream spikes make them
   fluctuate from step to step. Each site's thresholds are multiplied by the factor (quarter
   octaves, up to 4x either way) with which a neuron driven by its own recorded inputs best
   reproduces their T-step mean (:func:`fit_factor`). All sites are refitted from one
   simulation, so a refit costs one simulation whatever the depth; refits stop when the output
   error no longer falls. On MPNet (12 layers) one refit reached in 3 simulations the error
   that the default reaches after about 10, but the search's final error after 20 was higher
   (README, "Threshold search"): use refits when simulations are expensive and the budget small;
4. coordinate descent over site types (the same site in every block), in order of appearance:
   multiply the thresholds of one type by ``2**(±1/2)``, keep the change if the error falls;
   stop when the budget is spent or a full pass brings no improvement.

Every simulation measures the relative output error (:func:`output_error`); the thresholds
with the lowest win, the paper's included. With ``headroom`` above 1, every threshold of steps
2–4 is raised to a floor that puts the site's top threshold at ``headroom`` times its largest
calibration value (:func:`headroom_floor`); a candidate that the floor makes equal to the best
is not simulated.

The search is made for one spike rule of the MT neurons (``rule``, recorded in the returned
thresholds). Its default is ``"nearest"`` (spike on the threshold nearest to the membrane, see
:class:`ecmt.neurons.SpikeRule`), which converges faster at low T than the paper's Eq. 25 and was the
better of the two on both models measured (README, "Spike rule" and "Threshold search");
``rule="eq25"`` tunes for the paper's neuron.
"""
from __future__ import annotations

import inspect
import math
import re
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import registry
from .calibration import (ActivationStats, BatchMask, bucket_values, calibrate, collect_statistics, model_input,
                          real_tokens, to_device)
from .conversion import SpikingModel, build_spiking, convert, set_thresholds
from .fusion import MIN_NUMEL
from .errors import InvalidInputError
from .neurons import MTNeuron, SpikeRule, check_levels, check_rule
from .simulation import simulate_steps
from .state import reset_net
from .thresholds import Override, Thresholds

REFIT_FACTORS = torch.exp2(torch.arange(-8, 9) / 4.0)
"""The factors a refit tries on each site's thresholds: quarter octaves, up to 4x either way."""

REFERENCE_PERCENTILE = 99.0
"""The paper's percentile: the thresholds the search starts by measuring, and must beat."""


def site_type(name: str) -> str:
    """The site's name with block indices replaced by ``*``: its role in every block."""
    return re.sub(r"\.\d+(?=\.)", ".*", name)


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
                 T: int, levels: int, snn: Optional[SpikingModel] = None) -> float:
    """Relative squared error ``Σ‖SNN_T − ANN‖² / Σ‖ANN‖²`` of the running mean at step T.

    Padded token positions of text batches are left out (see :func:`_valid_positions`).
    ``snn``: a conversion of ``model`` to reuse: its neurons take ``thresholds`` in place.
    """
    if snn is None:
        snn = convert(model, thresholds, levels)
    else:
        set_thresholds(snn, thresholds)
    num = den = 0.0
    for x, ref in zip(inputs, references):
        *_, out = simulate_steps(snn, x, T)
        w = _valid_positions(x, ref)
        num += float((w * (out - ref) ** 2).sum())
        den += float((w * ref ** 2).sum())
    return num / max(den, 1e-30)


def lone_neuron_error(values: Tensor, counts: Tensor, thetas: Tensor, T: int, levels: int,
                      rule: Union[str, SpikeRule] = SpikeRule.eq25) -> Tensor:
    """Count-weighted squared error of the T-step mean of one MT neuron per threshold on constant inputs.

    Args:
        values: Positive input values (one constant input each), ``[K]``.
        counts: How often each value occurs, ``[K]``.
        thetas: Positive base thresholds to try, ``[G]``.
        rule: The neuron's spike rule.

    Returns:
        ``[G]``: ``Σ_k counts_k · (mean_{t≤T} s(t) − values_k)²`` for each threshold. An MT neuron
        with threshold θ is θ times one with threshold 1 driven by ``values / θ``, so a single
        neuron of threshold 1 is simulated on all ``G × K`` inputs.
    """
    neuron = MTNeuron(1.0, 1.0, levels, rule)
    x = (values[None, :] / thetas[:, None]).float()  # (G, K), in units of θ
    total = torch.zeros_like(x)
    # In pieces below fusion.MIN_NUMEL: small eager steps, no compilation for a few thousand values.
    for xs, ts in zip(x.view(-1).split(MIN_NUMEL - 1), total.view(-1).split(MIN_NUMEL - 1)):
        neuron.reset()
        for _ in range(T):
            ts += neuron(xs)
    err = ((total / T - x).double() ** 2 * counts.double()).sum(-1)
    return err * thetas.double() ** 2


def lone_neuron_thresholds(stats: ActivationStats, T: int, levels: int, steps_per_octave: int = 4,
                           rule: Union[str, SpikeRule] = SpikeRule.eq25) -> Thresholds:
    """Per site, the θ1 and θ2 that minimize :func:`lone_neuron_error` on the site's histogram.

    θ1 is chosen on the positive activations, θ2 on the magnitudes of the negative ones, from
    the grid ``max · 2**(−j / steps_per_octave)``, ``j = 0 .. steps_per_octave · (levels + T)``.
    A side without activations of its sign is disabled (θ = 0), as in calibration.
    """
    sites = {}
    for name, counts in stats.counts.items():
        values, n = bucket_values(counts)
        pair = []
        for side in (values > 0, values < 0):
            v, c = values[side].abs(), n[side]
            if v.numel() == 0:
                pair.append(0.0)
                continue
            j = torch.arange(steps_per_octave * (levels + T) + 1, dtype=torch.float64)
            thetas = float(v.max()) * torch.exp2(-j / steps_per_octave)
            pair.append(float(thetas[lone_neuron_error(v, c, thetas, T, levels, rule).argmin()]))
        sites[name] = tuple(pair)
    return Thresholds(sites, rule=rule, example=stats.example)


def _scaled(base: Thresholds, log2_scale: Mapping[str, float]) -> Thresholds:
    """``base`` with both thresholds of every site multiplied by ``2**log2_scale[site]``."""
    return base.scaled({name: 2.0 ** log2_scale[name] for name in base})


def headroom_floor(stats: ActivationStats, levels: int, headroom: float) -> Thresholds:
    """The smallest base thresholds whose top threshold ``θ·2**(n−1)`` (Eq. 19) is ``headroom``
    times the largest calibration value of each side of each site (of each channel, per channel).

    An MT neuron passes on at most ``θ·2**(n−1)`` per step (Eq. 22-23): an input whose T-step
    mean lies beyond it leaves an error that no longer falls with T. A search that fits the
    calibration inputs alone puts the top threshold at their largest value, with nothing to
    spare for the larger values of other inputs: per channel, 8 sentences of SmolLM2 give
    channel maxima that the next 8 exceed up to 27x (README, "Measured on SmolLM2").
    """
    sites = {}
    for name, counts in stats.counts.items():
        values, _ = bucket_values(counts)
        pair = []
        for side in (values > 0, values < 0):
            v = values[side].abs()
            pair.append(float(v.max()) * headroom / 2.0 ** (levels - 1) if v.numel() else 0.0)
        sites[name] = tuple(pair)
    return stats.apply_scales(Thresholds(sites, example=stats.example))


def _at_least(th: Thresholds, floor: Optional[Thresholds]) -> Thresholds:
    """``th`` with every threshold raised to ``floor``'s where it is below it (a side disabled in
    ``th``, θ = 0, stays disabled)."""
    if floor is None:
        return th

    def up(v: Any, f: Any) -> Any:
        if isinstance(v, tuple) or isinstance(f, tuple):
            vs = v if isinstance(v, tuple) else (v,) * len(f)
            fs = f if isinstance(f, tuple) else (f,) * len(vs)
            return tuple(x if x <= 0 else max(x, y) for x, y in zip(vs, fs))
        return v if v <= 0 else max(v, f)

    sites = {n: (up(a, floor.sites[n][0]), up(b, floor.sites[n][1])) if n in floor.sites else (a, b)
             for n, (a, b) in th.sites.items()}
    return replace(th, sites=sites)


@torch.no_grad()
def tune(model: nn.Module, batches: Iterable[Any], T: int = 4, levels: int = 8, *, budget: int = 20,
         max_batches: Optional[int] = None, progress: bool = False,
         rule: Union[str, SpikeRule] = SpikeRule.nearest, example: Any = None, path: str = "auto",
         per_channel: bool = False, refits: int = 0, samples: int = 8192, headroom: float = 1.0,
         log: Optional[Callable[[str], None]] = None) -> Thresholds:
    """Choose base thresholds per site for the best SNN output at step T.

    Uses only ``batches`` (calibration data): their activation histograms for the thresholds
    and their ANN outputs as the target. See the module docstring for the search.

    Args:
        model: The ANN (not modified).
        batches: Calibration batches (inputs, ``(input, target)`` pairs, or dicts).
        T: The time step whose output error is minimized.
        levels: n of the MT neurons the thresholds are for.
        budget: Most SNN simulations of the calibration set to spend (at least 1).
        max_batches: Use at most this many batches.
        progress: Show a progress bar.
        rule: The spike rule of the MT neurons to tune for (see the module docstring).
        example, path: How the model is converted (see :func:`ecmt.conversion.build_spiking`).
        per_channel: Search per-channel base thresholds at the Linear inputs (the search runs
            on the channel-scaled histograms of :func:`ecmt.calibration.collect_statistics`).
        refits: Most refits on recorded inputs (step 3 of the module docstring; 0: none).
        samples: Positions recorded per site for the refits (below ``ecmt.fusion.MIN_NUMEL``).
        headroom: The top threshold ``θ·2**(n−1)`` of every site searched is at least this
            many times the largest calibration value of its side (per channel, of its channel;
            :func:`headroom_floor`), so that inputs larger than the calibration's can still be
            passed on. 1 (the default) only keeps the calibration values in range; with few
            calibration inputs and per-channel thresholds, use more, with more ``levels`` so
            that the smallest threshold stays fine (SmolLM2: ``levels=14, headroom=32``). The
            paper's thresholds, the reference, are measured as they are.
        log: Called with one plain line after every simulation (for log files, where a bar is not
            shown): its number, the budget, its error and the best so far.

    Returns:
        Thresholds in the form :func:`ecmt.calibrate` returns, for ``ecmt.convert(model, th,
        levels)``, with ``th.rule == rule`` (so that ``convert`` builds those neurons).
        ``meta`` records the relative output error reached and that of the paper's
        percentile (with this rule), the error of every simulation (``errors``; those of the
        refits also as ``refit_errors``), the factor chosen per site type on the start (refitted, if so),
        the percentile rank of every chosen θ1 (by site and averaged by site type), and the
        search's wall time (``seconds``).

    Example:
        >>> th = ecmt.tune(vit, calib_batches, T=4, levels=8)   # doctest: +SKIP
        >>> snn = ecmt.convert(vit, th, levels=8)               # doctest: +SKIP
    """
    began = time.perf_counter()
    rule = check_rule(rule)
    check_levels(levels)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInputError(f"budget must be a positive integer (simulations to spend), got {budget!r}")
    if isinstance(refits, bool) or not isinstance(refits, int) or refits < 0:
        raise InvalidInputError(f"refits must be a non-negative integer, got {refits!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples < MIN_NUMEL:
        raise InvalidInputError(f"samples must be an integer in 1..{MIN_NUMEL - 1} (positions per site), got {samples!r}")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not math.isfinite(headroom) \
            or headroom < 1:
        raise InvalidInputError(f"headroom must be a number >= 1 (top threshold over the largest calibration "
                                f"value), got {headroom!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = [to_device(model_input(b), device) for b, _ in zip(batches, range(max_batches or 1 << 62))]
    stats = collect_statistics(model, inputs, example=example, path=path, per_channel=per_channel)
    output = registry.family_of(model).output
    model = model.eval()
    refs = [output(model(**x) if isinstance(x, Mapping) else model(x)).float() for x in inputs]

    bar = tqdm(total=budget, desc=f"tuning for T={T}", disable=None if progress is None else not progress, leave=False)
    history: list[float] = []
    snns: list[SpikingModel] = []
    best: tuple[float, Thresholds] = (math.inf, stats.thresholds(REFERENCE_PERCENTILE).with_rule(rule))

    def note(err: float, th: Thresholds) -> None:
        """Count one simulation; keep ``th`` if its error is the lowest so far."""
        nonlocal best
        history.append(err)
        bar.update(1)
        if err < best[0]:
            best = (err, th)
        if log is not None:
            log(f"ecmt: tuning for T = {T}: simulation {len(history)} of at most {budget}, relative error "
                f"{err:.5g} (best {best[0]:.5g}), {time.perf_counter() - began:.0f} s")

    def error(th: Thresholds) -> float:
        """Output error of ``th`` (one simulation)."""
        if not snns:  # converted once; every later simulation only changes the thresholds
            snns.append(convert(model, th, levels, example=example, path=path))
        err = output_error(model, th, inputs, refs, T, levels, snns[0])
        note(err, th)
        return err

    error(best[1])  # 1. the paper's thresholds
    reference_error = history[0]
    floor = headroom_floor(stats, levels, headroom) if headroom > 1 else None
    start = _at_least(stats.apply_scales(lone_neuron_thresholds(stats, T, levels, rule=rule)), floor)  # 2.
    refined, refined_err, refit_errors = start, math.inf, []
    samplers = sample_sites(model, inputs, samples, example=example, path=path) if refits else {}
    for _ in range(min(refits, budget - len(history))):  # 3. refits on the recorded inputs
        if not snns:
            snns.append(convert(model, start, levels, example=example, path=path))
        set_thresholds(snns[0], start)
        err, seqs = recorded_inputs(snns[0], samplers, inputs, refs, T)
        note(err, start)
        refit_errors.append(err)
        if err >= refined_err:
            break
        refined, refined_err = start, err
        start = _at_least(refit(start, samplers, seqs, levels, REFIT_FACTORS), floor)
    start = refined
    types = list(dict.fromkeys(site_type(n) for n in start))
    best_shift, best_err = {t: 0.0 for t in types}, refined_err  # log2 of each site type's factor on ``start``
    best_sites = start.sites  # the thresholds simulated at ``best_shift`` (floored)

    def improves(shift: Mapping[str, float]) -> bool:
        """Simulate ``start`` times ``2**shift`` (if the budget allows); keep it if the error falls."""
        nonlocal best_shift, best_err, best_sites
        if len(history) >= budget:
            return False
        candidate = _at_least(_scaled(start, {n: shift[site_type(n)] for n in start}), floor)
        if best_err < math.inf and candidate.sites == best_sites:
            return False  # raised to the headroom floor: the thresholds of the best, no simulation
        err = error(candidate)
        if err >= best_err:
            return False
        best_shift, best_err, best_sites = dict(shift), err, candidate.sites
        return True

    if refined_err == math.inf:  # no refits: one factor for all sites on the lone-neuron start
        for f in (0.0, 1.0, -1.0):
            improves({t: f for t in types})
        centre = best_shift[types[0]]
        for f in (0.5, -0.5):
            improves({t: centre + f for t in types})
    improved = True
    while improved and len(history) < budget:  # 4. coordinate descent per site type
        improved = False
        for t in types:
            improved = any(improves({**best_shift, t: best_shift[t] + step}) for step in (0.5, -0.5)) or improved
    bar.close()

    final_error, th = best
    def scaled_back(name: str, a: Any) -> float:  # per channel: the threshold on the scaled histogram
        return a[0] / float(stats.scales[name][0]) if isinstance(a, tuple) else a

    by_site = {name: round(stats.percentile_of(name, scaled_back(name, a)), 3) for name, (a, _) in th.items()
               if scaled_back(name, a) > 0}
    by_type: dict[str, list[float]] = defaultdict(list)
    for name, p in by_site.items():
        by_type[site_type(name)].append(p)
    meta = {"tuned_T": T, "levels": levels, "headroom": headroom, "relative_sq_error": final_error, "simulations": len(history),
            "reference_percentile": REFERENCE_PERCENTILE, "reference_error": reference_error, "errors": history,
            "refit_errors": refit_errors,
            "factor_by_site_type": {t: 2.0 ** v for t, v in best_shift.items()},
            "percentile_by_site_type": {t: round(sum(v) / len(v), 3) for t, v in by_type.items()},
            "percentile_by_site": by_site, "seconds": round(time.perf_counter() - began, 1)}
    return Thresholds(th.sites, None, meta, rule, th.example)


def calibrate_or_tune(model: nn.Module, batches: Iterable[Any], levels: int = 8, percentile: Optional[float] = 99.0,
                      *, tune_for: Optional[int] = None, rule: Union[str, SpikeRule, None] = None,
                      per_channel: bool = False, overrides: Optional[Mapping[str, Override]] = None,
                      progress: Optional[bool] = False, log: Optional[Callable[[str], None]] = None,
                      tune_options: Optional[Mapping[str, Any]] = None) -> Thresholds:
    """The base thresholds of a text model from its calibration ``batches``: :func:`tune` for step
    ``tune_for`` (spike rule ``rule``, default ``nearest``) when it is given, else :func:`ecmt.calibrate`
    at ``percentile`` (default 99) with ``overrides``. The sentence encoders' and the causal LMs' path.
    ``progress`` and ``log`` report the search; ``tune_options``: further keyword arguments of
    :func:`tune` (``budget``, ``refits``, ...).

    Raises:
        InvalidInputError: ``overrides`` given with ``tune_for``; ``tune_options`` without
            ``tune_for``, or naming an argument set here or one that :func:`tune` does not take.
    """
    options = dict(tune_options or {})
    if tune_for is None:
        if options:
            raise InvalidInputError(f"tune options ({', '.join(options)}) need a threshold search (tune_for)")
        return calibrate(model, batches, REFERENCE_PERCENTILE if percentile is None else percentile, overrides,
                         per_channel=per_channel)
    if overrides:
        raise InvalidInputError("threshold overrides cannot be combined with tuning")
    own = {"model", "batches", "T", "levels", "rule", "per_channel", "progress", "log"}
    params = inspect.signature(tune).parameters  # (a wrapper taking **kwargs takes anything)
    takes = set(params) if all(p.kind != p.VAR_KEYWORD for p in params.values()) else set(options) - own
    unknown = sorted(set(options) - (takes - own))
    if unknown:
        raise InvalidInputError(f"not an option of the threshold search here: {', '.join(unknown)}")
    return tune(model, batches, T=tune_for, levels=levels, rule=rule or SpikeRule.nearest, per_channel=per_channel,
                progress=progress, log=log, **options)


class _Sampler(nn.Module):
    """Pass-through site of the ANN run that draws ``k`` random positions of its activation per batch.

    Positions at padded tokens of a text batch are never drawn (:func:`real_tokens`). The
    positions (``idx``, flat indices, one tensor per batch) are where the SNN's neuron inputs
    are recorded (:func:`recorded_inputs`).
    """

    def __init__(self, batch_mask: BatchMask, k: int, generator: torch.Generator) -> None:
        super().__init__()
        self.batch_mask, self.k, self.generator = batch_mask, k, generator
        self.idx: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        keep = real_tokens(x, self.batch_mask.mask)
        pool = torch.arange(x.numel(), device=x.device) if keep is None else \
            keep.expand(x.shape).reshape(-1).nonzero().squeeze(1)
        self.idx.append(pool[torch.randperm(pool.numel(), generator=self.generator)[:self.k].to(x.device)])
        return x


def sample_sites(model: nn.Module, inputs: list[Any], samples: int, *, example: Any, path: str,
                 seed: int = 0) -> dict[str, _Sampler]:
    """For every site, ``samples`` random positions of its activation, spread over the batches."""
    batch_mask = BatchMask()
    generator = torch.Generator().manual_seed(seed)
    k = -(-samples // max(len(inputs), 1))
    samplers: dict[str, _Sampler] = {}

    def make(name: str) -> nn.Module:
        samplers[name] = _Sampler(batch_mask, k, generator)
        return samplers[name]

    net = build_spiking(model, make, example=example if example is not None else inputs[0], path=path)
    net.to(next((p.device for p in model.parameters()), torch.device("cpu")))
    for x in inputs:
        batch_mask.set(x)
        reset_net(net)
        net(**x) if isinstance(x, Mapping) else net(x)
    return samplers


@torch.no_grad()
def recorded_inputs(snn: SpikingModel, samplers: Mapping[str, _Sampler], inputs: list[Any], references: list[Tensor],
                    T: int) -> tuple[float, dict[str, Tensor]]:
    """Simulate ``snn`` for T steps; the output error (as :func:`output_error`) and every neuron's inputs.

    Returns:
        ``(error, {site: [T, K]})``: at the sampled positions of each site, the input the
        neuron integrated at each step (for a neuron fed the running mean of its inputs, the
        increment ``t·x̄(t) − (t−1)·x̄(t−1)``).
    """
    seqs: dict[str, list[list[Tensor]]] = {name: [] for name in samplers}
    batch = [0]
    hooks = []
    for name, neuron in snn.neurons():
        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            seqs[name][batch[0]].append(args[0].detach().reshape(-1)[samplers[name].idx[batch[0]]].float())
        hooks.append(neuron.register_forward_pre_hook(hook))
    num = den = 0.0
    try:
        for b, (x, ref) in enumerate(zip(inputs, references)):
            batch[0] = b
            for steps in seqs.values():
                steps.append([])
            *_, out = simulate_steps(snn, x, T)
            w = _valid_positions(x, ref)
            num += float((w * (out - ref) ** 2).sum())
            den += float((w * ref ** 2).sum())
    finally:
        for h in hooks:
            h.remove()
    neurons = dict(snn.neurons())
    out = {}
    for name, per_batch in seqs.items():
        x = torch.cat([torch.stack(steps) for steps in per_batch], dim=1)  # (T, K)
        if neurons[name].mean_input:  # running means -> the increments they integrate
            t = torch.arange(1, T + 1, dtype=torch.float32, device=x.device)[:, None]
            total = x * t
            x = torch.cat([total[:1], total[1:] - total[:-1]])
        out[name] = x
    return num / max(den, 1e-30), out


def fit_factor(seq: Tensor, theta: Tensor, levels: int, rule: SpikeRule, factors: Tensor) -> float:
    """The factor f of ``factors`` for which an MT neuron with thresholds ``f·θ``, driven by the
    recorded inputs ``seq`` ``[T, K]``, best reproduces their mean in its T-step mean.

    ``theta``: the site's thresholds at the sampled positions, ``[2, K]``. A neuron with
    thresholds f·θ on input x is f times one with thresholds θ on x / f, so one neuron with
    per-position thresholds runs every factor (squared error summed over positions; each
    factor alone: with K below :data:`ecmt.fusion.MIN_NUMEL` the steps run eagerly, uncompiled).
    """
    neuron = MTNeuron(theta[0], theta[1], levels, rule)
    target = seq.mean(0)
    errors = torch.zeros(len(factors), dtype=torch.float64)
    for g, f in enumerate(factors.tolist()):
        total = torch.zeros(seq.shape[1])
        neuron.reset()
        for x in seq:
            total += neuron(x / f)
        errors[g] = float(((total * (f / seq.shape[0]) - target) ** 2).double().sum())
    tied = errors <= errors.min() * (1 + 1e-9)  # ties (an idle site): the factor nearest 1
    return float(factors[torch.where(tied, factors.log().abs(), math.inf).argmin()])


def refit(th: Thresholds, samplers: Mapping[str, _Sampler], seqs: Mapping[str, Tensor], levels: int,
          factors: Tensor) -> Thresholds:
    """``th`` with each site's thresholds multiplied by its :func:`fit_factor` on the recorded inputs."""
    scale = {}
    for name, seq in seqs.items():
        idx = torch.cat(samplers[name].idx)
        pos, neg = (torch.as_tensor(v, dtype=torch.float32) for v in th[name])
        if pos.dim():  # per channel: the channel (last dimension) of each sampled position
            c = idx % pos.numel()
            pos, neg = pos[c], neg[c]
        else:
            pos, neg = pos.expand(idx.numel()), neg.expand(idx.numel())
        scale[name] = fit_factor(seq.cpu(), torch.stack([pos, neg]), levels, th.rule, factors)
    return th.scaled(scale)
