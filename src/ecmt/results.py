"""Result records of ``ecmt evaluate`` and ``ecmt sweep``: JSON, CSV and the Table 1 text table.

An evaluation record is a JSON-able dict with at least::

    {"ann_top1": 0.91, "snn_top1": {"1": 0.42, ..., "8": 0.90}, "T": 8, "levels": 8,
     "percentile": 99.0, "n_images": 1000}

Accuracies are fractions in [0, 1]; per-step values are keyed by the time step as a string.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]

EVERY_STEP_UP_TO = 8
"""The table shows every time step up to this one."""


def table_steps(T: int, extra: Iterable[Optional[int]] = ()) -> list[int]:
    """The columns of the table for simulations of T steps.

    Every step up to 8, then the paper's 10 and 12, every 4th from 16, T itself, and the
    steps of ``extra`` (e.g. the step a summary line names), so that a summary never cites a
    step the table leaves out.
    """
    steps = {*range(1, min(T, EVERY_STEP_UP_TO) + 1), *(t for t in (10, 12) if t <= T), *range(16, T + 1, 4), T}
    steps.update(t for t in extra if t is not None and 1 <= t <= T)
    return sorted(steps)


def steps_within(snn_top1: Mapping[str, float], ann_top1: Optional[float], points: float = 1.0) -> Optional[int]:
    """The first t from which the SNN stays within ``points`` percentage points of the ANN.

    Every step from t to the last one simulated must be at most ``points`` below the ANN's
    accuracy: a later dip moves t past the dip. None when the last step is not within.

    Example:
        >>> steps_within({"1": 0.50, "2": 0.4375, "3": 0.5, "4": 0.5625}, 0.5)
        3
    """
    if ann_top1 is None:
        return None
    first = None
    for t in sorted(snn_top1, key=int):
        if snn_top1[t] >= ann_top1 - points / 100 - 1e-12:
            first = int(t) if first is None else first
        else:
            first = None
    return first


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def format_table(rows: Sequence[Mapping[str, Any]], T: int, arch: str) -> str:
    """A text table in the shape of the paper's Table 1.

    Args:
        rows: Records with ``snn_top1`` (and ``ann_top1``); a record's ``label`` names its row,
            ``snn_top5`` (and ``ann_top5``) adds a top-5 row, ``energy_ratio`` (keyed by
            ``str(t)``) an energy row under it, ``steps_within_1pt`` a column for that step if
            the table would skip it, and ``adaptive``
            (``ecmt evaluate --adaptive``) a line under the table.
        T: The last time step simulated.
        arch: The architecture name in the first column.
    """
    steps = table_steps(T, (row.get("steps_within_1pt") for row in rows))
    header = ["Arch.", "Metric", "ANN", *[f"T={t}" for t in steps]]
    lines = []
    for i, row in enumerate(rows):
        first = arch if i == 0 else ""
        label = f"Acc. (%) {row['label']}" if "label" in row else "Acc. (%)"
        lines.append([first, label, _pct(row.get("ann_top1")), *[_pct(row["snn_top1"][str(t)]) for t in steps]])
        if row.get("snn_top5"):
            lines.append(["", "Top-5 (%)", _pct(row.get("ann_top5")), *[_pct(row["snn_top5"][str(t)]) for t in steps]])
        if row.get("energy_ratio"):
            ratio = row["energy_ratio"]
            lines.append(["", "Energy ratio", "1", *[f"{ratio[str(t)]:.2f}" if str(t) in ratio else "n/a"
                                                      for t in steps]])
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()

    rule = "-" * len(fmt(header))
    adaptive = [_adaptive_line(row) for row in rows if row.get("adaptive")]
    return "\n".join([fmt(header), rule, *map(fmt, lines), *adaptive])


def _adaptive_line(row: Mapping[str, Any]) -> str:
    a = row["adaptive"]
    energy = f", energy ratio {a['energy_ratio']:.2f}" if a.get("energy_ratio") is not None else ""
    label = f" {row['label']}" if "label" in row else ""
    return (f"Adaptive{label} (patience {a['patience']}, margin {a['margin']:g}): {_pct(a['top1'])} % "
            f"at {a['mean_steps']:.2f} steps on average{energy}")


def to_json(record: Any) -> str:
    """``record`` as indented, valid JSON: NaN and ±Inf (e.g. a correlation of too few values) become null."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, Mapping):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(record), indent=2, allow_nan=False)


def write_json(record: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``record`` as indented JSON (see :func:`to_json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(record) + "\n", encoding="utf-8")
    return path


def write_csv(rows: Iterable[Mapping[str, Any]], path: PathLike) -> Path:
    """Write one CSV row per record; the columns are the first record's keys."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def per_step_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CSV rows of an evaluation record: one per time step."""
    energy = record.get("energy_ratio") or {}
    energy_full = record.get("energy_ratio_full") or {}
    top5 = record.get("snn_top5") or {}
    return [{"t": int(t), "snn_top1": acc, "ann_top1": record.get("ann_top1"), "snn_top5": top5.get(t),
             "ann_top5": record.get("ann_top5"), "energy_ratio": energy.get(t), "energy_ratio_full": energy_full.get(t)}
            for t, acc in sorted(record["snn_top1"].items(), key=lambda kv: int(kv[0]))]


def sweep_rows(sweep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CSV rows of a sweep record: one per setting and time step."""
    return [{"levels": run["levels"], "percentile": run["percentile"], "t": int(t), "snn_top1": acc,
             "ann_top1": sweep.get("ann_top1"), "energy_ratio": (run.get("energy_ratio") or {}).get(t)}
            for run in sweep["runs"] for t, acc in sorted(run["snn_top1"].items(), key=lambda kv: int(kv[0]))]
