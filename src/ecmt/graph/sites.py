"""The rewrite pass: MT neurons, EC modules and matrix-product EC modules into a captured graph.

Each dynamic node is treated by the kind :func:`ecmt.graph.rules.kind_of` gives it:

* weighted layer: an MT neuron on its input (one per input tensor: layers reading the same
  tensor share it), the layer as a :class:`~ecmt.layers.SpikingLinear` that sees spikes;
* product of two dynamic tensors: MT neurons on both operands, :class:`~ecmt.compensation.MatMulEC`;
* fused attention: neurons on q, k and v, ``q·kᵀ`` (MatMulEC), EC(softmax with scale and
  masks), a neuron on the attention map, ``attn·v`` (MatMulEC);
* nonlinear op: an n-ary :class:`~ecmt.compensation.ExpectationCompensation` whose F is the op;
* linear op: kept.

Modules are registered on the graph module at readable paths taken from the ANN's module
tree: ``blocks.3.attn.qkv`` (the Linear), ``blocks.3.attn.qkv.neuron`` (its site),
``blocks.3.attn.q_neuron``, ``blocks.3.attn.qk``, ``blocks.3.norm1`` (EC of a LayerNorm).
An op that fits no kind is collected, and :class:`~ecmt.errors.UnsupportedModelError` names
every one with its module path.
"""
from __future__ import annotations

import operator
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

import torch
from torch import Tensor, fx, nn

from ..compensation import ExpectationCompensation, MatMulEC
from ..errors import UnsupportedModelError
from ..layers import SpikingLinear
from . import rules
from .classify import Time
from .functions import AttentionSoftmax, NodeFunction, Slot, default_scale
from .rules import Kind, aten

SiteFactory = Callable[[str], nn.Module]

_ATTN_ROLES = ("q_neuron", "k_neuron", "v_neuron", "qk", "softmax", "attn_neuron", "av")
_HOISTABLE = {aten.expand, aten.reshape, aten.view, aten.unsqueeze, aten.slice, aten.clone, aten.contiguous}
"""Ops through which a neuron is moved back to its source: they only replicate or reshape
(grouped-query attention repeats k and v), so the spikes of the source, replicated, are the
spikes of the copy, and fewer neurons are simulated."""


