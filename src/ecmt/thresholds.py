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
        sites: The thresholds. Either side may be a tuple of C values instead of a number:
            per-channel base thresholds, one per channel of the site's last dimension (the
            input channels of the Linear it feeds), from ``calibrate(per_channel=True)``.
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
        sites = {}
        for name, pair in self.sites.items():
            try:
                a, b = (_side(v) for v in pair)
            except (TypeError, ValueError):
                raise ThresholdError(f"site {name}: thresholds must be two finite numbers >= 0 (or two "
                                     f"sequences of them, per channel), got {pair}") from None
            if isinstance(a, tuple) and isinstance(b, tuple) and len(a) != len(b):
                raise ThresholdError(f"site {name}: {len(a)} positive but {len(b)} negative channel thresholds")
            sites[name] = (a, b)
        object.__setattr__(self, "sites", sites)

    def per_channel(self) -> list[str]:
        """The sites whose thresholds are per channel."""
        return [n for n, (a, b) in self.sites.items() if isinstance(a, tuple) or isinstance(b, tuple)]

    def scaled(self, factors: Mapping[str, float]) -> "Thresholds":
        """Both thresholds of each site in ``factors`` (all of its channels) multiplied by its factor."""
        def mul(v, f):
            return tuple(x * f for x in v) if isinstance(v, tuple) else v * f

        sites = {n: (mul(a, factors[n]), mul(b, factors[n])) if n in factors else (a, b)
                 for n, (a, b) in self.sites.items()}
        return replace(self, sites=sites)

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
            pair = (float(value), float(value)) if isinstance(value, (int, float)) else tuple(value)  # type: ignore
            for n in names:
                sites[n] = pair
        return replace(self, sites=sites, meta=dict(self.meta))

    def with_rule(self, rule: Union[str, SpikeRule]) -> "Thresholds":
        """The same thresholds, for neurons with spike rule ``rule``."""
        return replace(self, rule=rule)

    def to_json(self) -> str:
        return json.dumps({"percentile": self.percentile, "rule": self.rule.value, "meta": dict(self.meta),
                           "example": self.example,
                           "sites": {k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in self.sites.items()}})

    @classmethod
    def from_json(cls, text: str) -> "Thresholds":
        """Read :meth:`to_json`'s text; files written before rules existed are ``eq25``."""
        d = json.loads(text)
        return cls({k: tuple(v) for k, v in d["sites"].items()}, d.get("percentile"), d.get("meta", {}),
                   d.get("rule", "eq25"), d.get("example"))


def _side(v: object) -> object:
    """One side's threshold as a float, or a tuple of floats (per channel); ValueError if invalid."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, (int, float)):
        values = (float(v),)
    else:
        values = tuple(float(x) for x in v)  # type: ignore[union-attr]
        if not values:
            raise ValueError(v)
    if not all(math.isfinite(x) and x >= 0 for x in values):
        raise ValueError(v)
    return values[0] if isinstance(v, (int, float)) else values
