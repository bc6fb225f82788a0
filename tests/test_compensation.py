"""Expectation compensation: Theorem 4.1 (Eq. 15) and Theorem 4.2 (Eq. 16-18) as properties."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from ecmt import ExpectationCompensation, MatMulEC
from ecmt.compensation import eq18_increment
from ecmt.layers import MaskedSoftmax

FUNCTIONS = {
    "layernorm": lambda: nn.LayerNorm(6),
    "gelu": nn.GELU,
    "softmax": MaskedSoftmax,
    "tanh": nn.Tanh,
}


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(FUNCTIONS)), T=st.integers(1, 40), seed=st.integers(0, 1000),
       scale=st.floats(0.1, 5.0))
def test_theorem_4_1_sum_of_outputs_is_T_times_F_of_mean(name, T, seed, scale):
    g = torch.Generator().manual_seed(seed)
    fn = FUNCTIONS[name]()
    if isinstance(fn, nn.LayerNorm):
        with torch.no_grad():
            fn.weight.copy_(torch.randn(6, generator=g))
            fn.bias.copy_(torch.randn(6, generator=g))
    ec = ExpectationCompensation(fn)
    xs = torch.randn(T, 3, 6, generator=g) * scale
    total = torch.zeros(3, 6)
    for t in range(T):
        total += ec(xs[t])
        expected = (t + 1) * fn(xs[: t + 1].mean(0))
        torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-4 * (t + 1))


def test_first_step_is_exactly_F():
    fn = nn.LayerNorm(5)
    x = torch.randn(2, 5)
    assert torch.equal(ExpectationCompensation(fn)(x), fn(x))


def test_extra_arguments_reach_F_at_every_step():
    ec = ExpectationCompensation(MaskedSoftmax())
    mask = torch.tensor([0.0, 0.0, float("-inf")])
    total = sum(ec(torch.randn(3), mask) for _ in range(5))
    assert total[2] == 0  # the masked position never receives weight


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 30), seed=st.integers(0, 1000), n=st.integers(1, 5), d=st.integers(1, 5),
       m=st.integers(1, 5))
def test_theorem_4_2_sum_of_outputs_is_SA_SB_over_T(T, seed, n, d, m):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(T, 2, n, d, generator=g), torch.randn(T, 2, d, m, generator=g)
    mm = MatMulEC()
    total = torch.zeros(2, n, m)
    for t in range(T):
        total += mm(a[t], b[t])
        k = t + 1
        torch.testing.assert_close(total, k * a[:k].mean(0) @ b[:k].mean(0), rtol=1e-4, atol=1e-4 * k)


def test_eq18_builds_the_same_product_incrementally():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 3, 4, generator=g), torch.randn(6, 4, 2, generator=g)
    sa, sb, sk = torch.zeros(3, 4), torch.zeros(4, 2), torch.zeros(3, 2)
    dense = MatMulEC()
    prev = torch.zeros(3, 2)
    for t in range(6):
        sk = sk + eq18_increment(a[t], b[t], sa, sb)  # Eq. 17
        sa, sb = sa + a[t], sb + b[t]
        torch.testing.assert_close(sk, sa @ sb, rtol=1e-5, atol=1e-5)
        out = sk / (t + 1) - (prev if t else 0)  # Eq. 16
        prev = sk / (t + 1)
        torch.testing.assert_close(dense(a[t], b[t]), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [nn.GELU(), MaskedSoftmax()], ids=["gelu", "softmax"])
def test_large_T_running_mean_stays_accurate(fn, one_thread):
    """T = 1024: the cancellation in Eq. 15 must not ruin the running mean.

    Tolerance: the running mean of the outputs matches F(mean input) to 1e-5 absolute
    (float32 accumulators; the error grows roughly like T · eps_float32).
    """
    g = torch.Generator().manual_seed(0)
    ec = ExpectationCompensation(fn)
    xs = torch.randn(1024, 4, 16, generator=g) * 3
    total = torch.zeros(4, 16, dtype=torch.float64)
    for t in range(1024):
        total += ec(xs[t]).double()
    err = (total / 1024 - fn(xs.double().mean(0).float()).double()).abs().max()
    assert err < 1e-5


@pytest.fixture
def one_thread():
    """1024 steps of tiny tensors: a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["layernorm", "softmax", "matmul"])
def test_large_T_in_half_precision_keeps_float32_accumulators(name, dtype, one_thread):
    """T = 1024 on bf16/fp16 inputs: the outputs are in the input dtype, the running sums float32.

    Tolerance: each output O(t) is rounded once to the input dtype (relative error eps/2), and
    the float32 sums add next to nothing (1e-5, as in float32 above), so the running mean after
    T steps matches F(mean input) within eps/2 · mean_t |O(t)| + 1e-5, element by element.
    A sum kept in bf16 would have stopped growing long before (1024 · 3 > 2^8).
    """
    T, g = 1024, torch.Generator().manual_seed(0)
    if name == "matmul":
        a, b = torch.randn(T, 2, 4, 8, generator=g).to(dtype), torch.randn(T, 2, 8, 5, generator=g).to(dtype)
        module, inputs = MatMulEC(), list(zip(a, b))
        ref = a.double().mean(0) @ b.double().mean(0)
    else:
        fn = nn.LayerNorm(16) if name == "layernorm" else MaskedSoftmax()
        xs = (torch.randn(T, 4, 16, generator=g) * 3).to(dtype)
        module, inputs = ExpectationCompensation(fn), [(x,) for x in xs]
        ref = fn(xs.double().mean(0).float()).double()
    total, magnitude = torch.zeros(ref.shape, dtype=torch.float64), torch.zeros(ref.shape, dtype=torch.float64)
    with torch.no_grad():
        for x in inputs:
            out = module(*x)
            total += out.double()
            magnitude += out.double().abs()
    sums = (module.sa, module.sb) if name == "matmul" else (module.s,)
    assert out.dtype == dtype and all(s.dtype == torch.float32 for s in sums)
    error = (total / T - ref).abs()
    assert (error <= torch.finfo(dtype).eps / 2 * magnitude / T + 1e-5).all()
