"""Running a converted network over time steps, one step at a time or in chunks of steps.

**Step mode** runs the whole network once per time step. **Multi-step mode** runs a chunk of
steps through each layer before the next layer runs (as SpikingJelly's multi-step mode does):
the chunk's inputs are stacked along the batch dimension, time-major, so every Linear and
convolution is one GEMM over ``steps·B`` rows, every matrix-product EC one batched matmul,
every EC one call of F on the running means of all steps, and every MT neuron one scan over
time (one fused kernel on large tensors, :mod:`ecmt.fusion`). Each module does the arithmetic
of step mode in the same order, so on CPU both modes give bit-identical outputs (the tests
check it for every family of the generic converter). The first step always runs alone: it
allocates the state, against which every chunk is checked (:mod:`ecmt.state`).

The chunk is chosen under a memory budget (``memory``), so any T runs: the chunk's temporaries
grow with its length, the state does not. Inputs can leave a running simulation between chunks
(:meth:`Simulation.keep`): the batch and every module's state are compacted, so adaptive
stopping (:mod:`ecmt.adaptive`) saves the work of the inputs that have settled.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from .calibration import check_finite, input_errors
from .conversion import SpikingModel, graph_inputs
from .errors import InvalidInputError
from .state import set_steps

MODES = ("auto", "step", "multi")
"""How :func:`simulate` runs the steps: ``step`` one network call per step, ``multi`` chunks of
steps (multi-step mode), ``auto`` multi-step mode where the network supports it (every stateful
module does, no forward hooks are attached, e.g. by :class:`ecmt.energy.OpCounter`) and its state
is small enough to gain (:data:`AUTO_STATE_LIMIT`), step mode otherwise."""

DEFAULT_MEMORY = 2 << 30
"""Bytes a chunk's temporaries may take on CPU by default (on CUDA: half the free memory)."""

AUTO_STATE_LIMIT = 4 << 20
"""In ``auto`` mode on CPU, multi-step mode is used while the largest state tensor of one step is at
most this many bytes; above it the chunk's working set falls out of the caches and step mode is
faster. Measured on the idle 2-core machine, 2 threads, T = 8 (``benchmarks/step_cost.py --sim step
multi``, ``results/step_cost_multistep_quiet*.json``): largest state 0.29 MiB (reference model,
batch 8): multi-step 2.6x the ANN against 5.9x; 2.3 MiB (ViT-S/16, batch 2): 1.6x against 1.9x;
2.3 MiB (reference model, batch 64): equal; 4.6 MiB (reference model, batch 128): 3.2x against 2.6x;
9.2 MiB (ViT-S/16, batch 8): 2.4x against 1.9x. (An L2 cache of 2 MiB per core there.)"""

AUTO_STATE_LIMIT_ACCELERATOR = 32 << 20
"""The same limit on other devices (CUDA): not yet measured on one (``benchmarks/gpu_check.py``
times both modes); the CPU's limit before the idle-machine measurement above."""

STEP_BYTES_FACTOR = 8
"""A chunk's temporaries per step, in units of the largest state tensor (measured on ViT-S/16 and
the reference model: 3 to 6; see benchmarks/memory.py)."""


def parse_memory(text: str) -> int:
    """Bytes from ``512M``, ``4G``, ``1.5GiB`` or a plain number of bytes.

    Raises:
        InvalidInputError: Not a positive size.
    """
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise InvalidInputError(f"memory must be a size such as 512M or 4G, got {text!r}")
    return int(value)


_memory: Optional[int] = None


def set_memory(memory: Optional[int]) -> None:
    """Set the budget that simulations without ``memory=`` use (None: :func:`default_memory`);
    the CLI's ``--memory``."""
    global _memory
    _memory = memory


def default_memory(device: torch.device) -> int:
    """The budget of a chunk's temporaries on ``device`` when none is given: that of
    :func:`set_memory`, else :data:`DEFAULT_MEMORY` on CPU and half the free memory on CUDA."""
    if _memory is not None:
        return _memory
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return DEFAULT_MEMORY


