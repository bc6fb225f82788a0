"""Explicit, resettable state of spiking modules.

A spiking network carries state across time steps (membrane potentials, accumulated inputs).
Every module that does subclasses :class:`Stateful`; :func:`reset_net` returns a whole network
to its initial state before a new input is simulated.

**Multi-step mode.** A module whose class sets :attr:`Stateful.multi_step` can process a chunk of
``steps`` time steps in one call (:func:`set_steps`): its input then holds the inputs of the
``steps`` steps stacked along dimension 0, time-major (``[steps·R, ...]`` for a per-step input
``[R, ...]``, step 1 first), and so does its output. A network of such modules runs a chunk of
steps with every layer's work done for all steps at once (:mod:`ecmt.simulation`). Its state
keeps the shape of one step, so a module checks the chunk against it; a chunk always follows a
first single step, which allocates the state.

**Batch compaction.** :meth:`Stateful.compact` keeps the state of some inputs of the batch only,
for inputs that leave a simulation early (adaptive stopping). Every state tensor holds the batch
as the outermost factor of dimension 0 (``[B·k, ...]``), as the network's tensors do.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn


class Stateful(nn.Module):
    """A module whose forward pass depends on previous time steps.

    Subclasses list their state attributes in ``_state`` together with their reset value;
    :meth:`reset` restores them. State tensors are plain attributes, not buffers, so they are
    never saved with the weights.
    """

    _state: dict[str, object] = {}
    multi_step = False
    """Whether ``forward`` can process a chunk of several time steps (see the module docstring)."""
    steps = 1
    """Time steps per call; set with :func:`set_steps` (a class default, not state)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Return to the state before the first time step."""
        for name, value in self._state.items():
            setattr(self, name, value)

    def compact(self, keep: Tensor, batch: int) -> None:
        """Keep the state of the inputs ``keep`` (int64 indices into a batch of ``batch``) only."""
        for name in self._state:
            setattr(self, name, select_batch(getattr(self, name), keep, batch))

    def chunk(self, x: Tensor, state: Tensor) -> Tensor:
        """``x``, a chunk of :attr:`steps` inputs, as ``[steps, *state.shape]`` (a view).

        Raises:
            RuntimeError: ``x`` is not a chunk of inputs of the state's shape.
        """
        xs = x.unflatten(0, (self.steps, -1)) if x.shape[0] % self.steps == 0 else None
        if xs is None or xs.shape[1:] != state.shape:
            raise RuntimeError(f"{type(self).__name__}: a chunk of {self.steps} steps of shape {tuple(x.shape)} "
                               f"does not fit the state of one step {tuple(state.shape)}")
        return xs


def select_batch(value: Any, keep: Tensor, batch: int) -> Any:
    """The rows of the inputs ``keep`` of a state value (a tensor ``[batch·k, ...]``, a list of
    them, or anything else, returned as is), in the memory layout of the original."""
    if isinstance(value, (list, tuple)):
        return type(value)(select_batch(v, keep, batch) for v in value)
    if not isinstance(value, Tensor) or value.dim() == 0:
        return value
    rows = value.unflatten(0, (batch, -1)).index_select(0, keep.to(value.device)).flatten(0, 1)
    out = torch.empty_like(value[:rows.shape[0]])  # keeps the strides (a transposed matmul operand stays so)
    return out.copy_(rows)


def stateful_modules(model: nn.Module) -> list[Stateful]:
    """All :class:`Stateful` submodules of ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, Stateful)]


def reset_net(model: nn.Module) -> None:
    """Reset every stateful module of ``model``."""
    for m in stateful_modules(model):
        m.reset()


def set_steps(modules: Iterable[Stateful], steps: int) -> None:
    """Make every module process ``steps`` time steps per call (1: one step, the default)."""
    for m in modules:
        m.steps = steps
