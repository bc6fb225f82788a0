"""Figures: energy ratio against T, energy per module, firing rates, accuracy against T,
sentence-embedding fidelity against T.

The energy figures take the dict of :func:`ecmt.energy.energy_report`, the accuracy figures
an ``ecmt evaluate`` or ``ecmt sweep`` record, the fidelity figure a record of
:func:`ecmt.text.evaluate_text` (or the same dicts read back from JSON). Every
function writes one image and returns its path. Figures are drawn on the Agg canvas
directly, so importing this module never changes the global matplotlib backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from matplotlib.figure import Figure

from .energy import module_energy

PathLike = Union[str, Path]


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _by_step(values: Mapping[str, float], scale: float = 1.0) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of a per-step dict keyed by ``str(t)``, in step order."""
    ts = sorted(values, key=int)
    return [int(t) for t in ts], [scale * values[t] for t in ts]


def plot_energy_ratio(report: Mapping[str, Any], path: PathLike) -> Path:
    """E_SNN/E_ANN (Eq. 30) against T, paper convention and full accounting side by side.

    Example:
        >>> plot_energy_ratio(energy_report(m), "energy.png")      # doctest: +SKIP
    """
    fig = Figure(figsize=(9, 3.6))
    series = (("energy_ratio", "paper convention (MACs$_{SNN}$ = 0)"),
              ("energy_ratio_full", "full accounting (remaining MACs)"))
    for i, (key, title) in enumerate(series):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(*_by_step(report[key]), marker="o")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="ANN")
        ax.set(title=title, xlabel="time steps T", ylabel="$E_{SNN}/E_{ANN}$")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_energy_breakdown(report: Mapping[str, Any], path: PathLike, T: Optional[int] = None) -> Path:
    """Energy per module type (summed over the blocks) of the ANN and of the SNN at T steps.

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
    ax.set(xlabel="energy per sample (µJ)", title=f"energy per module, T = {T or report['steps']}")
    ax.legend()
    return _save(fig, path)


def plot_firing_rates(report: Mapping[str, Any], path: PathLike) -> Path:
    """Firing rate on each threshold level over the whole network (paper Fig. 6).

    Example:
        >>> plot_firing_rates(energy_report(m), "firing.png")        # doctest: +SKIP
    """
    levels = report["firing_rates"]["levels"]
    labels = [f"+θ₁·{2 ** k}" for k in range(len(levels["pos"]))]
    labels += [f"−θ₂·{2 ** k}" for k in range(len(levels["neg"]))]
    fig = Figure(figsize=(max(5, 0.5 * len(labels)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(labels)), [*levels["pos"], *levels["neg"]])
    ax.set_xticks(range(len(labels)), labels, rotation=60)
    ax.set(ylabel="spikes per neuron per step", title="firing rate per threshold")
    return _save(fig, path)


def plot_accuracy(result: Mapping[str, Any], path: PathLike) -> Path:
    """SNN top-1 accuracy against T, with the ANN's accuracy as a dashed line.

    Args:
        result: An ``ecmt evaluate`` result (``snn_top1`` keyed by ``str(t)``, ``ann_top1``;
            with ``adaptive``, its accuracy is marked at the mean number of steps).
        path: The image to write.

    Example:
        >>> plot_accuracy(json.load(open("results.json")), "accuracy.png")   # doctest: +SKIP
    """
    title = f"{result['model']} on {result['dataset']}" if "model" in result and "dataset" in result else "accuracy"
    label = f"SNN, n = {result['levels']}, p = {result['percentile']}" if "levels" in result else "SNN"
    return plot_sweep({"ann_top1": result.get("ann_top1"), "runs": [{**result, "label": label}]}, path, title=title)


def plot_sweep(sweep: Mapping[str, Any], path: PathLike, title: str = "accuracy per threshold setting") -> Path:
    """Accuracy against T, one line per setting (paper Fig. 5), and the ANN's accuracy.

    Args:
        sweep: ``{"ann_top1": a or None, "runs": [{"label": str, "snn_top1": {str(t): acc},
            "levels": n, "percentile": p}]}``; runs share a colour per percentile and a line
            style per number of levels. A run's ``adaptive`` result (``{"top1", "mean_steps",
            "patience", "margin"}``) is marked with a star at its mean number of steps.
        path: The image to write.
        title: Figure title.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    # one colour per percentile, one line style per number of levels
    percentiles = list(dict.fromkeys(run.get("percentile") for run in sweep["runs"]))
    levels = list(dict.fromkeys(run.get("levels") for run in sweep["runs"]))
    styles = ("-", "--", ":", "-.")
    for run in sweep["runs"]:
        ax.plot(*_by_step(run["snn_top1"], 100), marker="o", markersize=3,
                color=f"C{percentiles.index(run.get('percentile')) % 10}",
                linestyle=styles[levels.index(run.get("levels")) % len(styles)], label=run["label"])
        if run.get("adaptive"):
            a = run["adaptive"]
            ax.plot([a["mean_steps"]], [100 * a["top1"]], marker="*", markersize=12, linestyle="none",
                    color=f"C{percentiles.index(run.get('percentile')) % 10}", markeredgecolor="black",
                    label=f"adaptive, k = {a['patience']}, m = {a['margin']:g}")
    if sweep.get("ann_top1") is not None:
        ax.axhline(100 * sweep["ann_top1"], color="black", linestyle="--", linewidth=1, label="ANN")
    ax.set(xlabel="time steps T", ylabel="top-1 accuracy (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


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
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)
