"""Running a converted network over time steps."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from .calibration import check_finite, input_errors
from .conversion import SpikingModel, graph_inputs
from .errors import InvalidInputError


@torch.no_grad()
def simulate_steps(snn: SpikingModel, x: Any, T: int) -> Iterator[Tensor]:
    """Yield the SNN's running estimate of the ANN output after each step t = 1..T.

    The state is reset first; the analog input ``x`` is presented at every step. The t-th
    value yielded is the mean of the network's outputs over steps 1..t (float32). Nothing per
    step is kept, so memory does not grow with T.

    Raises:
        InvalidInputError: T < 1, or ``x`` holds NaN or Inf (checked once, before the first
            step), or does not fit the network.
    """
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise InvalidInputError(f"T must be a positive integer, got {T!r}")
    check_finite(x, "the SNN input")
    if isinstance(x, Mapping) and isinstance(snn.net, torch.fx.GraphModule):
        x = graph_inputs(snn.net, x)  # once, not at every step: the steps then take the fast path
    snn.reset()
    with input_errors(x, "the input", InvalidInputError):  # an input that does not fit fails at once
        total = snn(x).float()
    yield total / 1
    for t in range(2, T + 1):
        total.add_(snn(x).float())
        yield total / t


def simulate(snn: SpikingModel, x: Any, T: int, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Simulate ``snn`` on input ``x`` for ``T`` steps.

    Args:
        snn: A network from :func:`ecmt.convert`.
        x: The input, as the ANN takes it (a tensor, or a dict of tensors for text models).
        T: Number of time steps.
        reduce: Applied to the running estimate after each step, so that only its (small)
            result is kept: memory stays flat in T (e.g. the log-likelihood of the next
            tokens instead of ``[B, L, vocab]`` logits). None: keep the estimates.

    Returns:
        Tensor ``[T, *ann_output_shape]``: ``out[t-1]`` is the mean SNN output over steps 1..t;
        with ``reduce``, ``[T, *reduce_output_shape]``: ``out[t-1] = reduce(mean over 1..t)``.

    Example:
        >>> out = ecmt.simulate(snn, images, T=16)   # doctest: +SKIP
        >>> out[-1].argmax(-1)                        # doctest: +SKIP
        >>> ll = ecmt.simulate(snn, batch, T=32, reduce=lambda y: y.log_softmax(-1).amax(-1).sum())  # doctest: +SKIP
    """
    if reduce is None:
        return torch.stack(list(simulate_steps(snn, x, T)))
    return torch.stack([torch.as_tensor(reduce(y)) for y in simulate_steps(snn, x, T)])