def supports_multi_step(snn: SpikingModel) -> bool:
    """Whether ``snn`` runs in multi-step mode: every stateful module supports it, no forward hooks
    are attached to the model or to a stateful module (they expect one step per call), and a
    probe (two steps of one input) runs. The probe runs once per network."""
    modules = snn.__dict__["_stateful"]
    if any(m._forward_hooks or m._forward_pre_hooks for m in [snn, snn.net, *modules]):
        return False
    if not all(m.multi_step for m in modules):
        return False
    return snn.__dict__.get("_multi_step_probe", True)


@torch.no_grad()
def _probe(snn: SpikingModel, x: Any) -> bool:
    """Run one step and then a chunk of two on the first input of ``x``; False if it fails."""
    one = _select(x, torch.zeros(1, dtype=torch.long, device=_batch_tensor(x).device))
    try:
        snn.reset()
        snn(one)
    except Exception:  # noqa: BLE001 - an input that does not fit: the simulation itself reports it
        snn.reset()
        return False
    try:
        _chunk_call(snn, one, 2)
        ok = True
    except (RuntimeError, AssertionError, ValueError, IndexError, TypeError):  # a shape that does not fold
        ok = False
    snn.reset()
    snn.__dict__["_multi_step_probe"] = ok
    return ok


def _batch_tensor(x: Any) -> Tensor:
    return next(v for v in x.values() if isinstance(v, Tensor)) if isinstance(x, Mapping) else x


def _select(x: Any, rows: Tensor) -> Any:
    """The inputs ``rows`` of a batch (every tensor of a dict is indexed along dimension 0)."""
    if isinstance(x, Mapping):
        return {k: v.index_select(0, rows) if isinstance(v, Tensor) and v.dim() else v for k, v in x.items()}
    return x.index_select(0, rows)


def _repeat(x: Any, steps: int) -> Any:
    """``steps`` copies of the batch, stacked along dimension 0: the input of a chunk."""
    def one(v: Any) -> Any:
        return v.repeat(steps, *[1] * (v.dim() - 1)) if isinstance(v, Tensor) and v.dim() else v

    return {k: one(v) for k, v in x.items()} if isinstance(x, Mapping) else one(x)


def _chunk_call(snn: SpikingModel, x: Any, steps: int) -> Tensor:
    """The network's outputs of ``steps`` steps, ``[steps, B, ...]`` float32."""
    modules = snn.__dict__["_stateful"]
    set_steps(modules, steps)
    try:
        out = snn(_repeat(x, steps))
    finally:
        set_steps(modules, 1)
    return out.float().unflatten(0, (steps, -1))


def _largest_state(snn: SpikingModel) -> int:
    """Bytes of the largest state tensor of the network (after a first step)."""
    largest = 0
    for m in snn.__dict__["_stateful"]:
        for name in m._state:
            value = getattr(m, name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, Tensor):
                    largest = max(largest, v.numel() * v.element_size())
    return largest


def _step_bytes(snn: SpikingModel, output: Tensor, x: Any) -> int:
    """Estimated bytes of a chunk's temporaries per step (after the first step, from the state)."""
    largest = _largest_state(snn)
    inputs = sum(v.numel() * v.element_size() for v in (x.values() if isinstance(x, Mapping) else [x])
                 if isinstance(v, Tensor))
    return STEP_BYTES_FACTOR * largest + 2 * output.numel() * output.element_size() + inputs


