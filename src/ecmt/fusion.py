"""Optional fusion of the per-step elementwise arithmetic with ``torch.compile``.

One simulation step of an MT neuron is a dozen elementwise operations on the same tensor, and
an EC module adds four passes around its function F. Run one by one, each reads and writes the
whole tensor, and those passes, not the matrix products, dominate a dense simulation.
:func:`fusable` wraps a step function so that, on large tensors, it runs as one kernel generated
by ``torch.compile`` (inductor: C++ on CPU, Triton on GPU).

The step functions use only exactly rounded operations (no transcendental functions, no
multiply-add pairs that the C++ compiler may contract: inductor compiles with
``-ffp-contract=off``), so on CPU the fused and eager versions give bit-identical results.
The EC modules' F (LayerNorm, softmax, GELU, ...) is not compiled: it stays the ANN's own
function. (An SNN amplifies last-bit differences: a relative perturbation of 1e-7 anywhere
changes some spikes, and the output of a random ViT at T=16 by a few percent, as much as the
conversion error itself.) On GPU, Triton may contract ``a * b + c`` into a fused multiply-add,
which can move an MT neuron's level boundary by one rounding.

The environment variable ``ECMT_COMPILE`` (or :func:`set_mode`) chooses the mode:

* ``auto`` (default): fuse when the input has at least :data:`MIN_NUMEL` elements and no
  gradient is being recorded; small tensors (unit tests, toy models) run eagerly because
  compiling would cost more than it saves;
* ``1``: fuse whenever no gradient is being recorded;
* ``0``: never fuse.

The first fused call of each function compiles it: some seconds to a minute on CPU, once per
process (inductor also caches the generated code on disk). If compilation fails (no C++
compiler, no Triton, an unsupported platform), a warning is given and that function runs
eagerly from then on.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Optional

import torch

MIN_NUMEL = 1 << 16
"""In ``auto`` mode, tensors smaller than this are processed eagerly."""

SCAN_STEPS = 8
"""Time steps per call of a multi-step scan (:func:`scan`): a fused scan is one kernel unrolled
over its steps, so this bounds its size (and compile time)."""

RECOMPILE_LIMIT = 64
"""Compiled variants kept per step function (one per rank, layout and F; torch's default is 8).

Set in ``torch._dynamo.config.recompile_limit`` when the first step function is compiled
(a limit already higher is kept). It is process-wide: it also applies to the caller's own
compiled functions."""

_mode = os.environ.get("ECMT_COMPILE", "auto").strip().lower()


def set_mode(mode: str) -> None:
    """Set the fusion mode: ``"auto"``, ``"1"`` (always) or ``"0"`` (never)."""
    global _mode
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"fusion mode must be 'auto', '1' or '0', got {mode!r}")
    _mode = mode


def get_mode() -> str:
    """The current fusion mode."""
    return _mode


class Fusable:
    """A step function that runs compiled on large inputs and eagerly otherwise.

    Calling it with ``numel`` (the size of the tensor being processed) picks the path.
    ``eager`` is the plain function; ``failed`` is set once its compilation has failed.
    """

    def __init__(self, fn: Callable) -> None:
        self.eager = fn
        self.failed = False
        self._compiled: Optional[Callable] = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def use_fused(self, numel: int) -> bool:
        if self.failed or _mode == "0" or torch.is_grad_enabled():
            return False
        return _mode == "1" or numel >= MIN_NUMEL

    def __call__(self, *args, numel: int = 0, **kwargs):
        if not self.use_fused(numel):
            return self.eager(*args, **kwargs)
        if self._compiled is None:
            # inductor's CPU path warns "No CUDA runtime is found" on machines without CUDA: noise for users
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            # dynamic_threads: parallelise every kernel whatever the sizes seen when it was compiled
            # (else a kernel first compiled for a small tensor runs on one thread, from the disk cache too)
            # emulate_precision_casts: round where the code casts (else an MT neuron in bf16 would subtract
            # the unrounded spike from its membrane while the next layer receives the rounded one)
            self._compiled = torch.compile(self.eager, dynamic=True,
                                           options={"cpp.dynamic_threads": True, "emulate_precision_casts": True})
            # Raised once, process-wide: patching the config around each call costs more than the call.
            config = _dynamo_config()
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            result = self.eager(*args, **kwargs)  # an error of the inputs themselves is raised here
            self.failed = True
            first_line = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(f"ecmt: torch.compile failed for {self.__name__}, running it without fusion "
                          f"({type(e).__name__}: {first_line})", RuntimeWarning, stacklevel=2)
            return result


def _dynamo_config():
    import torch._dynamo.config  # imported on first use: it is slow to import
    return torch._dynamo.config


def flat(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Flat aliases of same-shape tensors if all are contiguous (None passes through), else as given.

    Elementwise step functions are called on flat tensors where possible, so that one compiled
    kernel serves every shape instead of one per rank and layout. The aliases share memory with
    the tensors but are detached, so the compiler does not specialise on the original shapes;
    with gradients enabled (never fused) the tensors are returned unchanged.
    """
    if torch.is_grad_enabled() or not all(t is None or t.is_contiguous() for t in tensors):
        return tensors
    return tuple(None if t is None else t.view(-1).detach() for t in tensors)


def scan(fn: Fusable, xs: torch.Tensor, t: int, *args, **kwargs) -> torch.Tensor:
    """``fn(piece, t_piece, *args)`` over ``xs`` (``[steps, ...]``) in pieces of at most
    :data:`SCAN_STEPS` steps, concatenated; ``t_piece`` is ``t`` plus the offset of the piece
    (the number of the piece's first step, for a scan that needs it)."""
    n = xs.shape[0]
    pieces = [fn(xs[j:j + SCAN_STEPS], t + j, *args, numel=xs[j:j + SCAN_STEPS].numel(), **kwargs)
              for j in range(0, n, SCAN_STEPS)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def fusable(fn: Callable) -> Fusable:
    """Decorator: make ``fn`` a :class:`Fusable` step function."""
    return Fusable(fn)
