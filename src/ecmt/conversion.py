"""Conversion of an ANN into its ECMT spiking form (Algorithm 1, step 2)."""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from . import registry
from .compensation import ExpectationCompensation
from .errors import ConversionError, InvalidInputError, ThresholdError, UnsupportedModelError
from .layers import SiteFactory, SpikingLinear
from .neurons import MTNeuron, SpikeRule, check_levels, check_rule
from .state import Stateful, stateful_modules
from .thresholds import Thresholds


def build_spiking(model: nn.Module, make_site: SiteFactory) -> nn.Module:
    """Return a copy of ``model`` in spiking form, with sites made by ``make_site``.

    The copy shares the ANN's parameters (nothing is written to them) and the original is
    left untouched. Linear layers get a site before them, nonlinearities an EC wrapper, and
    attention modules are rebuilt by their family adapter.

    Raises:
        UnsupportedModelError: Some modules cannot be converted; all of them are named.
    """
    _load_adapters()
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    net = copy.deepcopy(model, memo).eval()
    unsupported: list[tuple[str, str]] = []
    root = _convert(net, "", make_site, unsupported)
    if unsupported:
        raise UnsupportedModelError(_describe(unsupported, type(model).__name__))
    return root


def _convert(m: nn.Module, path: str, make_site: SiteFactory, bad: list[tuple[str, str]]) -> nn.Module:
    """Convert ``m`` (at dotted ``path``); append ``(path, what is wrong)`` to ``bad``."""
    def site(suffix: str) -> nn.Module:
        return make_site(f"{path}.{suffix}" if path else suffix)

    if (rebuild := registry.replacement_for(m)) is not None:
        try:
            return rebuild(m, site, lambda child, name: _convert(child, f"{path}.{name}", make_site, bad))
        except ConversionError as e:
            bad.append((path or "<root>", f"{type(m).__name__} ({e})"))
            return m
    if isinstance(m, nn.Linear):
        return SpikingLinear(site("neuron"), m)
    if registry.is_nonlinear(m):
        return ExpectationCompensation(m)
    if registry.is_linear_leaf(m) or registry.is_analog_input(m):
        return m
    if registry.is_container(m):
        reason = registry.container_check(m)
        if reason is not None:
            bad.append((path or "<root>", f"{type(m).__name__} ({reason})"))
    else:
        bad.append((path or "<root>", type(m).__name__))
    for name, child in list(m.named_children()):
        new = _convert(child, f"{path}.{name}" if path else name, make_site, bad)
        if new is not child:
            setattr(m, name, new)
    return m


def _describe(bad: list[tuple[str, str]], model_name: str) -> str:
    by_kind: dict[str, list[str]] = defaultdict(list)
    for path, kind in bad:
        by_kind[kind].append(path)
    parts = [f"{kind}{f' x{len(paths)}' if len(paths) > 1 else ''} at {', '.join(paths[:3])}"
             f"{', ...' if len(paths) > 3 else ''}" for kind, paths in by_kind.items()]
    return f"cannot convert {model_name}: unsupported modules: " + "; ".join(parts)


class SpikingModel(nn.Module):
    """A converted network. One forward call is one time step.

    Use :func:`ecmt.simulate` to run it for T steps; it resets the state first.

    Attributes:
        net: The converted module tree.
        levels: n, the number of thresholds on each side of every MT neuron.
        thresholds: The base thresholds the neurons were built with (and their spike rule).
        spec: How to rebuild the ANN skeleton when loading from a file (set by the model
            loaders; None for models built by hand).
    """

    def __init__(self, net: nn.Module, levels: int, thresholds: Thresholds, output: Callable[[Any], Any]) -> None:
        super().__init__()
        self.net = net
        self.levels = levels
        self.thresholds = thresholds
        self.spec: Optional[dict] = None
        self._output = output
        self.__dict__["_stateful"] = stateful_modules(net)  # a plain list: not registered twice

    def reset(self) -> None:
        """Return every neuron and EC module to its initial state."""
        for m in self.__dict__["_stateful"]:
            m.reset()

    def neurons(self) -> Iterator[tuple[str, MTNeuron]]:
        """``(site name, neuron)`` for every MT neuron."""
        for name, m in self.net.named_modules():
            if isinstance(m, MTNeuron):
                yield name, m

    def forward(self, x: Any) -> Tensor:
        out = self.net(**x) if isinstance(x, Mapping) else self.net(x)
        return self._output(out)


def site_names(model: nn.Module) -> list[str]:
    """The names of the spiking sites conversion would create for ``model``."""
    names: list[str] = []

    def record(name: str) -> nn.Module:
        names.append(name)
        return nn.Identity()

    build_spiking(model, record)
    return names


def convert(model: nn.Module, thresholds: Mapping[str, tuple[float, float]], levels: int = 8,
            rule: Union[str, SpikeRule, None] = None) -> SpikingModel:
    """Convert ``model`` to an ECMT spiking network (Algorithm 1, step 2).

    Args:
        model: A supported ANN (timm ViT/DeiT/EVA-01, HF BERT, ...). It is not modified.
        thresholds: Base thresholds per site, from :func:`ecmt.calibrate` (or hand-made).
        levels: n; each MT neuron gets 2n thresholds.
        rule: The MT neurons' spike rule (:class:`ecmt.neurons.SpikeRule`: ``"eq25"``, the
            paper's, or ``"nearest"``); default: the one ``thresholds`` were made for (``eq25``
            from :func:`ecmt.calibrate`, ``nearest`` from :func:`ecmt.tune`).

    Returns:
        The spiking network; run it with :func:`ecmt.simulate`. ``snn.thresholds.rule`` is
        the rule its neurons use.

    Raises:
        UnsupportedModelError: The model has modules that cannot be converted.
        ThresholdError: A site has no threshold.
        InvalidInputError: ``levels`` is not an integer in 1..16 (:data:`ecmt.neurons.MAX_LEVELS`).

    Example:
        >>> thresholds = ecmt.calibrate(vit, batches)           # doctest: +SKIP
        >>> snn = ecmt.convert(vit, thresholds, levels=8)       # doctest: +SKIP
    """
    check_levels(levels)
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds(dict(thresholds))
    if rule is not None and rule != thresholds.rule:
        thresholds = thresholds.with_rule(check_rule(rule))
    missing: list[str] = []

    def make_neuron(name: str) -> nn.Module:
        if name not in thresholds:
            missing.append(name)
            return nn.Identity()
        return MTNeuron(*thresholds[name], levels=levels, rule=thresholds.rule)

    net = build_spiking(model, make_neuron)
    if missing:
        raise ThresholdError(f"no threshold for {len(missing)} site(s), e.g. {missing[0]}: "
                             "calibrate on this model")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    net.to(device)
    return SpikingModel(net, levels, thresholds, registry.family_of(model).output)


def _load_adapters() -> None:
    from . import adapters  # registers the model families

    adapters.load_optional()