class Simulation:
    """One simulation of a batch: iterate over it for the running estimate after each step.

    The state is reset first; the analog input ``x`` is presented at every step. The t-th value
    is the mean of the network's outputs over steps 1..t (float32) for the inputs still in the
    batch (:attr:`rows`). Nothing per step is kept, so memory does not grow with T.

    Args:
        snn: A network from :func:`ecmt.convert`.
        x: The input (a tensor, or a dict of tensors for text models).
        T: Number of time steps.
        mode: One of :data:`MODES`.
        memory: Bytes a chunk's temporaries may take (default: :func:`default_memory`).
        growing: Chunks of 1, 1, 2, 4, ... steps (up to the budget's) instead of the longest the
            budget allows: inputs that leave (:meth:`keep`) then leave soon after they settle.

    Raises:
        InvalidInputError: T < 1, an unknown mode or a budget below one byte, or ``x`` holds
            NaN or Inf (checked once, before the first step), or does not fit the network.
    """

    def __init__(self, snn: SpikingModel, x: Any, T: int, *, mode: str = "auto", memory: Optional[int] = None,
                 growing: bool = False) -> None:
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise InvalidInputError(f"T must be a positive integer, got {T!r}")
        if mode not in MODES:
            raise InvalidInputError(f"unknown simulation mode {mode!r}: choose one of {', '.join(MODES)}")
        if memory is not None and (not isinstance(memory, int) or memory < 1):
            raise InvalidInputError(f"memory must be a positive number of bytes, got {memory!r}")
        check_finite(x, "the SNN input")
        if isinstance(x, Mapping) and isinstance(snn.net, torch.fx.GraphModule):
            x = graph_inputs(snn.net, x)  # once, not at every step: the steps then take the fast path
        if mode == "multi" and not all(m.multi_step for m in snn.__dict__["_stateful"]):
            kinds = sorted({type(m).__name__ for m in snn.__dict__["_stateful"] if not m.multi_step})
            raise InvalidInputError(f"multi-step mode is not available for this network ({', '.join(kinds)} "
                                    "run one step at a time): use mode='step' or 'auto'")
        self.snn, self.x, self.T, self.growing = snn, x, T, growing
        self._foldable = mode == "multi" or (mode == "auto" and supports_multi_step(snn)
                                             and ("_multi_step_probe" in snn.__dict__ or _probe(snn, x)))
        self._auto = mode == "auto"
        self.multi = self._foldable and (mode == "multi" or T > 2)
        """Whether chunks of steps run (in ``auto`` mode decided again after the first step, from
        the state's size: :data:`AUTO_STATE_LIMIT`, and after inputs have left, when the smaller
        state may fit under it)."""
        self.memory = memory
        self.rows = torch.arange(_batch_tensor(x).shape[0], device=_batch_tensor(x).device)
        """Indices into the original batch of the inputs still simulated (the rows of each value)."""
        self._keep: Optional[Tensor] = None
        self.chunk = 1
        """Steps per chunk in multi-step mode, chosen under the budget after the first step."""

    @property
    def compacts(self) -> bool:
        """Whether :meth:`keep` removes inputs (where the network runs multi-step mode, so its state
        is known to hold the batch along dimension 0); else every input runs to T."""
        return self._foldable

    def keep(self, keep: Tensor) -> None:
        """From the next chunk on, simulate only the inputs where ``keep`` (bool, one per row of the
        last value) is True; a no-op unless :attr:`compacts`."""
        if self.compacts:
            self._keep = keep.nonzero().flatten() if self._keep is None else self._keep[keep[self._keep]]

    @torch.no_grad()
    def __iter__(self) -> Iterator[Tensor]:
        snn = self.snn
        snn.reset()
        with input_errors(self.x, "the input", InvalidInputError):  # an input that does not fit fails at once
            total = snn(self.x).float()
        yield total / 1
        self._choose_chunk(total)
        t, size = 1, 1
        while t < self.T:
            if self._keep is not None:
                total = self._compact(total)
                if not total.shape[0]:
                    return
                if self._auto and not self.multi and self._foldable and self.T - t > 1:
                    self._choose_chunk(total)  # the smaller batch may now gain from chunks
            steps = min(self.T - t, self.chunk if not self.growing else min(size, self.chunk))
            size *= 2
            outs = _chunk_call(snn, self.x, steps) if steps > 1 else snn(self.x).float()[None]
            for out in outs:
                t += 1
                yield total.add_(out) / t

    def _choose_chunk(self, total: Tensor) -> None:
        """Decide :attr:`multi` (in ``auto`` mode, from the state's size: :data:`AUTO_STATE_LIMIT`)
        and :attr:`chunk` (under the memory budget), from the state after a step."""
        if self._auto and self._foldable and self.T > 2:
            limit = AUTO_STATE_LIMIT if total.device.type == "cpu" else AUTO_STATE_LIMIT_ACCELERATOR
            self.multi = _largest_state(self.snn) <= limit  # above it one step at a time is faster
        if self.multi and self.T > 1:
            memory = self.memory or default_memory(total.device)
            self.chunk = max(1, min(self.T - 1, memory // max(1, _step_bytes(self.snn, total, self.x))))

    def _compact(self, total: Tensor) -> Tensor:
        keep, batch = self._keep, total.shape[0]
        self._keep = None
        for m in self.snn.__dict__["_stateful"]:
            m.compact(keep, batch)
        self.x = _select(self.x, keep)
        self.rows = self.rows[keep]
        return total.index_select(0, keep)


def simulate_steps(snn: SpikingModel, x: Any, T: int, *, mode: str = "auto",
                   memory: Optional[int] = None) -> Iterator[Tensor]:
    """Yield the SNN's running estimate of the ANN output after each step t = 1..T.

    The state is reset first; the analog input ``x`` is presented at every step. The t-th value
    yielded is the mean of the network's outputs over steps 1..t (float32). Nothing per step is
    kept, so memory does not grow with T. ``mode`` and ``memory`` as for :func:`simulate`.

    Raises:
        InvalidInputError: T < 1, or ``x`` holds NaN or Inf (checked once, before the first
            step), or does not fit the network.
    """
    return iter(Simulation(snn, x, T, mode=mode, memory=memory))


def simulate(snn: SpikingModel, x: Any, T: int, reduce: Optional[Callable[[Tensor], Tensor]] = None, *,
             mode: str = "auto", memory: Optional[int] = None) -> Tensor:
    """Simulate ``snn`` on input ``x`` for ``T`` steps.

    Args:
        snn: A network from :func:`ecmt.convert`.
        x: The input, as the ANN takes it (a tensor, or a dict of tensors for text models).
        T: Number of time steps.
        reduce: Applied to the running estimate after each step, so that only its (small)
            result is kept: memory stays flat in T (e.g. the log-likelihood of the next
            tokens instead of ``[B, L, vocab]`` logits). None: keep the estimates.
        mode: ``"auto"`` (default: multi-step where the network supports it), ``"step"`` (the
            whole network once per step) or ``"multi"`` (chunks of steps through each layer);
            see :data:`MODES`. On CPU all give the same outputs, bit for bit.
        memory: Bytes that a chunk's temporaries may take in multi-step mode (default: 2 GiB on
            CPU, half the free memory on CUDA); the chunk of steps is chosen under it, so any T runs.

    Returns:
        Tensor ``[T, *ann_output_shape]``: ``out[t-1]`` is the mean SNN output over steps 1..t;
        with ``reduce``, ``[T, *reduce_output_shape]``: ``out[t-1] = reduce(mean over 1..t)``.

    Example:
        >>> out = ecmt.simulate(snn, images, T=16)   # doctest: +SKIP
        >>> out[-1].argmax(-1)                        # doctest: +SKIP
        >>> ll = ecmt.simulate(snn, batch, T=32, reduce=lambda y: y.log_softmax(-1).amax(-1).sum())  # doctest: +SKIP
    """
    steps = simulate_steps(snn, x, T, mode=mode, memory=memory)
    if reduce is None:
        return torch.stack(list(steps))
    return torch.stack([torch.as_tensor(reduce(y)) for y in steps])
