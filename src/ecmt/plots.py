"""Figures: energy ratio against T, energy per module, firing rates, accuracy against T,
accuracy against energy, sentence-embedding fidelity against T, error against depth.

The energy figures take the dict of :func:`ecmt.energy.energy_report`, the accuracy figures
an ``ecmt evaluate`` or ``ecmt sweep`` record, the fidelity figure a record of
:func:`ecmt.text.evaluate_text` (or the same dicts read back from JSON). Every
function writes one image and returns its path. Figures are drawn on the Agg canvas
directly, so importing this module never changes the global matplotlib backend. The file's
suffix chooses the format: ``.png``, or ``.pdf`` and ``.svg`` for papers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .energy import module_energy, split_block

PathLike = Union[str, Path]


def _save(fig: Figure, path: PathLike) -> Path:
    """Write ``fig``; the format is the file's suffix (``.png``, ``.pdf``, ``.svg``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _by_step(values: Mapping[str, float], scale: float = 1.0) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of a per-step dict keyed by ``str(t)``, in step order."""
    ts = sorted(values, key=int)
    return [int(t) for t in ts], [scale * values[t] for t in ts]


def _integer_steps(ax: Any) -> None:
    """Ticks at whole time steps only."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``p`` observed on ``n`` trials (95 % for z = 1.96).

    Example:
        >>> [round(v, 4) for v in wilson_interval(0.9, 100)]
        [0.8256, 0.9448]
    """
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def plot_energy_ratio(report: Mapping[str, Any], path: PathLike) -> Path:
    """E_SNN/E_ANN (Eq. 30) against T, paper convention and full accounting side by side.

    Example:
        >>> plot_energy_ratio(energy_report(m), "energy.png")      # doctest: +SKIP
    """
    return _save(energy_ratio_figure(report), path)


