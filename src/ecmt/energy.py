"""Operation counting and energy estimation (paper Sec. 5.5, Table 3, Eq. 30).

Two kinds of count, over the same list of modules of the converted tree:

* **Theoretical ANN complexity** (Table 3), from shapes alone: :func:`theoretical_ops` runs
  the spiking structure with pass-through sites (which computes exactly the ANN) on the
  ``meta`` device, so no weights or data are needed. Per sample:

  =====================  ==========================  ==========================
  module                 counted MACs                EVA-giant/14 at 336 (M)
  =====================  ==========================  ==========================
  LayerNorm, GELU,       elements of the input       0.81, 0.81, 3.54
  other EC functions
  Linear                 rows · in · out             3431.65, 1143.88, 2 × 4991.48
  matrix product q·kᵀ    Nh · N · (C/Nh) · N = N²C   468.76
  softmax                Nh · N · N                  5.33
  matrix product s·v     Nh · N · N · (C/Nh) = N²C   468.76
  patch embedding        outputs · in/groups · k²    (conv of the analog image)
  =====================  ==========================  ==========================

  **Discrepancy with the paper.** Table 3 gives the q·k product as ``Nh·N·(C/Nh)²`` =
  71.49 M. The product of q (N × C/Nh) with kᵀ (C/Nh × N) for each of the Nh heads costs
  ``Nh·N·N·(C/Nh) = N²·C`` = 468.76 M, the same as s·v; 71.49 M would be the cost of a
  (C/Nh × C/Nh) product per token. We count the correct 468.76 M, so our ANN total is larger
  than the paper's by 397.27 M per block (2.6 % for EVA-giant).

* **Measured SNN operations** (:class:`OpCounter`), from the spikes of an actual simulation,
  per module and per time step. Forward hooks are attached only while counting. What is
  counted is what event-driven hardware executing the paper's equations would do, not what
  the dense simulation computes (e.g. :class:`~ecmt.compensation.MatMulEC` computes one
  dense product of running sums per step, but Eq. 18 is counted):

  - ``ac_fanout`` (Linear, Eq. 26-28): each nonzero spike entering a Linear adds one weight
    column: ``out_features`` additions. The spike's threshold value is absorbed in the
    pre-scaled weight copies of parallel parameter normalisation (Eq. 27).
  - Matrix product EC (Eq. 18), per step T, for ``A·B`` with A (n × k), B (k × m):
    ``ac_spike_spike`` = Σ_k nnzcol_A[k] · nnzrow_B[k] (one addition per pair of nonzero
    spikes that meet; ``v_a·v_b`` is one of (2n)² per-site constants);
    ``ac_spike_sum`` = nnz(A(T)) · m (each spike of A adds a row of S_B(T−1));
    ``ac_sum_spike`` = nnz(B(T)) · n (each spike of B adds a column of S_A(T−1)).
    At T = 1 the accumulated sums are zero, so the last two terms cost nothing and are
    counted as 0. Multiplying an accumulated row by a spike's threshold is counted as an
    addition, as in the paper (Sec. 4.2.2): thresholds are a power of two (a shift) times a
    per-site constant that is applied with the rescaling below.
  - ``mac_rescale`` (Eq. 16): ``O(T) = S_K(T)/T − S_K(T−1)/(T−1)``, with the second term
    kept from the previous step: one multiplication per output element for T ≥ 2; O(1) is
    S_K(1) itself.
  - ``mac_fn`` (EC, Eq. 15): the function F on the mean input, one MAC per input element
    (the Table 3 convention for LayerNorm, GELU and softmax) at every step.
  - ``mac_ec`` (EC, Eq. 15): the compensation arithmetic ``T·F(S(T)/T) − (T−1)·F_prev``, for
    T ≥ 2: one multiplication per input element for S(T)/T and one per output element for
    T·F; ``(T−1)·F_prev`` is the previous step's product, kept. At T = 1 the output is F(S(1)).
  - ``mac_analog``: modules that see the analog input (the patch embedding convolution,
    embedding LayerNorms) run on the input **at every step**, as the implementation does;
    caching their output would cost one ANN evaluation instead of T.

  Not counted, on either side (the ANN count of Table 3 does not count them either):
  additions of biases, residual connections and position embeddings, running-sum updates,
  and affine factors that fold into neighbouring weights (the attention scale, LayerScale).

The energy ratio (Eq. 30) compares the cumulative SNN operations of steps 1..t, per sample,
with the ANN's MACs over the same modules and input. :func:`energy_ratio` gives it in the
paper's convention (``MACs_SNN = 0``) or with the remaining MACs included (``full=True``).

Example:
    >>> with OpCounter(snn) as counter:                                  # doctest: +SKIP
    ...     ecmt.simulate(snn, images, T=8)
    >>> m = counter.result()                                             # doctest: +SKIP
    >>> energy_ratio(m)[4], energy_ratio(m, full=True)[4]                # doctest: +SKIP
    (0.31, 0.34)
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from itertools import zip_longest
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import registry
from .compensation import ExpectationCompensation, MatMulEC
from .conversion import SpikingModel, build_spiking
from .errors import UnsupportedModelError
from .layers import SpikingAttention, SpikingLinear
from .neurons import MTNeuron
from .simulation import simulate_steps
from .state import Stateful, stateful_modules

AC_TERMS = ("ac_fanout", "ac_spike_spike", "ac_spike_sum", "ac_sum_spike")
"""Accumulate operations: Linear fan-out and the three terms of Eq. 18."""
MAC_TERMS = ("mac_fn", "mac_ec", "mac_rescale", "mac_analog")
"""Multiply-accumulate operations that remain in the SNN (not counted by the paper)."""

Example = Union[Tensor, Mapping[str, Tensor]]
Hook = Callable[[str, str, nn.Module, tuple, Any], None]


@dataclass(frozen=True)
class EnergyConfig:
    """Energy per operation for Eq. 30, in picojoules (45 nm figures of Horowitz, 2014).

    Attributes:
        e_mac: Energy of one multiply-accumulate (the paper uses 4.6 pJ).
        e_ac: Energy of one accumulate (the paper uses 0.9 pJ).

    Example:
        >>> EnergyConfig(e_mac=3.7, e_ac=0.9).e_mac
        3.7
    """

    e_mac: float = 4.6
    e_ac: float = 0.9

    def __post_init__(self) -> None:
        if not (self.e_mac > 0 and self.e_ac >= 0 and math.isfinite(self.e_mac) and math.isfinite(self.e_ac)):
            raise ValueError(f"energies must be finite with e_mac > 0 and e_ac >= 0, got {self}")


# --------------------------------------------------------------------------- module walk


def _counted_modules(net: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(name, kind, module)`` of every module whose operations are counted."""
    for name, m in net.named_modules():
        if isinstance(m, SpikingLinear):
            yield name, "linear", m
        elif isinstance(m, MatMulEC):
            yield name, "matmul", m
        elif isinstance(m, ExpectationCompensation):
            yield name, "nonlinear", m
        elif registry.is_analog_input(m):
            yield name, "analog", m


