"""Explicit, resettable state of spiking modules.

A spiking network carries state across time steps (membrane potentials, accumulated inputs).
Every module that does subclasses :class:`Stateful`; :func:`reset_net` returns a whole network
to its initial state before a new input is simulated.
"""
from __future__ import annotations

from torch import nn


class Stateful(nn.Module):
    """A module whose forward pass depends on previous time steps.

    Subclasses list their state attributes in ``_state`` together with their reset value;
    :meth:`reset` restores them. State tensors are plain attributes, not buffers, so they are
    never saved with the weights.
    """

    _state: dict[str, object] = {}

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Return to the state before the first time step."""
        for name, value in self._state.items():
            setattr(self, name, value)


def stateful_modules(model: nn.Module) -> list[Stateful]:
    """All :class:`Stateful` submodules of ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, Stateful)]


def reset_net(model: nn.Module) -> None:
    """Reset every stateful module of ``model``."""
    for m in stateful_modules(model):
        m.reset()