def energy_ratio_figure(report: Mapping[str, Any]) -> Figure:
    """The figure of :func:`plot_energy_ratio`."""
    fig = Figure(figsize=(9, 3.6))
    series = (("energy_ratio", "paper convention (MACs$_{SNN}$ = 0)"),
              ("energy_ratio_full", "full accounting (remaining MACs)"))
    for i, (key, title) in enumerate(series):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(*_by_step(report[key]), marker="o")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="ANN")
        ax.set(title=title, xlabel="time steps T", ylabel="$E_{SNN}/E_{ANN}$")
        _integer_steps(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_energy_breakdown(report: Mapping[str, Any], path: PathLike, T: Optional[int] = None,
                          title: Optional[str] = None) -> Path:
    """Energy per module type (summed over the blocks) of the ANN and of the SNN at T steps.

    ``title`` (the model and setting) heads the figure.

    Example:
        >>> plot_energy_breakdown(energy_report(m), "breakdown.png", T=4)   # doctest: +SKIP
    """
    rows = module_energy(report, T)
    names = list(rows)
    fig = Figure(figsize=(8, 0.35 * len(names) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.27
    bars = (("ann", "ANN"), ("snn", "SNN, paper convention"), ("snn_full", "SNN, full accounting"))
    for i, (key, label) in enumerate(bars):
        ax.barh([j + (i - 1) * height for j in range(len(names))], [rows[n][key] * 1e-6 for n in names],
                height=height, label=label)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="energy per sample (µJ)", ylabel="module (summed over the blocks)",
           title=f"{title + ': ' if title else ''}energy per module, T = {T or report['steps']}")
    ax.legend()
    return _save(fig, path)


def site_type_rates(rates: Mapping[str, Any]) -> dict[str, float]:
    """Firing rate per site type: a site's path inside its block (``attn.qkv.neuron``), its rate
    averaged over the blocks; sites outside the blocks keep their path.

    Args:
        rates: :func:`ecmt.energy.firing_rates` (``"sites": {site: {"rate", ...}}``).
    """
    groups: dict[str, list[float]] = {}
    for site, r in rates["sites"].items():
        groups.setdefault(split_block(site)[1], []).append(r["rate"])
    return {name: sum(v) / len(v) for name, v in groups.items()}


def firing_rate_figure(report: Mapping[str, Any], title: Optional[str] = None) -> Figure:
    """The figure of :func:`plot_firing_rates`."""
    rates = report["firing_rates"]
    levels = rates["levels"]
    panels = [("per threshold level (whole network)",
               [f"+θ₁·{2 ** k}" for k in range(len(levels["pos"]))]
               + [f"−θ₂·{2 ** k}" for k in range(len(levels["neg"]))],
               [*levels["pos"], *levels["neg"]], "threshold")]
    if rates.get("layers"):
        panels.append(("per layer", list(rates["layers"]), list(rates["layers"].values()), "layer"))
    if rates.get("sites"):
        types = site_type_rates(rates)
        panels.append(("per site type (mean over blocks)", list(types), list(types.values()), "site type"))
    width = sum(max(3.0, 0.32 * len(labels)) for _, labels, _, _ in panels) + 1
    fig = Figure(figsize=(width, 4.6))
    ratios = [max(3.0, 0.32 * len(labels)) for _, labels, _, _ in panels]
    axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
    for ax, (name, labels, values, xlabel) in zip(axes, panels):
        ax.bar(range(len(labels)), values)
        ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize="small", ha="right")
        ax.set(xlabel=xlabel, ylabel="spikes per neuron per step", title=name)
        positive = [v for v in values if v > 0]
        if positive and max(positive) > 20 * min(positive):  # most bars near zero: a log scale shows them
            ax.set_yscale("log")
            ax.set_ylim(min(positive) / 2, max(positive) * 2)
        ax.grid(alpha=0.3, axis="y")
    mean = rates.get("mean")
    fig.suptitle((title or "firing rates") + (f"; mean rate {mean:.3f}" if mean is not None else ""))
    return fig


def plot_firing_rates(report: Mapping[str, Any], path: PathLike, title: Optional[str] = None) -> Path:
    """Firing rates per threshold level (paper Fig. 6), per layer and per site type.

    A panel's y axis is logarithmic when its rates span more than a factor 20.

    Args:
        report: :func:`ecmt.energy.energy_report` (or its ``firing_rates`` inside a dict).
        path: The image to write.
        title: What was measured (model, T, setting), at the top of the figure.

    Example:
        >>> plot_firing_rates(energy_report(m), "firing.png", title="vit, T = 4, p = 99")   # doctest: +SKIP
    """
    return _save(firing_rate_figure(report, title), path)


def plot_accuracy(result: Mapping[str, Any], path: PathLike) -> Path:
    """SNN top-1 accuracy against T, with the ANN's accuracy and a band of ANN ± 1 point.

    Each step carries its 95 % Wilson interval on the ``n_images`` evaluated; the y axis is
    zoomed to the data (see :func:`accuracy_figure`).

    Args:
        result: An ``ecmt evaluate`` result (``snn_top1`` keyed by ``str(t)``, ``ann_top1``,
            ``n_images``; with ``adaptive``, its accuracy is marked at the mean number of steps).
        path: The image to write.

    Example:
        >>> plot_accuracy(json.load(open("results.json")), "accuracy.png")   # doctest: +SKIP
    """
    return _save(accuracy_figure(_one_run(result), title=_title(result)), path)


def _title(result: Mapping[str, Any]) -> str:
    return f"{result['model']} on {result['dataset']}" if "model" in result and "dataset" in result else "accuracy"


def _one_run(result: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation result as a sweep of one setting."""
    label = result.get("label") or (f"SNN, n = {result['levels']}, p = {result['percentile']}"
                                    if "levels" in result else "SNN")
    return {"ann_top1": result.get("ann_top1"), "n_images": result.get("n_images"),
            "runs": [{**result, "label": label}]}


def plot_sweep(sweep: Mapping[str, Any], path: PathLike, title: str = "accuracy per threshold setting") -> Path:
    """Accuracy against T, one line per setting (paper Fig. 5), and the ANN's accuracy.

    Args:
        sweep: ``{"ann_top1": a or None, "n_images": n, "runs": [{"label": str, "snn_top1":
            {str(t): acc}, "levels": n, "percentile": p}]}``; runs share a colour per percentile
            and a marker and line style per number of levels. A run's ``adaptive`` result
            (``{"top1", "mean_steps", "patience", "margin"}``) is marked with a star at its
            mean number of steps.
        path: The image to write.
        title: Figure title.
    """
    return _save(accuracy_figure(sweep, title), path)


MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)))
DODGE = 0.08
"""Horizontal offset, in steps, between the intervals of neighbouring runs."""
ZOOM_POINTS = 15.0
"""The accuracy axis reaches at most this many points below the ANN; lower values are marked at its edge."""


def _styles(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A colour per percentile, a marker and a line style per number of levels."""
    percentiles = list(dict.fromkeys(run.get("percentile") for run in runs))
    levels = list(dict.fromkeys(run.get("levels") for run in runs))
    out = []
    for run in runs:
        i, j = percentiles.index(run.get("percentile")), levels.index(run.get("levels"))
        out.append({"color": f"C{i % 10}", "marker": MARKERS[j % len(MARKERS)],
                    "linestyle": LINESTYLES[j % len(LINESTYLES)]})
    return out


def accuracy_figure(sweep: Mapping[str, Any], title: str) -> Figure:
    """Accuracy against T for every run of ``sweep`` (see :func:`plot_sweep`).

    The y axis spans the data, the ANN ± 1 point band and the intervals, but at most
    ``ZOOM_POINTS`` below the ANN: the region where the SNN approaches the ANN is what matters,
    and lower accuracies (at T = 1, say) are drawn as triangles at the axis's lower edge with
    their value. With ``n_images``, every step has its 95 % Wilson interval.
    """
    fig = Figure(figsize=(6.8, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    ann, n = sweep.get("ann_top1"), sweep.get("n_images")
    runs = sweep["runs"]
    lows, highs = [], []
    for k, (run, style) in enumerate(zip(runs, _styles(runs))):
        steps, acc = _by_step(run["snn_top1"])
        label = run["label"] + (f" (95 % Wilson, n = {n})" if n and len(runs) == 1 else "")
        if n:
            lo, hi = zip(*(wilson_interval(a, n) for a in acc))
            dodge = DODGE * (k - (len(runs) - 1) / 2)  # the intervals of several runs side by side
            ax.errorbar([t + dodge for t in steps], [100 * a for a in acc],
                        yerr=[[100 * (a - l) for a, l in zip(acc, lo)], [100 * (h - a) for a, h in zip(acc, hi)]],
                        capsize=2, markersize=4, elinewidth=0.8, label=label, **style)
            lows += [100 * v for v in lo]
            highs += [100 * v for v in hi]
        else:
            ax.plot(steps, [100 * a for a in acc], markersize=4, label=label, **style)
            lows += [100 * a for a in acc]
            highs += [100 * a for a in acc]
        if run.get("adaptive"):
            a = run["adaptive"]
            ax.plot([a["mean_steps"]], [100 * a["top1"]], marker="*", markersize=13, linestyle="none",
                    color=style["color"], markeredgecolor="black",
                    label=f"adaptive, k = {a['patience']}, m = {a['margin']:g}")
            lows.append(100 * a["top1"])
            highs.append(100 * a["top1"])
    if ann is not None:
        ax.axhline(100 * ann, color="black", linestyle="--", linewidth=1,
                   label=f"ANN {100 * ann:.2f} %" + (f" (n = {n})" if n else ""))
        ax.axhspan(100 * ann - 1, 100 * ann + 1, color="grey", alpha=0.2, label="ANN ± 1 point")
        lows.append(100 * ann - 1)
        highs.append(100 * ann + 1)
    bottom, top = min(lows), max(highs)
    if ann is not None:
        bottom = max(bottom, 100 * ann - ZOOM_POINTS)
    pad = max(0.05 * (top - bottom), 0.2)
    bottom, top = max(bottom - pad, 0.0), min(top + pad, 100.0)
    ax.set_ylim(bottom, top)
    for k, (run, style) in enumerate(zip(runs, _styles(runs))):
        _mark_below(ax, *_by_step(run["snn_top1"], 100), bottom, style["color"], k)
    ax.set(xlabel="time steps T", ylabel="top-1 accuracy (%)", title=title)
    _integer_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _mark_below(ax: Any, xs: Sequence[float], ys: Sequence[float], bottom: float, color: str, row: int = 0) -> None:
    """Draw the points below the zoomed y axis as triangles at its lower edge, with their value
    (the values of run ``row`` stacked above those of the previous runs)."""
    for x, y in zip(xs, ys):
        if y < bottom:
            ax.plot([x], [bottom], marker="v", color=color, clip_on=False, linestyle="none")
            ax.annotate(f"{y:.1f}", (x, bottom), textcoords="offset points", xytext=(0, 6 + 8 * row), ha="center",
                        fontsize="x-small", color=color)


def accuracy_energy_figure(sweep: Mapping[str, Any], title: str) -> Figure:
    """The figure of :func:`plot_accuracy_energy`."""
    fig = Figure(figsize=(6.8, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    runs = [run for run in sweep["runs"] if run.get("energy_ratio")]
    curves = []
    for run, style in zip(runs, _styles(runs)):
        ratio = run["energy_ratio"]
        steps = [t for t in sorted(run["snn_top1"], key=int) if t in ratio]
        x, y = [ratio[t] for t in steps], [100 * run["snn_top1"][t] for t in steps]
        curves.append((x, y, style["color"]))
        ax.plot(x, y, markersize=4, label=run["label"], **style)
        for t, xi, yi in zip(steps, x, y):
            if int(t) in (1, 2, 4) or int(t) % 4 == 0 or t == steps[-1]:
                ax.annotate(f"T={t}", (xi, yi), textcoords="offset points", xytext=(3, -10), fontsize="x-small",
                            color=style["color"])
        a = run.get("adaptive")
        if a and a.get("energy_ratio") is not None:
            ax.plot([a["energy_ratio"]], [100 * a["top1"]], marker="*", markersize=13, linestyle="none",
                    color=style["color"], markeredgecolor="black",
                    label=f"adaptive, k = {a['patience']}, m = {a['margin']:g} ({a['mean_steps']:.2f} steps)")
    ann = sweep.get("ann_top1")
    if ann is not None:
        ax.axhline(100 * ann, color="black", linestyle="--", linewidth=1, label=f"ANN {100 * ann:.2f} %")
        ax.axhspan(100 * ann - 1, 100 * ann + 1, color="grey", alpha=0.2, label="ANN ± 1 point")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1, label="energy of the ANN")
        lowest = min([100 * ann - 1, *(v for _, y, _ in curves for v in y)])
        bottom = max(lowest, 100 * ann - ZOOM_POINTS)
        bottom -= max(0.05 * (100 * ann + 1 - bottom), 0.2)
        ax.set_ylim(bottom=bottom)
        for k, (x, y, color) in enumerate(curves):
            _mark_below(ax, x, y, bottom, color, k)
    ax.set(xlabel="energy ratio $E_{SNN}/E_{ANN}$ (Eq. 30, paper convention)", ylabel="top-1 accuracy (%)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_accuracy_energy(sweep: Mapping[str, Any], path: PathLike, title: str = "accuracy against energy") -> Path:
    """Accuracy against energy ratio: one point per T, one line per setting (the trade-off curve).

    Args:
        sweep: As for :func:`plot_sweep`, with each run's ``energy_ratio`` (keyed by
            ``str(t)``); a run's ``adaptive`` result with an ``energy_ratio`` is a star. An
            ``ecmt evaluate`` result is a sweep of one run (``{"runs": [result], ...}``).
        path: The image to write.
        title: Figure title.

    Example:
        >>> plot_accuracy_energy(json.load(open("sweep.json")), "accuracy_energy.pdf")   # doctest: +SKIP
    """
    return _save(accuracy_energy_figure(sweep if "runs" in sweep else _one_run(sweep), title), path)


TEXT_FIDELITY = (("cosine", "mean cosine similarity"), ("cosine_min", "lowest cosine similarity"),
                 ("rank_agreement", "rank agreement (Spearman)"))
"""The per-step series of a text evaluation record that :func:`plot_text_fidelity` draws."""


def plot_text_fidelity(result: Mapping[str, Any], path: PathLike) -> Path:
    """Fidelity of the SNN's sentence embeddings to the ANN's against T.

    Left: the mean and lowest cosine similarity and the rank agreement. Right: their
    distance from the ANN's value 1, on a log scale, which shows the convergence.

    Args:
        result: A record of :func:`ecmt.text.evaluate_text` (``cosine``, ``cosine_min``,
            ``rank_agreement`` keyed by ``str(t)``; ``model``, ``levels``, ``percentile``).
        path: The image to write.

    Example:
        >>> plot_text_fidelity(evaluate_text("minilm", T=16), "fidelity.png")   # doctest: +SKIP
    """
    setting = "tuned" if result.get("tuned") else f"p = {result.get('percentile')}"
    title = f"{result.get('model', 'SNN')}, n = {result.get('levels')}, {setting}"
    fig = Figure(figsize=(10, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (key, label) in enumerate(TEXT_FIDELITY):
        if key not in result:
            continue
        steps, values = _by_step(result[key])
        left.plot(steps, values, marker="o", markersize=3, color=f"C{i}", label=label)
        right.plot(steps, [max(1.0 - v, 1e-6) for v in values], marker="o", markersize=3, color=f"C{i}", label=label)
    left.axhline(1.0, color="black", linestyle="--", linewidth=1, label="ANN")
    left.set(xlabel="time steps T", ylabel="similarity to the ANN", title=title)
    right.set(xlabel="time steps T", ylabel="1 − similarity", yscale="log", title="distance from the ANN")
    return _save_steps(fig, (left, right), path)


def _save_steps(fig: Figure, axes: tuple, path: PathLike) -> Path:
    """Integer T ticks, a grid and a legend on each of ``axes``; then save ``fig``."""
    for ax in axes:
        _integer_steps(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_perplexity(result: Mapping[str, Any], path: PathLike) -> Path:
    """Perplexity of the SNN against T beside the ANN's, and next-token agreement with the ANN.

    Args:
        result: A record of :func:`ecmt.lm.evaluate_lm` (``ppl``, ``agreement`` keyed by
            ``str(t)``; ``ann_ppl``, ``model``, ``levels``, ``percentile``).
        path: The image to write.
    """
    title = f"{result.get('model', 'SNN')}, n = {result.get('levels')}, p = {result.get('percentile')}"
    fig = Figure(figsize=(10, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps, values = _by_step(result["ppl"])
    left.plot(steps, values, marker="o", markersize=3, color="C0", label="SNN")
    left.axhline(result["ann_ppl"], color="black", linestyle="--", linewidth=1, label="ANN")
    left.set(xlabel="time steps T", ylabel="perplexity", yscale="log", title=title)
    steps, values = _by_step(result["agreement"], 100.0)
    right.plot(steps, values, marker="o", markersize=3, color="C1", label="top-1 agreement")
    right.set(xlabel="time steps T", ylabel="next-token agreement with the ANN (%)", ylim=(0, 100),
              title="agreement with the ANN")
    return _save_steps(fig, (left, right), path)


def plot_error_depth(record: Mapping[str, Any], path: PathLike) -> Path:
    """Error against depth and by site type, from an error analysis (:func:`ecmt.analysis.analyze`).

    Left: per block (x: its index), its share of the output error (view ``alone``: its error
    when only it spikes, over the sum of those of all blocks) and the share of the error
    removed when it is exact (view ``removed``), with the mean local error of its sites on the
    right axis. Right: the share per site type (the same site in every block), largest first.

    Args:
        record: An ``ecmt analyze`` record (``layers``, ``site_types``, ``error``, ``T``,
            ``model``, ``metric``).
        path: The image to write.
    """
    setting = "tuned" if record.get("tuned") else f"p = {record.get('percentile')}"
    title = (f"{record.get('model', 'SNN')}, T = {record.get('T')}, n = {record.get('levels')}, {setting}"
             f"{', per channel' if record.get('per_channel') else ''}")
    layers, types = record["layers"], record["site_types"]
    fig = Figure(figsize=(12, max(4.5, 0.3 * len(types) + 1.5)))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xs = [e["index"] for e in layers]
    series = (("share", "only this block spiking (alone, normalised)", "o"),
              ("removed", "removed when this block is exact", "s"))
    for i, (key, label, marker) in enumerate(series):
        if layers and key in layers[0]:
            left.plot(xs, [100 * e[key] for e in layers], marker=marker, markersize=4, color=f"C{i}", label=label)
    left.axhline(0.0, color="grey", linewidth=0.8)
    local = left.twinx()
    local.plot(xs, [e["local_error"] for e in layers], color="C2", linestyle=":", marker=".", label="mean local error")
    local.set_ylabel("local error of the sites (relative)", color="C2")
    left.set(xlabel="block (depth)", ylabel="share of the output error (%)")
    left.set_title(f"{title}\n{record.get('metric', 'error')}, all spiking: {record['error']:.4g}", fontsize="medium")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    handles = left.get_legend_handles_labels()[0] + local.get_legend_handles_labels()[0]
    left.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    names = list(types)
    key = "share" if names and "share" in types[names[0]] else "removed"
    right.barh(range(len(names)), [100 * types[n][key] for n in names], color="C0")
    right.set_yticks(range(len(names)), [n.replace(".neuron", "") for n in names], fontsize="small")
    right.invert_yaxis()
    right.set(xlabel="share of the error (%)" if key == "share" else "share of the error removed (%)",
              title="by site type" + (" (alone, normalised)" if key == "share" else " (exact)"))
    right.grid(alpha=0.3, axis="x")
    return _save(fig, path)