def _attach(net: nn.Module, hook: Hook) -> list[torch.utils.hooks.RemovableHandle]:
    """Attach ``hook(name, kind, module, args, output)`` to every counted computation.

    ``module`` is the module that computes: the inner ``nn.Linear`` of a SpikingLinear (with
    ``args = (spikes,)``, read from its site's output, as a linked SpikingLinear does not call
    it), the MatMulEC or EC module, or each convolution, Linear and nonlinear leaf inside an
    analog input module.
    """
    handles = []

    def add(name: str, kind: str, m: nn.Module) -> None:
        handles.append(m.register_forward_hook(lambda mod, args, out: hook(name, kind, mod, args, out)))

    def add_linear(name: str, m: SpikingLinear) -> None:
        handles.append(m.site.register_forward_hook(
            lambda mod, args, out: hook(name, "linear", m.linear, (out,), None)))

    for name, kind, m in _counted_modules(net):
        if kind == "linear":
            add_linear(name, m)
        elif kind == "analog":
            for sub in m.modules():
                if isinstance(sub, (nn.Linear, _ConvNd)) or registry.is_nonlinear(sub):
                    add(name, kind, sub)
        else:
            add(name, kind, m)
    return handles


def _dense_macs(m: nn.Module, args: tuple, out: Tensor) -> int:
    """MACs of one ANN evaluation of ``m`` on these inputs (the Table 3 formulas)."""
    x = args[0]
    if isinstance(m, nn.Linear):
        return x.numel() * m.out_features  # rows · in · out
    if isinstance(m, _ConvNd):
        return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, MatMulEC):
        a, b = args
        batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        return batch * a.shape[-2] * a.shape[-1] * b.shape[-1]  # n · k · m per matrix
    return x.numel()  # nonlinear functions: one per element