def module_path(node: fx.Node) -> str:
    """The dotted path of the ANN module that ran ``node`` ('' for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_empty") else path


class Rewriter:
    """Runs the rewrite on one graph module (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, ann: nn.Module, make_site: SiteFactory, time: dict[fx.Node, Time]) -> None:
        self.gm, self.ann, self.make_site, self.time = gm, ann, make_site, time
        self.taken: set[str] = set()
        self.spikes: dict[fx.Node, tuple[fx.Node, nn.Module]] = {}
        self.bad: list[tuple[str, str]] = []
        self.static: dict[fx.Node, bool] = {}
        self.values: dict[fx.Node, Any] = {}
        self.nonlinear_per_path = Counter()

    # ------------------------------------------------------------------ helpers

    def dynamic(self, x: Any) -> bool:
        return isinstance(x, fx.Node) and self.time.get(x, Time.DYNAMIC) is Time.DYNAMIC

    def is_static(self, node: fx.Node) -> bool:
        """Whether ``node`` depends on parameters and literals only (so it can be evaluated now)."""
        if node not in self.static:
            if node.op == "get_attr":
                self.static[node] = True
            elif node.op == "call_function":
                self.static[node] = all(self.is_static(n) for n in node.all_input_nodes)
            else:
                self.static[node] = False
        return self.static[node]

    def value(self, x: Any) -> Any:
        """The value of a static argument."""
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(v) for v in x)
        if not isinstance(x, fx.Node):
            return x
        if x not in self.values:
            if x.op == "get_attr":
                obj = self.gm
                for part in x.target.split("."):
                    obj = getattr(obj, part)
                self.values[x] = obj
            else:
                self.values[x] = x.target(*self.value(tuple(x.args)),
                                          **{k: self.value(v) for k, v in x.kwargs.items()})
        return self.values[x]

    def ann_leaf(self, path: str) -> bool:
        """Whether the ANN module at ``path`` has no submodules (a Linear, a GELU, a norm)."""
        try:
            return bool(path) and not any(True for _ in self.ann.get_submodule(path).children())
        except AttributeError:
            return False

    def claim(self, *candidates: str) -> str:
        """The first free name among ``candidates``, else the last one with a number appended."""
        for name in candidates:
            if name and name not in self.taken and not self._occupied(name):
                self.taken.add(name)
                return name
        base, k = candidates[-1], 1
        while f"{base}{k}" in self.taken or self._occupied(f"{base}{k}"):
            k += 1
        self.taken.add(f"{base}{k}")
        return f"{base}{k}"

    def _occupied(self, name: str) -> bool:
        """A module is registered there that is not one of the ANN's parameter holders (replaceable)."""
        try:
            m = self.gm.get_submodule(name)
        except AttributeError:
            return False
        return type(m) is not nn.Module or any(True for _ in m.children())

    def register(self, name: str, module: nn.Module) -> None:
        self.gm.add_submodule(name, module)

    def call(self, name: str, args: tuple) -> fx.Node:
        return self.gm.graph.call_module(name, args)

    def spike(self, x: fx.Node, name: str, owner: Optional[Callable[[nn.Module], None]] = None) -> fx.Node:
        """The spikes of tensor ``x``, from its MT neuron; called with the graph's insertion
        point before the consumer.

        A tensor that already has a neuron (another layer reads it too) keeps it; else a site
        is made at ``name`` and registered there, or handed to ``owner``, which registers it
        (a layer that keeps its site as its child). The neuron is moved back through pure
        replications (:data:`_HOISTABLE`), whose ops are then applied to the spikes.
        """
        src, through = self._hoist(x)
        if src not in self.spikes:
            site = self.make_site(name)
            if owner is not None:
                owner(site)
            else:
                self.register(name, site)
            with self.gm.graph.inserting_after(src):
                self.spikes[src] = (self.call(name, (src,)), site)
        out = self.spikes[src][0]
        for op in through:  # replicate the spikes as the graph replicated the tensor
            out = self.gm.graph.call_function(op.target, (out, *op.args[1:]), dict(op.kwargs))
        return out

    def _hoist(self, x: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
        through: list[fx.Node] = []
        while (x.op == "call_function" and rules.packet(x) in _HOISTABLE and len(x.users) == 1
               and isinstance(x.args[0], fx.Node) and self.dynamic(x.args[0])
               and not any(self.dynamic(a) for a in x.all_input_nodes[1:])):
            through.append(x)
            x = x.args[0]
        return x, through[::-1]

    # ------------------------------------------------------------------ the pass

    def run(self) -> None:
        nodes = [n for n in self.gm.graph.nodes if n.op == "call_function" and self.dynamic(n)]
        kinds = {n: rules.kind_of(n, self.dynamic) for n in nodes}
        for n, k in kinds.items():
            if k is Kind.NONLINEAR:
                self.nonlinear_per_path[module_path(n)] += 1
        for node in nodes:
            kind = kinds[node]
            path = module_path(node)
            if kind is None:
                self.bad.append((f"{rules.op_name(node)} ({node.target})", path or "<root>"))
            elif kind is Kind.IGNORED:
                self.gm.graph.erase_node(node)
            elif kind is Kind.WEIGHTED:
                self.weighted(node, path)
            elif kind is Kind.PRODUCT:
                self.product(node, path)
            elif kind is Kind.ATTENTION:
                self.attention(node, path)
            elif kind is Kind.NONLINEAR:
                self.nonlinear(node, path)
        if not self.bad:
            self.encoders()
            self.cleanup()

    def _replace(self, node: fx.Node, new: fx.Node) -> None:
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def weighted(self, node: fx.Node, path: str) -> None:
        layer = self.layer(node, path)
        if layer is None:
            return
        data = node.args[1] if rules.packet(node) is aten.addmm else node.args[0]
        name = self.claim(*self.layer_names(node, path))
        made: list[SpikingLinear] = []

        def own(site: nn.Module) -> None:  # the layer keeps its site as its child: name.neuron
            made.append(SpikingLinear(site, layer, fires=False))
            self.register(name, made[0])

        with self.gm.graph.inserting_before(node):
            spikes = self.spike(data, f"{name}.neuron", own)
            if not made:  # fed by another layer's site
                self.register(name, SpikingLinear(None, layer, fires=False, site=self.spikes[self._hoist(data)[0]][1]))
            self._replace(node, self.call(name, (spikes,)))

    def layer_names(self, node: fx.Node, path: str) -> tuple[str, ...]:
        """Names for a weighted layer, best first: the ANN module that ran it if that is the
        layer itself, the module holding its weight (``F.linear(x, self.qkv.weight)``), and
        ``{path}.{op}``."""
        weight = node.args[2] if rules.packet(node) is aten.addmm else node.args[1]
        holder = ""
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and "." in weight.target:
            holder = weight.target.rsplit(".", 1)[0]
            holder = holder if self.ann_leaf(holder) else ""
        return (path if self.ann_leaf(path) else "", holder, f"{path}.{rules.op_name(node)}".lstrip("."))

    def layer(self, node: fx.Node, path: str, report: bool = True) -> Optional[nn.Module]:
        """The ANN's weighted layer of ``node`` as a module that shares its weights (None if it
        cannot be rebuilt: reported unless ``report`` is False)."""
        target = rules.packet(node)
        args = list(node.args)
        try:
            if target is aten.linear:
                w, b = self.value(args[1]), self.value(args[2]) if len(args) > 2 else None
            elif target is aten.addmm:
                w, b = self.value(args[2]).t(), self.value(args[0])
            elif target in (aten.matmul, aten.mm):
                w, b = self.value(args[1]).t(), None
            else:
                return self.conv(node, args)
        except Exception as e:  # noqa: BLE001 - a weight that is not a constant of the graph
            if report:
                self.bad.append((f"{rules.op_name(node)} with computed weights ({type(e).__name__})", path or "<root>"))
            return None
        if w.dim() != 2:
            if report:
                self.bad.append((f"{rules.op_name(node)} with a {w.dim()}-D weight", path or "<root>"))
            return None
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = _parameter(w)
        if b is not None:
            lin.bias = _parameter(b)
        return lin

    def conv(self, node: fx.Node, args: list) -> nn.Module:
        target = rules.packet(node)
        w = self.value(args[1])
        b = self.value(args[2]) if len(args) > 2 else None
        defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        if target is aten.convolution:
            stride, padding, dilation, transposed, _, groups = args[3:9]
            if transposed:
                raise NotImplementedError("transposed convolution")
        else:
            names = ("stride", "padding", "dilation", "groups")
            got = dict(zip(names, args[3:]), **{k: v for k, v in node.kwargs.items() if k in names})
            stride, padding, dilation, groups = (got.get(k, defaults[k]) for k in names)
        dims = w.dim() - 2
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        conv = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                   dilation=dilation, groups=groups, bias=b is not None, device="meta")
        conv.weight = _parameter(w)
        if b is not None:
            conv.bias = _parameter(b)
        return conv

    def product(self, node: fx.Node, path: str) -> None:
        if rules.packet(node) is aten.linear:  # x·Wᵀ with a dynamic W
            self.bad.append(("linear with a dynamic weight", path or "<root>"))
            return
        name = self.claim(f"{path}.matmul".lstrip("."))
        self.register(name, MatMulEC())
        a, b = node.args[:2]
        with self.gm.graph.inserting_before(node):
            sa = self.spike(a, f"{name}.a_neuron") if self.dynamic(a) else a
            sb = self.spike(b, f"{name}.b_neuron") if self.dynamic(b) else b
            self._replace(node, self.call(name, (sa, sb)))

    def attention(self, node: fx.Node, path: str) -> None:
        names = dict(zip(("q", "k", "v", "mask", "dropout", "causal"), node.args))
        names.update({k.replace("attn_mask", "mask").replace("is_causal", "causal"): v for k, v in node.kwargs.items()})
        q, k, v, mask = names["q"], names["k"], names["v"], names.get("mask")
        if self.dynamic(mask):
            self.bad.append(("scaled_dot_product_attention with a dynamic mask", path or "<root>"))
            return
        scale = names.get("scale") or default_scale(q)
        base = f"{path}." if path else ""
        suffix = ""
        while any(f"{base}{r}{suffix}" in self.taken for r in _ATTN_ROLES):
            suffix = str(int(suffix or 0) + 1)
        role = {r: f"{base}{r}{suffix}" for r in _ATTN_ROLES}
        self.taken.update(role.values())
        graph = self.gm.graph
        with graph.inserting_before(node):
            sq = self.spike(q, role["q_neuron"]) if self.dynamic(q) else q
            sk = self.spike(k, role["k_neuron"]) if self.dynamic(k) else k
            sv = self.spike(v, role["v_neuron"]) if self.dynamic(v) else v
            if names.get("enable_gqa"):
                rep = q.meta["val"].shape[-3] // k.meta["val"].shape[-3]
                sk = graph.call_function(aten.repeat_interleave.self_int, (sk, rep, -3))
                sv = graph.call_function(aten.repeat_interleave.self_int, (sv, rep, -3))
            kt = graph.call_function(aten.transpose.int, (sk, -2, -1))
            self.register(role["qk"], MatMulEC(key_axis=-1))  # kᵀ: keys along its last axis
            scores = self.call(role["qk"], (sq, kt))  # (B, H, L, S)
            self.register(role["softmax"], ExpectationCompensation(
                AttentionSoftmax(float(scale), bool(names.get("causal", False)))))
            probs = self.call(role["softmax"], (scores,) if mask is None else (scores, mask))
            site = self.make_site(role["attn_neuron"])
            self.register(role["attn_neuron"], site)
            sp = self.call(role["attn_neuron"], (probs,))
            self.spikes[probs] = (sp, site)
            self.register(role["av"], MatMulEC(key_axis=-2))
            self._replace(node, self.call(role["av"], (sp, sv)))

    def nonlinear(self, node: fx.Node, path: str) -> None:
        inputs: list[fx.Node] = []
        extras: list[fx.Node] = []
        consts: list[Tensor] = []

        def slot(x: Any) -> Any:
            if not isinstance(x, fx.Node):
                return x
            if self.dynamic(x):
                if x not in inputs:
                    inputs.append(x)
                return Slot("in", inputs.index(x))
            if self.is_static(x):
                value = self.value(x)
                if isinstance(value, Tensor):
                    consts.append(value.float() if value.is_floating_point() else value)
                    return Slot("const", len(consts) - 1)
                return value
            if x not in extras:
                extras.append(x)
            return Slot("extra", extras.index(x))

        args = fx.node.map_aggregate(node.args, slot)
        kwargs = fx.node.map_aggregate(dict(node.kwargs), slot)
        fn = NodeFunction(rules.functional(node.target), args, kwargs, consts, len(inputs))
        alone = self.nonlinear_per_path[path] == 1 and self.ann_leaf(path)
        name = self.claim(path if alone else "", f"{path}.{rules.op_name(node)}".lstrip("."))
        self.register(name, ExpectationCompensation(fn, arity=len(inputs)))
        with self.gm.graph.inserting_before(node):
            self._replace(node, self.call(name, (*inputs, *extras)))

    def encoders(self) -> None:
        """The encoding layers (weighted layers on the analog input) as modules, for energy accounting."""
        from .analog import AnalogLayer

        for node in list(self.gm.graph.nodes):
            if node.op != "call_function" or self.time.get(node) is not Time.ENCODED:
                continue
            if rules.packet(node) not in rules.WEIGHTED_OPS:
                continue
            path = module_path(node)
            layer = self.layer(node, path, report=False)
            if layer is None:  # an encoder we cannot rebuild stays an op of the graph
                continue
            data = node.args[1] if rules.packet(node) is aten.addmm else node.args[0]
            name = self.claim(*self.layer_names(node, path))
            self.register(name, AnalogLayer(layer))
            with self.gm.graph.inserting_before(node):
                self._replace(node, self.call(name, (data,)))

    def cleanup(self) -> None:
        graph = self.gm.graph
        for node in reversed(list(graph.nodes)):  # what the rewrite left without users
            if node.users or node.op not in ("get_attr", "call_function"):
                continue
            if node.op == "get_attr" or rules.packet(node) in rules.LINEAR_OPS or node.target is operator.getitem:
                graph.erase_node(node)
        graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()


def _parameter(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def rewrite(gm: fx.GraphModule, ann: nn.Module, make_site: SiteFactory, time: dict[fx.Node, Time]) -> fx.GraphModule:
    """Insert the ECMT modules into ``gm`` in place (see the module docstring).

    Raises:
        UnsupportedModelError: Some ops fit no kind; all are named with their module paths.
    """
    rw = Rewriter(gm, ann, make_site, time)
    rw.run()
    if rw.bad:
        by_op: dict[str, list[str]] = defaultdict(list)
        for op, path in rw.bad:
            if path not in by_op[op]:
                by_op[op].append(path)
        parts = [f"{op} at {', '.join(p[:3])}{', ...' if len(p) > 3 else ''}" for op, p in by_op.items()]
        raise UnsupportedModelError(f"cannot convert {type(ann).__name__}: unsupported operations on "
                                    "spiking values: " + "; ".join(parts))
    return gm
