"""Base thresholds per spiking site: the result of calibration, the input of conversion."""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Optional, Union

from .errors import ThresholdError
from .neurons import SpikeRule, check_rule

Override = Union[float, tuple[float, float]]


@dataclass(frozen=True)
class Thresholds(Mapping[str, tuple[float, float]]):
    """Base thresholds ``(θ1, θ2)`` per site name; θ2 is the magnitude of the negative one.

    A site is named by the dotted path of its neuron in the converted network, e.g.
    ``blocks.0.attn.qkv.neuron`` (input of a Linear) or ``blocks.0.attn.attn_neuron`` (the
    softmax output). A value of 0 disables that side of the neuron.

    Attributes:
        sites: The thresholds.
        percentile: The percentile p they were calibrated at, if any.
        meta: How they were found (the search's record, for tuned thresholds).
        rule: The MT neurons' spike rule they are meant for (:class:`ecmt.neurons.SpikeRule`;
            a name such as ``"nearest"`` is accepted):
            :func:`ecmt.convert` builds its neurons with it unless told otherwise.
        example: The shapes and dtypes of the calibration input (see
            :func:`ecmt.graph.capture.signature`), from which :func:`ecmt.convert` makes the
            example input that graph capture needs, unless it is given one.
    """

    sites: Mapping[str, tuple[float, float]]
    percentile: Optional[float] = None
    meta: Mapping[str, object] = field(default_factory=dict)
    rule: SpikeRule = SpikeRule.eq25
    example: Optional[Mapping[str, object]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", check_rule(self.rule, ThresholdError))
        for name, pair in self.sites.items():
            if len(pair) != 2 or not all(math.isfinite(v) and v >= 0 for v in pair):
                raise ThresholdError(f"site {name}: thresholds must be two finite numbers >= 0, got {pair}")
        object.__setattr__(self, "sites", {k: (float(a), float(b)) for k, (a, b) in self.sites.items()})

    def __getitem__(self, name: str) -> tuple[float, float]:
        return self.sites[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def with_overrides(self, overrides: Mapping[str, Override]) -> "Thresholds":
        """Apply per-site overrides.

        Args:
            overrides: Keys are site names or ``fnmatch`` patterns (``"*.attn_neuron"``);
                later keys win. A float sets both base thresholds, a pair sets ``(θ1, θ2)``.

        Raises:
            ThresholdError: A pattern matches no site.
        """
        sites = dict(self.sites)
        for pattern, value in overrides.items():
            names = [n for n in sites if fnmatch.fnmatchcase(n, pattern)]
            if not names:
                raise ThresholdError(f"override {pattern!r} matches no site")
            pair = (float(value), float(value)) if isinstance(value, (int, float)) else tuple(value)
            for n in names:
                sites[n] = pair
        return replace(self, sites=sites, meta=dict(self.meta))

    def with_rule(self, rule: Union[str, SpikeRule]) -> "Thresholds":
        """The same thresholds, for neurons with spike rule ``rule``."""
        return replace(self, rule=rule)

    def to_json(self) -> str:
        return json.dumps({"percentile": self.percentile, "rule": self.rule.value, "meta": dict(self.meta),
                           "example": self.example, "sites": {k: list(v) for k, v in self.sites.items()}})

    @classmethod
    def from_json(cls, text: str) -> "Thresholds":
        """Read :meth:`to_json`'s text; files written before rules existed are ``eq25``."""
        d = json.loads(text)
        return cls({k: tuple(v) for k, v in d["sites"].items()}, d.get("percentile"), d.get("meta", {}),
                   d.get("rule", "eq25"), d.get("example"))
