"""What the converter knows about module types.

Conversion walks the module tree and treats each module by its type:

* **replaced** modules (attention) are rebuilt by a family adapter into spiking blocks;
* ``nn.Linear`` gets an MT neuron before it (:class:`~ecmt.layers.SpikingLinear`);
* **nonlinear** leaves (LayerNorm, GELU, ...) are wrapped in an EC module (Eq. 15);
* **linear** leaves (Identity, Dropout, LayerScale, ...) are kept: any linear map of the
  per-step outputs commutes with averaging over time;
* **analog input** modules (patch or token embeddings) are kept and see the analog input;
* **containers** are recursed into. Only containers whose forward code combines its children
  linearly (residual additions, reshapes, token concatenation, mean pooling) may be
  registered; a check function may refuse a configuration (e.g. max pooling).

Anything else makes conversion fail with :class:`~ecmt.errors.UnsupportedModelError` naming
the modules. Adapters for a model family register their types here; adding a family touches
one file in ``ecmt/adapters``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

Check = Callable[[nn.Module], Optional[str]]
"""Returns None when a container's configuration is supported, else the reason it is not."""

_replace: dict[type, Callable[..., nn.Module]] = {}
_containers: dict[type, Optional[Check]] = {}
_linear_leaves: set[type] = {nn.Identity, nn.Dropout, nn.Flatten}
_analog_inputs: set[type] = set()
_nonlinear: set[type] = {
    nn.LayerNorm, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.RMSNorm,
}


@dataclass(frozen=True)
class Family:
    """Model-level behaviour of a family: how to read the tensor output of one step.

    Attributes:
        output: Maps the model's raw output to the tensor that ``simulate`` averages.
    """

    output: Callable[[Any], Any]


_families: dict[type, Family] = {}


def register_replacement(*types: type):
    """Decorator: ``fn(module, make_site) -> nn.Module`` rebuilds modules of these types."""
    def deco(fn):
        for t in types:
            _replace[t] = fn
        return fn
    return deco


def register_container(*types: type, check: Optional[Check] = None) -> None:
    """Declare that these containers' forward code is linear in their children."""
    for t in types:
        _containers[t] = check


def register_linear_leaf(*types: type) -> None:
    """Declare leaves that compute a fixed linear (or affine) map of their input."""
    _linear_leaves.update(types)


def register_nonlinear(*types: type) -> None:
    """Declare leaves whose function is wrapped in an EC module."""
    _nonlinear.update(types)


def register_analog_input(*types: type) -> None:
    """Declare modules that only ever see the analog network input (embeddings)."""
    _analog_inputs.update(types)


def register_family(*types: type, output: Callable[[Any], Any]) -> None:
    """Declare how a top-level model's output is read."""
    for t in types:
        _families[t] = Family(output=output)


def replacement_for(m: nn.Module) -> Optional[Callable[..., nn.Module]]:
    return _replace.get(type(m))


def is_container(m: nn.Module) -> bool:
    return type(m) in _containers


def container_check(m: nn.Module) -> Optional[str]:
    check = _containers.get(type(m))
    return check(m) if check is not None else None


def is_linear_leaf(m: nn.Module) -> bool:
    return isinstance(m, tuple(_linear_leaves))


def is_nonlinear(m: nn.Module) -> bool:
    return isinstance(m, tuple(_nonlinear))


def is_analog_input(m: nn.Module) -> bool:
    return type(m) in _analog_inputs


def has_adapter(m: nn.Module) -> bool:
    """Whether a family adapter handles ``m`` as a whole (else the generic graph path does)."""
    return type(m) in _containers or type(m) in _replace


def family_of(m: nn.Module) -> Family:
    return _families.get(type(m), Family(output=main_output))


def main_output(x: Any) -> Any:
    """The tensor of a model's output that is simulated: the output itself, else ``logits``,
    else ``last_hidden_state`` (HF model outputs), else the first element of a tuple."""
    if hasattr(x, "keys") and not hasattr(x, "shape"):
        for key in ("logits", "last_hidden_state"):
            if key in x.keys():
                return x[key]
        return next(iter(x.values()))
    if isinstance(x, (tuple, list)):
        return x[0]
    return x
