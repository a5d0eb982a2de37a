"""The C++ causal conv1d (the "torch" backend on CPU) against the reference definition.

float64 must agree to 1e-12 (the same sums in another order); float32 is compared with the float64
reference at max |fast - ref| <= 1e-5 * max |ref| for the output, the final states and every
gradient (x, weight, bias, initial states, through the final states too).
"""

from __future__ import annotations

import pytest
import torch

from openlm_mamba.ops import cpp
from openlm_mamba.ops.causal_conv1d import causal_conv1d
from openlm_mamba.ops.causal_conv1d import cpu as conv_cpu
from openlm_mamba.ops.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_torch

CASES = [  # batch, dim, L, width
    (1, 16, 1, 4),
    (2, 37, 7, 4),
    (2, 20, 2, 4),
    (3, 64, 129, 3),
    (1, 5, 3, 2),
    (2, 33, 50, 1),
    (2, 1, 9, 4),  # one channel: a (batch, L, 1) view has any channel stride
    (1, 1, 5, 2),
]


def grads_of(fn, x, w, b, init, act, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    init_l = None if init is None else init.detach().to(dtype).requires_grad_()
    out, final = fn(*leaves, init_l, True, act)
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    g_fin = torch.randn(final.shape, generator=g, dtype=torch.float64).to(dtype)
    inputs = leaves + ([init_l] if init_l is not None else [])
    grads = torch.autograd.grad((out * g_out).sum() + (final * g_fin).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(i) if d is None else d for d, i in zip(grads, inputs)]
    return [out, final, *grads]


def make(batch, dim, L, width, time_major: bool, init: bool):
    g = torch.Generator().manual_seed(batch * 1000 + dim * 10 + L)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # the model passes a (batch, dim, L) view of a time-major (batch, L, 2 * dim) projection
    x = rnd(batch, L, 2 * dim)[..., :dim].transpose(1, 2) if time_major else rnd(batch, dim, L)
    return x, rnd(dim, width), rnd(dim), (rnd(batch, dim, width - 1) if init else None)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-L{}-w{}".format(*c))
@pytest.mark.parametrize("init", [False, True], ids=["", "init"])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("time_major", [True, False], ids=["tm", "cm"])
def test_matches_reference(case, init, act, time_major):
    x, w, b, x0 = make(*case, time_major=time_major, init=init)
    ref = grads_of(causal_conv1d_ref, x, w, b, x0, act, torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        fast = grads_of(causal_conv1d_torch, x, w, b, x0, act, dtype)
        for f, r in zip(fast, ref):
            if r.numel():
                err = (f.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)
                assert err <= tol, (dtype, err)


def test_cpp_kernel_is_used_and_reads_views_in_place(monkeypatch):
    if cpp.cpp_disabled():
        pytest.skip(f"${cpp.DISABLE_ENV} is set")
    seen = []
    real = torch.ops.openlm_mamba_cpu.conv_fwd

    class Spy:
        def __call__(self, x, *a):
            seen.append(x)
            return real(x, *a)

    monkeypatch.setattr(conv_cpu, "_conv_fwd", Spy())
    xz = torch.randn(2, 40, 64)
    x = xz[..., :32].transpose(1, 2)
    out = causal_conv1d(x, torch.randn(32, 4), torch.randn(32), activation="silu", backend="torch")
    assert len(seen) == 1 and seen[0].data_ptr() == xz.data_ptr(), "the projection is read in place, not copied"
    assert out.shape == (2, 32, 40) and out.transpose(1, 2).is_contiguous()


def test_fallback_without_the_extension(monkeypatch):
    monkeypatch.setattr(conv_cpu, "use_cpp", lambda t: False)
    x, w, b, x0 = make(2, 24, 30, 4, time_major=True, init=True)
    fast = grads_of(causal_conv1d_torch, x, w, b, x0, "silu", torch.float64)
    ref = grads_of(causal_conv1d_ref, x, w, b, x0, "silu", torch.float64)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)


def test_bf16_takes_the_pytorch_conv():
    """The C++ kernel is float32 / float64 only; bf16 runs F.conv1d and still matches (bf16 tolerance)."""
    x, w = torch.randn(1, 16, 10, dtype=torch.bfloat16), torch.randn(16, 4, dtype=torch.bfloat16)
    assert not conv_cpu.cpp_conv_applies(x, w)
    out = causal_conv1d(x, w, activation="silu", backend="torch")
    ref = causal_conv1d_ref(x.double(), w.double(), activation="silu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_are_computed_in_float32_like_the_reference(dtype):
    """16-bit x with float32 weight, bias and initial states: the F.conv1d path computes in float32 and rounds
    once at the end, as the reference does (it used to round the weight and bias to x's dtype first: twice
    the error)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 200, generator=g).to(dtype)
    w, b = torch.randn(64, 4, generator=g), torch.randn(64, generator=g)
    init = torch.randn(2, 64, 3, generator=g)
    exact = causal_conv1d_ref(x.double(), w.double(), b.double(), init.double(), activation="silu")
    ref = causal_conv1d_ref(x, w, b, init, activation="silu")
    out = causal_conv1d(x, w, b, init, activation="silu", backend="torch")
    assert out.dtype == dtype
    ref_err, err = ((t.double() - exact).abs().mean().item() for t in (ref, out))
    assert err <= 1.05 * ref_err, (err, ref_err)
    # rounded once, as the reference: the same 16-bit values but for rare summation-order ties, and none in
    # the first steps, which read the float32 initial states (rounding those first changed a third of them)
    assert (out != ref).float().mean() < 0.005 and torch.equal(out[..., :3], ref[..., :3])
    _, final = causal_conv1d(x, w, b, init, return_final_states=True, backend="torch")
    assert final.dtype == dtype and torch.equal(final, x[..., -3:])


@pytest.mark.parametrize("shape", [(2, 4, 0), (0, 4, 5), (0, 4, 0), (2, 0, 5)], ids=str)
@pytest.mark.parametrize("init", [False, True], ids=["", "init"])
@pytest.mark.parametrize("cpp_kernels", [True, False], ids=["cpp", "fallback"])
def test_empty_inputs_give_empty_outputs(shape, init, cpp_kernels, monkeypatch):
    """Zero-size x (the C++ kernel needs elements; F.conv1d refuses seqlen 0) gives an empty output and
    gradients; with seqlen 0 the final states are the initial ones (zeros without them)."""
    if not cpp_kernels:
        monkeypatch.setattr(conv_cpu, "use_cpp", lambda t: False)
    batch, dim, L = shape
    width = 4
    # views sliced from bigger tensors (their strides are what slicing leaves), as in the report
    x = torch.randn(batch or 2, dim or 4, L or 5)[:batch, :dim, :L].requires_grad_()
    w, b = torch.randn(dim or 4, width)[:dim].requires_grad_(), torch.randn(dim or 4)[:dim].requires_grad_()
    init_s = torch.randn(batch or 2, dim or 4, width - 1)[:batch, :dim].requires_grad_() if init else None
    out, final = causal_conv1d(x, w, b, init_s, return_final_states=True, activation="silu", backend="torch")
    assert out.shape == shape and final.shape == (batch, dim, width - 1)
    if L == 0:
        assert torch.equal(final, init_s) if init else not final.any()
    (out.sum() + final.sum()).backward()
    for t in (x, w, b) + ((init_s,) if init else ()):
        assert t.grad is not None and t.grad.shape == t.shape
    assert causal_conv1d(x.detach(), w.detach(), backend="torch").shape == shape


def test_final_states_are_not_a_view_of_x():
    """The final states are a tensor of their own (as the reference's): reusing x's buffer must not change them."""
    x = torch.randn(2, 8, 10)
    _, final = causal_conv1d(x, torch.randn(8, 4), return_final_states=True, backend="torch")
    want = x[:, :, -3:].clone()
    x.zero_()
    assert torch.equal(final, want)
