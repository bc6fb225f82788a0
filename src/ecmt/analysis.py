"""Error analysis of a converted model at step T: which site types, layers, sites and channels cause the error.

An SNN's output error at step T is what its MT neurons leave in their membranes (the residual
of Eq. 24 summed over the steps), carried to the output. :func:`analyze` measures it on
held-out inputs (never the calibration data), for any converted model (adapter or graph
path; image, text encoder or causal LM), given a function ``error(snn)`` that simulates
them to step T and returns one number that is 0 when the SNN equals the ANN:

* **local error** of every site, from one simulation of the whole SNN: the relative squared
  error of the T-step mean of the neuron's spikes against the T-step mean of its input,
  ``Σ‖Σ_t s(t) − Σ_t I(t)‖² / Σ‖Σ_t I(t)‖²`` over the inputs (the site's residual membrane;
  padded positions of text batches count too). At the Linear inputs with the largest local
  error (``worst_sites``), each channel's part of that residual: the channels are the last
  dimension, the Linear's input channels, where LLMs have their outliers (``rms_over_median``:
  a channel's RMS T-step mean input over the median channel's);
* **downstream effect, alone** (view ``"alone"``): the output error when only one group of
  sites spikes and every other site is exact (:func:`exact_sites`: it passes its input on
  unquantized). Groups are the site types (the same site in every block,
  :func:`ecmt.tuning.site_type`) and the blocks (``blocks.3``, ``encoder.layer.5``; sites
  outside the blocks form one more group). A group's ``share`` is its error over the sum of the
  errors of its grouping, so the shares of the types, and those of the blocks with the outside
  group, sum to 1; ``additivity`` is that sum over the error with every site spiking (about 1
  when the errors add up; above 1 when they cancel, below 1 when they compound);
* **downstream effect, removed** (view ``"removed"``, optional): the error with one group
  exact and the rest spiking; ``removed`` is the share of the whole SNN's error that disappears.
  These do not sum to 1: errors compound through the layers.

Cost: one simulation of the held-out inputs per group and view, plus the whole SNN and the
all-exact check (which must give 0): ``2 + views × (types + blocks (+ 1 outside))``; with one
view 22 for a 12-layer encoder with 8 site types, 42 for a 30-layer LM with 9. Measuring every site's
downstream effect would cost one simulation per site (96 and 270), which is why sites are
ranked by their local error only.

Example:
    >>> snn = ecmt.convert(model, ecmt.calibrate(model, calib_batches), levels=8)   # doctest: +SKIP
    >>> record = analyze(snn, output_error_of(model, heldout_batches, T=4))          # doctest: +SKIP
    >>> record["site_types"], record["layers"]                                       # doctest: +SKIP
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import registry
from .calibration import _is_linear_input, model_input, to_device
from .conversion import SpikingModel
from .energy import split_block
from .errors import InvalidInputError
from .neurons import MTNeuron
from .tuning import output_error, site_type

VIEWS = ("alone", "removed")
"""The downstream measurements: only one group spiking, or only one group exact."""
OUTSIDE = "outside blocks"
"""The group of the sites outside any block (patch embedding, head, ``lm_head``)."""

Error = Callable[[SpikingModel], float]
"""Simulates the held-out inputs to step T with the SNN as it is, returns its output error (0: the ANN)."""


@contextmanager
def exact_sites(snn: SpikingModel, exact: Callable[[str], bool]) -> Iterator[None]:
    """Inside the ``with`` block, the MT neurons of the sites for which ``exact(name)`` holds pass their
    input on unquantized (:attr:`ecmt.neurons.MTNeuron.exact`); all spike again afterwards."""
    neurons = list(snn.neurons())
    try:
        for name, neuron in neurons:
            neuron.exact = bool(exact(name))
        yield
    finally:
        for _, neuron in neurons:
            neuron.exact = False


def block_of(name: str) -> str:
    """The block a site belongs to (``encoder.layer.5``), or :data:`OUTSIDE`."""
    return split_block(name)[0] or OUTSIDE


class _Residuals:
    """Forward hooks on every MT neuron that sum, per simulation, its inputs and its spikes,
    and accumulate over the simulations the squared residual ``Σ_t I − Σ_t s`` (per channel at
    the Linear inputs)."""

    def __init__(self, snn: SpikingModel) -> None:
        self.totals: dict[str, list[Optional[Tensor]]] = {}
        self.sq: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # residual², input²
        self.channels: dict[str, Optional[list[Tensor]]] = {}  # residual² and input² per channel, rows
        self.rows: dict[str, int] = defaultdict(int)
        self.handles = []
        for name, neuron in snn.neurons():
            self.handles.append(neuron.register_forward_pre_hook(self._pre(name)))
            self.handles.append(neuron.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Callable:
        def hook(neuron: MTNeuron, args: tuple) -> None:
            if neuron.v is None:  # reset: a new simulation starts
                self._flush(name)

        return hook

    def _post(self, name: str) -> Callable:
        def hook(neuron: MTNeuron, args: tuple, out: Tensor) -> None:
            x = args[0].float()
            inp, spikes = self.totals.get(name, (None, None))
            # a linked neuron receives the running mean x̄(t) of its inputs: their sum is t·x̄(t)
            inp = x * neuron.t if neuron.mean_input else (x.clone() if inp is None else inp.add_(x))
            spikes = out.float().clone() if spikes is None else spikes.add_(out.float())
            self.totals[name] = [inp, spikes]

        return hook

    def _flush(self, name: str) -> None:
        inp, spikes = self.totals.pop(name, (None, None))
        if inp is None:
            return
        r = inp - spikes  # the residual membrane, Σ_t I − Σ_t s (Eq. 24 summed over time)
        sq = self.sq[name]
        sq[0] += float(r.double().pow(2).sum())
        sq[1] += float(inp.double().pow(2).sum())
        self.rows[name] += r.numel() // r.shape[-1]
        if not _is_linear_input(name):
            return
        per = [r.double().pow(2).reshape(-1, r.shape[-1]).sum(0), inp.double().pow(2).reshape(-1, r.shape[-1]).sum(0)]
        old = self.channels.get(name, [])
        if old is None or (old and old[0].shape != per[0].shape):
            self.channels[name] = None  # the last dimension varies: no channels
        else:
            self.channels[name] = per if not old else [a + b for a, b in zip(old, per)]

    def close(self) -> None:
        for name in list(self.totals):
            self._flush(name)
        for h in self.handles:
            h.remove()


def _channels(res: Tensor, inp: Tensor, rows: int, T: int, top: int) -> dict[str, Any]:
    """The ``top`` channels with the largest part of a site's residual, with their size."""
    share = res / res.sum().clamp_min(1e-300)
    rms = (inp / max(rows, 1)).sqrt() / T  # RMS over positions of the channel's T-step mean input
    median = float(rms.median().clamp_min(1e-30))
    order = share.argsort(descending=True)[:top]
    return {"channels": int(res.numel()),
            "top_share": round(float(share[order].sum()), 6),
            "top": [{"channel": int(c), "share": round(float(share[c]), 6), "rms_input": round(float(rms[c]), 6),
                     "rms_over_median": round(float(rms[c]) / median, 3)} for c in order.tolist()]}


