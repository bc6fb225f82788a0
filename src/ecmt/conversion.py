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
from .neurons import MTNeuron, SpikeRule, _theta, check_levels, check_rule
from .state import Stateful, stateful_modules
from .thresholds import Thresholds


PATHS = ("auto", "graph", "adapter")
"""How :func:`build_spiking` converts: ``graph`` is the generic path (:mod:`ecmt.graph`),
``adapter`` the hand-written fast path of a registered family, ``auto`` the adapter where
one converts the model and the graph otherwise."""


def build_spiking(model: nn.Module, make_site: SiteFactory, *, example: Any = None, path: str = "auto") -> nn.Module:
    """Return a copy of ``model`` in spiking form, with sites made by ``make_site``.

    The copy shares the ANN's parameters (nothing is written to them) and the original is
    left untouched. Linear layers get a site before them, nonlinearities an EC module and
    products of two spiking tensors matrix-product EC modules.

    Args:
        model: The ANN.
        make_site: Makes the module at each spiking site, given its name.
        example: An input of the model, for graph capture (default: made from its config,
            see :func:`ecmt.graph.example_input`).
        path: One of :data:`PATHS`.

    Raises:
        UnsupportedModelError: Some modules or ops cannot be converted; all of them are named.
    """
    if path not in PATHS:
        raise InvalidInputError(f"unknown conversion path {path!r}: choose one of {', '.join(PATHS)}")
    _load_adapters()
    if path == "graph" or (path == "auto" and not registry.has_adapter(model)):
        from .graph import build_graph

        return build_graph(model, make_site, example)
    if path == "adapter":
        return _build_adapter(model, make_site)
    try:  # a dry run first: make_site must see only the sites of the path that converts
        _build_adapter(model, lambda name: nn.Identity())
    except UnsupportedModelError:
        pass
    else:
        return _build_adapter(model, make_site)
    from .graph import build_graph  # a configuration the adapter refuses (EVA-02 rope, attention pooling)

    return build_graph(model, make_site, example)


def _build_adapter(model: nn.Module, make_site: SiteFactory) -> nn.Module:
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


def _positions(ids: Tensor) -> Tensor:
    return torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)


_DEFAULTS = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like, "position_ids": _positions}
"""Inputs a text model reads as these defaults when they are not given."""


def graph_inputs(gm: torch.fx.GraphModule, x: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword inputs of a captured graph, from a batch that may carry others.

    A graph is captured with the inputs of its example; a batch may leave out an input the
    graph takes (filled with the model's default), or carry one the graph does not take,
    which is dropped if it holds that default (a tokenizer's all-zero ``token_type_ids``).

    Raises:
        InvalidInputError: An input is missing, or given with other values than the default.
    """
    names = gm.__dict__.get("_ecmt_inputs")
    if names is None:
        names = gm.__dict__["_ecmt_inputs"] = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if list(x) == names:
        return dict(x)
    ids = next(iter(x.values()))
    out = {}
    for name in names:
        if name in x:
            out[name] = x[name]
        elif name in _DEFAULTS and isinstance(ids, Tensor):
            out[name] = _DEFAULTS[name](ids)
        else:
            raise InvalidInputError(f"the input has no {name!r}, which the converted model takes")
    for name in set(x) - set(names):
        value = x[name]
        if not (name in _DEFAULTS and isinstance(value, Tensor) and bool((value == _DEFAULTS[name](value)).all())):
            raise InvalidInputError(f"the converted model does not take {name!r} (it was captured with "
                                    f"{', '.join(names)}): convert it with example= holding that input")
    return out


def set_thresholds(snn: SpikingModel, thresholds: Thresholds) -> None:
    """Give every MT neuron of ``snn`` its base thresholds from ``thresholds``, in place.

    The neurons keep their spike rule and levels. Used by the threshold search, which
    simulates many threshold sets on one conversion.

    Raises:
        ThresholdError: A site has no threshold.
    """
    for name, neuron in snn.neurons():
        if name not in thresholds:
            raise ThresholdError(f"no threshold for site {name}")
        theta = _theta(*thresholds[name])
        if theta.shape != neuron.theta.shape:
            raise ThresholdError(f"site {name}: thresholds of shape {tuple(theta.shape)} for a neuron built with "
                                 f"{tuple(neuron.theta.shape)}: convert again")
        neuron.theta.copy_(theta)
        neuron._refresh()
    snn.thresholds = thresholds


def site_names(model: nn.Module, *, example: Any = None, path: str = "auto") -> list[str]:
    """The names of the spiking sites conversion would create for ``model``."""
    names: list[str] = []

    def record(name: str) -> nn.Module:
        names.append(name)
        return nn.Identity()

    build_spiking(model, record, example=example, path=path)
    return names


def convert(model: nn.Module, thresholds: Mapping[str, tuple[float, float]], levels: int = 8,
            rule: Union[str, SpikeRule, None] = None, *, example: Any = None, path: str = "auto") -> SpikingModel:
    """Convert ``model`` to an ECMT spiking network (Algorithm 1, step 2).

    Args:
        model: An ANN (any timm or HF Transformer that torch.export captures). It is not modified.
        thresholds: Base thresholds per site, from :func:`ecmt.calibrate` (or hand-made).
        levels: n; each MT neuron gets 2n thresholds.
        rule: The MT neurons' spike rule (:class:`ecmt.neurons.SpikeRule`: ``"eq25"``, the
            paper's, or ``"nearest"``); default: the one ``thresholds`` were made for (``eq25``
            from :func:`ecmt.calibrate`, ``nearest`` from :func:`ecmt.tune`).
        example: An input of the model for graph capture (see :func:`build_spiking`).
        path: ``auto``, ``graph`` or ``adapter`` (see :data:`PATHS`); calibrate with the same.

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

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if example is None and thresholds.example:
        from .graph.capture import from_signature

        example = from_signature(thresholds.example, device)
    net = build_spiking(model, make_neuron, example=example, path=path)
    if missing:
        raise ThresholdError(f"no threshold for {len(missing)} site(s), e.g. {missing[0]}: "
                             "calibrate on this model")
    net.to(device)
    snn = SpikingModel(net, levels, thresholds, registry.family_of(model).output)
    snn.path = "graph" if isinstance(net, torch.fx.GraphModule) else "adapter"
    return snn


def _load_adapters() -> None:
    from . import adapters  # registers the model families

    adapters.load_optional()