def _batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """The leading dimension of the first tensor in a forward call's inputs."""
    stack = [*args, *kwargs.values()]
    while stack:
        x = stack.pop(0)
        if isinstance(x, Tensor):
            return x.shape[0] if x.dim() else 1
        if isinstance(x, Mapping):
            stack[:0] = list(x.values())
        elif isinstance(x, (list, tuple)):
            stack[:0] = list(x)
    return 1


def split_block(path: str) -> tuple[str, str]:
    """Split a module path at its repeated block: ``("blocks.3", "attn.qkv")``.

    The block is the path up to its first numeric component; modules outside any block
    (``patch_embed``, ``head``) give ``("", path)``.

    Example:
        >>> split_block("blocks.3.attn.qkv"), split_block("head")
        (('blocks.3', 'attn.qkv'), ('', 'head'))
    """
    parts = path.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1:])
    return "", path


# --------------------------------------------------------------------------- theoretical


@dataclass(frozen=True)
class OpTable:
    """Theoretical MACs of the ANN per module, per sample (paper Table 3).

    Attributes:
        macs: Module path in the converted tree -> MACs, in forward order.
        kinds: Module path -> ``"linear"``, ``"matmul"``, ``"nonlinear"`` or ``"analog"``.
        dims: Architecture sizes read from the shapes: ``tokens`` (N, prefix tokens
            included), ``channels`` (C), ``heads`` (Nh), ``head_dim``, ``hidden`` (Ch) and
            ``blocks``; empty for a model without attention.
    """

    macs: Mapping[str, int]
    kinds: Mapping[str, str]
    dims: Mapping[str, int]

    @property
    def total(self) -> int:
        """MACs of the whole model."""
        return sum(self.macs.values())

    def blocks(self) -> dict[str, dict[str, int]]:
        """MACs per repeated block, keyed by the path inside the block (``"attn.qkv"``)."""
        out: dict[str, dict[str, int]] = {}
        for path, n in self.macs.items():
            block, rel = split_block(path)
            if block:
                out.setdefault(block, {})[rel] = n
        return out

    def outside(self) -> dict[str, int]:
        """MACs of the modules outside the blocks (patch embedding, final norm, head)."""
        return {path: n for path, n in self.macs.items() if not split_block(path)[0]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: dims, total, per block and outside the blocks."""
        return {"dims": dict(self.dims), "total_macs": self.total, "blocks": self.blocks(),
                "outside": self.outside()}


def _to_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are empty ``meta`` tensors."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _meta_input(example: Example) -> Example:
    if isinstance(example, Mapping):
        return {k: torch.empty_like(v, device="meta") if isinstance(v, Tensor) else v for k, v in example.items()}
    return torch.empty_like(example, device="meta")


def theoretical_ops(model: nn.Module, example: Example) -> OpTable:
    """Theoretical ANN MACs per module (Table 3) from the architecture and the input shape.

    The model's spiking structure with pass-through sites, which computes exactly the ANN,
    runs once on empty ``meta`` tensors: no weights are read and nothing is computed.

    Args:
        model: A convertible ANN, on any device (it is not modified or copied to memory).
        example: An input, or a tensor of the input's shape and dtype (any device, any batch
            size: the counts are per sample). Only shapes are available on ``meta``: leave
            out inputs whose values the model inspects (pass a BERT model its
            ``input_ids`` without ``attention_mask``).

    Raises:
        UnsupportedModelError: The model cannot be converted.

    Example:
        >>> t = theoretical_ops(vit_base, torch.empty(1, 3, 224, 224))  # doctest: +SKIP
        >>> t.blocks()["blocks.0"]["attn.qk"]                           # doctest: +SKIP
        29805312
    """
    net = build_spiking(_to_meta(model), lambda site: nn.Identity())
    x = _meta_input(example)
    batch = _batch_size((x,), {})
    macs: dict[str, int] = {}
    kinds: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str, kind: str, m: nn.Module, args: tuple, out: Any) -> None:
        macs[name] = macs.get(name, 0) + _dense_macs(m, args, out)
        kinds[name] = kind
        shapes.setdefault(name, tuple(args[0].shape))

    handles = _attach(net, hook)
    try:
        with torch.no_grad():
            net(**x) if isinstance(x, Mapping) else net(x)
    finally:
        for h in handles:
            h.remove()
    return OpTable({k: v // batch for k, v in macs.items()}, kinds, _dims(net, shapes, kinds))


def _dims(net: nn.Module, shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str]) -> dict[str, int]:
    """N, C, Nh, head width, Ch and depth, read from the first attention block."""
    attn = [(name, m) for name, m in net.named_modules() if isinstance(m, SpikingAttention)]
    if not attn:
        return _graph_dims(net, shapes, kinds)
    name, m = attn[0]
    block = split_block(name)[0]
    qkv = f"{name}.qkv"
    dims = {"tokens": shapes[qkv][-2], "channels": m.qkv.linear.in_features, "heads": m.num_heads,
            "head_dim": m.head_dim, "blocks": len({split_block(n)[0] for n, _ in attn})}
    widths = [sub.linear.out_features for path, sub in net.named_modules()
              if isinstance(sub, SpikingLinear) and block and split_block(path)[0] == block and path != qkv]
    if widths:  # Ch: the widest Linear of the block besides qkv (the MLP's first layer)
        dims["hidden"] = max(widths)
    return dims


def _graph_dims(net: nn.Module, shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str]) -> dict[str, int]:
    """The same sizes for a converted graph, read from the operand of its first matrix product (q)."""
    products = [name for name, kind in kinds.items() if kind == "matmul"]
    if not products or len(shapes[products[0]]) < 3:
        return {}
    q = shapes[products[0]]  # (B, heads, N, head_dim), or (B, N, head_dim)
    heads = q[-3] if len(q) >= 4 else 1
    dims = {"tokens": q[-2], "channels": heads * q[-1], "heads": heads, "head_dim": q[-1],
            "blocks": len({split_block(n)[0] for n in products})}
    block = split_block(products[0])[0]
    widths = [sub.linear.out_features for path, sub in net.named_modules()
              if isinstance(sub, SpikingLinear) and block and split_block(path)[0] == block
              and sub.linear.out_features not in (dims["channels"], 3 * dims["channels"])]
    if widths:  # Ch: the widest Linear of the block besides q, k, v and the projection
        dims["hidden"] = max(widths)
    return dims


def ops_report(model_name: str, img_size: Optional[int] = None) -> dict[str, Any]:
    """Theoretical complexity of a timm model, for ``ecmt ops`` (Table 3 for any model).

    The model is built on the ``meta`` device: no weights are downloaded or allocated.

    Args:
        model_name: A timm model name, e.g. ``"eva_giant_patch14_336"``.
        img_size: Input resolution; the model's default if None.

    Returns:
        ``{"model", "input_size", "dims", "total_macs", "blocks", "outside"}``; MACs per
        sample, as ints.

    Raises:
        UnsupportedModelError: Unknown model name, or a model that cannot be converted.

    Example:
        >>> r = ops_report("eva_giant_patch14_336")
        >>> r["dims"]["tokens"], round(r["blocks"]["blocks.0"]["attn.qk"] / 1e6, 2)
        (577, 468.76)
    """
    import timm
    from timm.data import resolve_model_data_config

    kwargs = {} if img_size is None else {"img_size": img_size}
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise UnsupportedModelError(str(e)) from None
    size = tuple(resolve_model_data_config(model)["input_size"])
    if img_size is not None:
        size = (size[0], img_size, img_size)
    table = theoretical_ops(model, torch.empty(1, *size, device="meta"))
    return {"model": model_name, "input_size": list(size), **table.to_dict()}


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class SiteSpikes:
    """Spikes of one MT neuron site during a measurement.

    Attributes:
        pos: Spikes on each positive threshold θ1·2^k, k = 0..n-1.
        neg: Spikes on each negative threshold −θ2·2^k.
        neuron_steps: Neurons × samples × steps simulated.
    """

    pos: tuple[int, ...]
    neg: tuple[int, ...]
    neuron_steps: int

    @property
    def rate(self) -> float:
        """Spikes per neuron per step (at most 1: one spike per step)."""
        return (sum(self.pos) + sum(self.neg)) / max(self.neuron_steps, 1)


@dataclass(frozen=True)
class Measurement:
    """Operations of an SNN simulation, from :class:`OpCounter`.

    Attributes:
        samples: ``samples[t-1]`` is the number of samples simulated for at least t steps.
        kinds: Module path -> kind (``"linear"``, ``"matmul"``, ``"nonlinear"``, ``"analog"``).
        terms: Module path -> term (:data:`AC_TERMS`, :data:`MAC_TERMS`) -> count at each step,
            summed over samples (only the terms that apply to the module's kind).
        ann_macs: Module path -> MACs of the ANN on the same inputs, summed over the samples
            of step 1 (the Table 3 formulas on the shapes seen).
        spikes: Site path -> spikes per threshold level.
    """

    samples: tuple[int, ...]
    kinds: Mapping[str, str]
    terms: Mapping[str, Mapping[str, tuple[int, ...]]]
    ann_macs: Mapping[str, int]
    spikes: Mapping[str, SiteSpikes]

    @property
    def steps(self) -> int:
        return len(self.samples)

    def _sum(self, names: tuple[str, ...], module: Optional[str]) -> tuple[int, ...]:
        mods = [module] if module is not None else list(self.terms)
        return tuple(sum(self.terms[m].get(k, (0,) * self.steps)[t] for m in mods for k in names)
                     for t in range(self.steps))

    def acs(self, module: Optional[str] = None) -> tuple[int, ...]:
        """ACs at each step, for one module or the whole network (summed over samples)."""
        return self._sum(AC_TERMS, module)

    def macs(self, module: Optional[str] = None) -> tuple[int, ...]:
        """Remaining MACs at each step, for one module or the whole network."""
        return self._sum(MAC_TERMS, module)

    def per_sample(self, counts: tuple[int, ...]) -> list[float]:
        """Per-step counts divided by the samples that reached each step."""
        return [c / n for c, n in zip(counts, self.samples)]

    @property
    def ann_macs_per_sample(self) -> float:
        """MACs of the ANN on one sample, over the counted modules.

        Raises:
            ValueError: Nothing was simulated while counting.
        """
        if not self.samples:
            raise ValueError("no time step was simulated inside the OpCounter")
        return sum(self.ann_macs.values()) / self.samples[0]

    def __add__(self, other: "Measurement") -> "Measurement":
        """The counts of both measurements, e.g. of two sets of batches (the same as one
        :class:`OpCounter` around both)."""
        def add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(x + y for x, y in zip_longest(a, b, fillvalue=0))

        terms = {}
        for name in {**self.terms, **other.terms}:
            mine, theirs = self.terms.get(name, {}), other.terms.get(name, {})
            terms[name] = {k: add(mine.get(k, ()), theirs.get(k, ())) for k in {**mine, **theirs}}
        ann = {k: self.ann_macs.get(k, 0) + other.ann_macs.get(k, 0) for k in {**self.ann_macs, **other.ann_macs}}
        spikes = {k: _merge([s for s in (self.spikes.get(k), other.spikes.get(k)) if s is not None])
                  for k in {**self.spikes, **other.spikes}}
        return Measurement(add(self.samples, other.samples), {**self.kinds, **other.kinds}, terms, ann, spikes)

    def to_dict(self) -> dict[str, Any]:
        """The counts as plain JSON-able data (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Measurement":
        """A measurement from :meth:`to_dict`, also after a round trip through JSON."""
        return cls(tuple(d["samples"]), dict(d["kinds"]),
                   {m: {k: tuple(v) for k, v in ts.items()} for m, ts in d["terms"].items()}, dict(d["ann_macs"]),
                   {k: SiteSpikes(tuple(s["pos"]), tuple(s["neg"]), s["neuron_steps"]) for k, s in d["spikes"].items()})


def _fresh(m: Stateful) -> bool:
    """True when ``m`` is in its reset state (no time step since the last reset)."""
    return all(getattr(m, k) is None if v is None else getattr(m, k) == v for k, v in m._state.items())


class OpCounter:
    """Counts the operations of an SNN simulation, per module and per time step.

    A context manager: on entry it attaches forward hooks to every SpikingLinear, MatMulEC,
    EC and analog input module and turns on the MT neurons' spike counters; on exit it
    removes the hooks and restores the counters' flags. A step is one forward call of the
    model; the step index restarts at 1 whenever the model's state has been reset (as
    :func:`ecmt.simulate` does), so several inputs can be simulated inside one counter.
    What each term counts is described in the module docstring.

    Args:
        model: A :class:`~ecmt.conversion.SpikingModel` (or any module holding converted
            layers). Enter the counter before a sequence starts.

    Example:
        >>> with OpCounter(snn) as counter:                       # doctest: +SKIP
        ...     for images, _ in loader:
        ...         ecmt.simulate(snn, images, T=8)
        >>> counter.result().acs()                                 # doctest: +SKIP
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.net = model.net if isinstance(model, SpikingModel) else model
        self._stateful = stateful_modules(self.net)
        self._neurons = [(n, m) for n, m in self.net.named_modules() if isinstance(m, MTNeuron)]
        self._step = 0
        self._samples: list[int] = []
        self._terms: dict[str, dict[str, list[int]]] = {}
        self._kinds: dict[str, str] = {}
        self._ann: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._before: dict[str, tuple[bool, Tensor, Tensor]] = {}
        self._spikes: Optional[dict[str, SiteSpikes]] = None

    def __enter__(self) -> "OpCounter":
        self._handles = [self.model.register_forward_pre_hook(self._on_step, with_kwargs=True)]
        self._handles += _attach(self.net, self._on_module)
        for name, n in self._neurons:
            self._before[name] = (n.record, n.spike_counts.clone(), n.neuron_steps.clone())
            n.record = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._spikes = self._spike_deltas()
        for name, n in self._neurons:
            n.record = self._before[name][0]

    def _on_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._step = 1 if all(_fresh(m) for m in self._stateful) else self._step + 1
        if len(self._samples) < self._step:
            self._samples.append(0)
        self._samples[self._step - 1] += _batch_size(args, kwargs)

    def _add(self, name: str, term: str, value: int) -> None:
        counts = self._terms.setdefault(name, {}).setdefault(term, [])
        counts.extend([0] * (self._step - len(counts)))
        counts[self._step - 1] += value

    def _on_module(self, name: str, kind: str, m: nn.Module, args: tuple, out: Any) -> None:
        self._kinds[name] = kind
        dense = _dense_macs(m, args, out)
        if self._step == 1:
            self._ann[name] = self._ann.get(name, 0) + dense
        if kind == "linear":  # Eq. 28: one weight column added per input spike
            self._add(name, "ac_fanout", int(torch.count_nonzero(args[0])) * m.out_features)
        elif kind == "matmul":
            self._count_matmul(name, m, *args, out)
        elif kind == "nonlinear":  # Eq. 15
            x = args[0]
            self._add(name, "mac_fn", x.numel())
            self._add(name, "mac_ec", x.numel() + out.numel() if m.t > 1 else 0)
        else:
            self._add(name, "mac_analog", dense)

    def _count_matmul(self, name: str, m: MatMulEC, a: Tensor, b: Tensor, out: Tensor) -> None:
        sa, sb = a != 0, b != 0
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        # Eq. 18, first term: pairs of nonzero spikes meeting on the inner index k
        self._add(name, "ac_spike_spike", int((sa.sum(-2) * sb.sum(-1)).sum()))
        first = m.t == 1  # S_A(0) = S_B(0) = 0: the last two terms of Eq. 18 vanish
        nnz_a = int(sa.sum((-2, -1)).expand(batch).sum())
        nnz_b = int(sb.sum((-2, -1)).expand(batch).sum())
        self._add(name, "ac_spike_sum", 0 if first else nnz_a * b.shape[-1])  # A(T)·S_B(T−1)
        self._add(name, "ac_sum_spike", 0 if first else nnz_b * a.shape[-2])  # S_A(T−1)·B(T)
        self._add(name, "mac_rescale", 0 if first else out.numel())  # Eq. 16: S_K(T)/T

    def _spike_deltas(self) -> dict[str, SiteSpikes]:
        out = {}
        for name, n in self._neurons:
            _, counts, steps = self._before[name]
            d = (n.spike_counts - counts).tolist()
            out[name] = SiteSpikes(tuple(d[0]), tuple(d[1]), int(n.neuron_steps - steps))
        return out

    def result(self) -> Measurement:
        """The counts so far (inside the context) or of the whole context (after it)."""
        steps = len(self._samples)
        terms = {name: {k: tuple(v + [0] * (steps - len(v))) for k, v in ts.items()}
                 for name, ts in self._terms.items()}
        spikes = self._spikes if self._spikes is not None else self._spike_deltas()
        return Measurement(tuple(self._samples), dict(self._kinds), terms, dict(self._ann), spikes)


def measure(snn: SpikingModel, x: Any, T: int) -> Measurement:
    """Simulate ``snn`` on ``x`` for ``T`` steps and count its operations.

    Example:
        >>> m = measure(snn, images, T=4)          # doctest: +SKIP
        >>> energy_ratio(m)                          # doctest: +SKIP
        {1: 0.05, 2: 0.12, 3: 0.2, 4: 0.28}
    """
    with OpCounter(snn) as counter:
        for _ in simulate_steps(snn, x, T):
            pass
    return counter.result()


# --------------------------------------------------------------------------- energy


def energy_ratio(m: Measurement, config: EnergyConfig = EnergyConfig(), *, full: bool = False) -> dict[int, float]:
    """E_SNN / E_ANN (Eq. 30) for the steps 1..t, for every t.

    Args:
        m: A measurement.
        config: Energy per MAC and per AC.
        full: Include the MACs that remain in the SNN (EC functions and arithmetic, Eq. 16
            rescaling, analog input). False is the paper's convention, ``MACs_SNN = 0``.

    Returns:
        ``{t: ratio}``, cumulative: the energy of steps 1..t over one ANN inference.

    Example:
        >>> energy_ratio(m)                            # doctest: +SKIP
        {1: 0.06, 2: 0.15, 3: 0.25, 4: 0.35}
    """
    e_ann = m.ann_macs_per_sample * config.e_mac  # Eq. 30, denominator
    acs, macs = m.per_sample(m.acs()), m.per_sample(m.macs())
    out, e_snn = {}, 0.0
    for t in range(m.steps):
        e_snn += acs[t] * config.e_ac + (macs[t] * config.e_mac if full else 0.0)  # Eq. 30, numerator
        out[t + 1] = e_snn / e_ann
    return out


def firing_rates(m: Measurement) -> dict[str, Any]:
    """Firing rates per threshold level (paper Fig. 6), per site and per layer.

    Returns:
        ``{"levels": {"pos": [...], "neg": [...]}, "mean": r, "sites": {site: {"rate", "pos",
        "neg"}}, "layers": {layer: r}}``. A rate is spikes per neuron per step; level k of
        ``pos`` is the threshold θ1·2^k. A layer is a repeated block (``blocks.3``), or a
        site outside the blocks.

    Example:
        >>> firing_rates(m)["levels"]["pos"][:2]        # doctest: +SKIP
        [0.061, 0.004]
    """
    layers: dict[str, list[SiteSpikes]] = {}
    for name, s in m.spikes.items():
        layers.setdefault(split_block(name)[0] or name, []).append(s)
    network = _rates(_merge(m.spikes.values()))
    return {
        "levels": {"pos": network["pos"], "neg": network["neg"]},
        "mean": network["rate"],
        "sites": {name: _rates(s) for name, s in m.spikes.items()},
        "layers": {name: _merge(ss).rate for name, ss in layers.items()},
    }


def _merge(spikes: Iterable[SiteSpikes]) -> SiteSpikes:
    spikes = list(spikes)
    return SiteSpikes(tuple(map(sum, zip(*(s.pos for s in spikes)))), tuple(map(sum, zip(*(s.neg for s in spikes)))),
                      sum(s.neuron_steps for s in spikes))


def _rates(s: SiteSpikes) -> dict[str, Any]:
    n = max(s.neuron_steps, 1)
    return {"rate": s.rate, "pos": [c / n for c in s.pos], "neg": [c / n for c in s.neg]}


def energy_report(m: Measurement, config: EnergyConfig = EnergyConfig()) -> dict[str, Any]:
    """A measurement as a JSON-serialisable dict (for ``ecmt evaluate`` and the plots).

    Counts are per sample. ``energy_ratio`` is the paper's convention (Eq. 30 with
    ``MACs_SNN = 0``), ``energy_ratio_full`` includes the remaining MACs; both are cumulative
    over steps 1..t and keyed by ``str(t)``. ``modules`` gives, per module, its kind, its ANN
    MACs and its SNN ACs, MACs and individual terms at each step.

    Example:
        >>> json.dumps(energy_report(measure(snn, images, T=4)))   # doctest: +SKIP
    """
    def keyed(d: Mapping[int, float]) -> dict[str, float]:
        return {str(t): v for t, v in d.items()}

    ann = m.ann_macs_per_sample
    n = m.samples[0]
    modules = {
        name: {"kind": m.kinds[name], "ann_macs": m.ann_macs.get(name, 0) / n,
               "snn_acs": m.per_sample(m.acs(name)), "snn_macs": m.per_sample(m.macs(name)),
               "terms": {k: m.per_sample(v) for k, v in m.terms[name].items()}}
        for name in m.terms
    }
    return {
        "config": {"e_mac_pj": config.e_mac, "e_ac_pj": config.e_ac},
        "steps": m.steps,
        "samples": n,
        "energy_ratio": keyed(energy_ratio(m, config)),
        "energy_ratio_full": keyed(energy_ratio(m, config, full=True)),
        "totals": {"ann_macs": ann, "snn_acs": m.per_sample(m.acs()),
                   "snn_macs": m.per_sample(m.macs())},
        "modules": modules,
        "firing_rates": firing_rates(m),
    }


def module_energy(report: Mapping[str, Any], T: Optional[int] = None) -> dict[str, dict[str, float]]:
    """Energy per module type, summed over the blocks, from an :func:`energy_report` dict.

    Modules are grouped by their path inside the block (``attn.qkv`` for every
    ``blocks.i.attn.qkv``, like the rows of Table 3); modules outside the blocks keep their path.

    Args:
        report: The output of :func:`energy_report` (or the same dict read back from JSON).
        T: Number of steps to accumulate; all the steps measured if None.

    Returns:
        ``{name: {"ann": pJ, "snn": pJ, "snn_full": pJ}}`` per sample; ``snn`` is the paper's
        convention (ACs only), ``snn_full`` adds the remaining MACs.

    Example:
        >>> module_energy(energy_report(m), T=4)["attn.qkv"]            # doctest: +SKIP
        {'ann': 1.5e9, 'snn': 2.1e8, 'snn_full': 2.1e8}
    """
    e_mac, e_ac = report["config"]["e_mac_pj"], report["config"]["e_ac_pj"]
    steps = report["steps"] if T is None else T
    if not 1 <= steps <= report["steps"]:
        raise ValueError(f"T must be in 1..{report['steps']}, got {T}")
    out: dict[str, dict[str, float]] = {}
    for path, mod in report["modules"].items():
        acs, macs = sum(mod["snn_acs"][:steps]), sum(mod["snn_macs"][:steps])
        row = out.setdefault(split_block(path)[1], {"ann": 0.0, "snn": 0.0, "snn_full": 0.0})
        row["ann"] += mod["ann_macs"] * e_mac  # Eq. 30 per module
        row["snn"] += acs * e_ac
        row["snn_full"] += acs * e_ac + macs * e_mac
    return out


__all__ = [
    "AC_TERMS", "EnergyConfig", "MAC_TERMS", "Measurement", "OpCounter", "OpTable", "SiteSpikes",
    "energy_ratio", "energy_report", "firing_rates", "measure", "module_energy", "ops_report", "split_block",
    "theoretical_ops",
]