def _sorted(groups: Mapping[str, dict[str, Any]], view: Optional[str]) -> dict[str, dict[str, Any]]:
    if view is None:
        return dict(groups)
    key = "share" if view == "alone" else "removed"
    return dict(sorted(groups.items(), key=lambda kv: -kv[1][key]))


def analyze(snn: SpikingModel, error: Error, *, T: int, views: Iterable[str] = ("alone",), channels: int = 8,
            worst: int = 5, progress: Optional[bool] = False,
            log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Error shares of ``snn`` at step T by site type and by block, local errors by site, channels at the worst sites.

    Args:
        snn: The converted model (with the thresholds to analyse).
        error: Simulates the held-out inputs to step ``T`` and returns the output error (see
            :data:`Error`), e.g. :func:`output_error_of`, :func:`ecmt.text.embedding_error`,
            :func:`ecmt.lm.next_token_kl`. Called ``2 + groups × views`` times.
        T: The step ``error`` measures (for the local errors' scale and the record).
        views: Downstream measurements, among :data:`VIEWS` (see the module docstring).
        channels: Channels listed per worst site (0: none).
        worst: Linear inputs (sites ``*.neuron``) with the largest local error whose channels are listed.
        progress: Show a progress bar over the simulations (None: on terminals).
        log: Called with one line per simulation (for log files).

    Returns:
        ``{"error", "all_exact_error", "views", "site_types": {type: {...}}, "layers": [{...} per
        block, in depth order], "outside": {...} or None, "additivity": {"site_types", "layers"},
        "sites": {site: {"type", "block", "local_error"}}, "worst_sites": [...], "levels",
        "percentile", "rule", "per_channel", "tuned", "path", "T"}``. A group's entry holds
        ``sites`` (how many), ``local_error`` (mean over its sites), and per view ``alone`` and
        ``share``, or ``removed`` (with ``error_exact``, the error with the group exact).

    Raises:
        InvalidInputError: An unknown view, or an SNN without MT neurons.
    """
    views = list(dict.fromkeys(views))
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise InvalidInputError(f"unknown view {bad[0]!r}: choose among {', '.join(VIEWS)}")
    names = [name for name, _ in snn.neurons()]
    if not names:
        raise InvalidInputError("the SNN has no MT neurons to analyse")
    types = list(dict.fromkeys(site_type(n) for n in names))
    blocks = list(dict.fromkeys(block_of(n) for n in names))
    groups = {"site_types": {t: (lambda n, t=t: site_type(n) == t) for t in types},
              "layers": {b: (lambda n, b=b: block_of(n) == b) for b in blocks}}
    total = 2 + len(views) * (len(types) + len(blocks))
    bar = tqdm(total=total, desc=f"analysing at T={T}", disable=None if progress is None else not progress,
               leave=False)
    done = 0

    def measure(label: str, exact: Callable[[str], bool]) -> float:
        nonlocal done
        with exact_sites(snn, exact):
            value = float(error(snn))
        done += 1
        bar.update(1)
        if log is not None:
            log(f"ecmt: analysis {done}/{total}: {label}: error {value:.6g}")
        return value

    hooks = _Residuals(snn)
    try:
        base = measure("all sites spiking", lambda n: False)
    finally:
        hooks.close()
    all_exact = measure("all sites exact", lambda n: True)
    results: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in groups}
    for kind, members in groups.items():
        for g, inside in members.items():
            results[kind][g] = entry = {"sites": sum(map(inside, names))}
            if "alone" in views:
                entry["alone"] = measure(f"only {g} spiking", lambda n, inside=inside: not inside(n))
            if "removed" in views:
                err = measure(f"{g} exact", inside)
                entry["error_exact"] = err
                entry["removed"] = round((base - err) / base, 6) if base > 0 else 0.0
    bar.close()

    local = {n: hooks.sq[n][0] / max(hooks.sq[n][1], 1e-300) for n in names}
    additivity = {}
    for kind in groups:
        if "alone" in views:
            alone_sum = sum(e["alone"] for e in results[kind].values())
            for e in results[kind].values():
                e["share"] = round(e["alone"] / alone_sum, 6) if alone_sum > 0 else 0.0
            additivity[kind] = round(alone_sum / base, 6) if base > 0 else None
        for g, e in results[kind].items():
            members = [n for n in names if groups[kind][g](n)]
            e["local_error"] = round(sum(local[n] for n in members) / len(members), 6)
    layers = sorted(({"block": b, "index": int(b.rsplit(".", 1)[-1]), **e}
                     for b, e in results["layers"].items() if b != OUTSIDE), key=lambda e: e["index"])
    view = views[0] if views else None
    worst_sites = []
    for n in sorted(filter(_is_linear_input, names), key=lambda n: -local[n])[:worst]:
        site = {"site": n, "local_error": round(local[n], 6)}
        per = hooks.channels.get(n)
        if channels > 0 and per is not None:
            site.update(_channels(per[0], per[1], hooks.rows[n], T, channels))
        worst_sites.append(site)
    th = snn.thresholds
    return {
        "T": T, "levels": snn.levels, "percentile": th.percentile, "rule": th.rule.value,
        "per_channel": bool(th.per_channel()), "tuned": dict(th.meta) or None, "path": getattr(snn, "path", None),
        "error": base, "all_exact_error": all_exact, "views": views, "simulations": done,
        "site_types": _sorted(results["site_types"], view),
        "layers": layers, "outside": results["layers"].get(OUTSIDE),
        "additivity": additivity or None,
        "sites": {n: {"type": site_type(n), "block": block_of(n), "local_error": round(local[n], 6)} for n in names},
        "worst_sites": worst_sites,
    }


def output_error_of(model: nn.Module, batches: Iterable[Any], T: int) -> Error:
    """The relative squared error of the model's output at step T on ``batches`` (:func:`ecmt.tuning.output_error`).

    The generic :data:`Error`, for classifiers and any model without a task measure; padded
    token positions of text batches are left out. The ANN's outputs are computed once, here.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = [to_device(model_input(b), device) for b in batches]
    output = registry.family_of(model).output
    with torch.no_grad():
        refs = [output(model(**x) if isinstance(x, Mapping) else model(x)).float() for x in inputs]
    if not inputs:
        raise InvalidInputError("no inputs to analyse the error on")
    return lambda snn: output_error(model, snn.thresholds, inputs, refs, T, snn.levels, snn)

