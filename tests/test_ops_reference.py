"""Reference ops: the recurrence against an independent per-element loop, gradcheck, bad arguments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from openlm_mamba.ops import (
    BackendUnavailableError,
    add_norm,
    add_norm_ref,
    available_backends,
    causal_conv1d,
    causal_conv1d_ref,
    selective_scan,
    selective_scan_ref,
)
from openlm_mamba.ops.causal_conv1d import causal_conv1d_torch
from openlm_mamba.ops.rms_norm import add_norm_torch


def scan_inputs(batch=2, dim=4, seqlen=5, dstate=3, groups=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    bc_shape = (batch, dstate, seqlen) if groups is None else (batch, groups, dstate, seqlen)
    return {
        "u": r(batch, dim, seqlen),
        "delta": r(batch, dim, seqlen, scale=0.5),
        "A": (-torch.rand(dim, dstate, generator=g, dtype=dtype) - 0.1).requires_grad_(),
        "B": r(*bc_shape),
        "C": r(*bc_shape),
        "D": r(dim),
        "z": r(batch, dim, seqlen),
        "delta_bias": r(dim, scale=0.1),
        "initial_state": r(batch, dim, dstate),
    }


def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """Scalar-by-scalar recurrence, written independently of the library."""
    u, delta, A, B, C = (t.detach() for t in (u, delta, A, B, C))
    D, z, delta_bias, initial_state = (None if t is None else t.detach() for t in (D, z, delta_bias, initial_state))
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    last = torch.zeros(batch, dim, dstate, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            grp = 0 if B.dim() == 3 else d // (dim // B.shape[1])
            h = [0.0 if initial_state is None else float(initial_state[b, d, n]) for n in range(dstate)]
            for t in range(seqlen):
                dt = float(delta[b, d, t]) + (0.0 if delta_bias is None else float(delta_bias[d]))
                if delta_softplus:
                    dt = math.log1p(math.exp(dt))
                y = 0.0
                for n in range(dstate):
                    b_t = float(B[b, n, t] if B.dim() == 3 else B[b, grp, n, t])
                    c_t = float(C[b, n, t] if C.dim() == 3 else C[b, grp, n, t])
                    h[n] = math.exp(dt * float(A[d, n])) * h[n] + dt * b_t * float(u[b, d, t])
                    y += c_t * h[n]
                if D is not None:
                    y += float(D[d]) * float(u[b, d, t])
                if z is not None:
                    zz = float(z[b, d, t])
                    y *= zz / (1 + math.exp(-zz))
                out[b, d, t] = y
            last[b, d] = torch.tensor(h, dtype=torch.float64)
    return out, last


OPTIONALS = ("D", "z", "delta_bias", "initial_state")


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("use", [(), OPTIONALS, ("D",), ("z", "delta_bias"), ("initial_state",)])
def test_reference_scan_equals_independent_loop(groups, softplus, use):
    x = scan_inputs(groups=groups)
    kw = {k: x[k] for k in use}
    out, last = selective_scan_ref(
        x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=softplus, return_last_state=True, **kw
    )
    want_out, want_last = loop_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=softplus, **kw)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last.detach(), want_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use", [(), OPTIONALS, ("D", "z"), ("delta_bias",), ("initial_state",)])
@pytest.mark.parametrize("groups", [None, 2])
def test_reference_scan_gradcheck(use, groups):
    x = scan_inputs(batch=1, dim=4, seqlen=4, dstate=2, groups=groups)
    names = ["u", "delta", "A", "B", "C", *use]

    def f(*args):
        kw = dict(zip(names, args))
        out, last = selective_scan_ref(delta_softplus=True, return_last_state=True, **kw)
        return out, last

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in names))


def test_reference_scan_dtypes_and_empty():
    x = scan_inputs(dtype=torch.bfloat16)
    out, last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    e = scan_inputs(seqlen=0, dtype=torch.float32)
    out = selective_scan(e["u"], e["delta"], e["A"], e["B"], e["C"], e["D"])
    assert out.shape == (2, 4, 0)


@pytest.mark.parametrize("gated", [False, True])
def test_reference_scan_without_time_steps_keeps_the_graph(gated):
    """L = 0: the empty output still backpropagates (zero gradients) to every input, with or without D and z."""
    e = scan_inputs(seqlen=0, dtype=torch.float64)
    names = ["u", "delta", "A", "B", "C"] + (["D", "z"] if gated else [])
    leaves = {n: e[n].detach().clone().requires_grad_() for n in names}
    out = selective_scan_ref(**leaves)
    assert out.shape == (2, 4, 0) and out.requires_grad
    out.sum().backward()
    for name, t in leaves.items():
        assert t.grad is not None and not t.grad.any(), name


def test_public_scan_dispatches_to_torch_on_cpu():
    x = scan_inputs(dtype=torch.float32)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    torch.testing.assert_close(selective_scan(*args, backend="torch"), selective_scan_ref(*args))


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("seqlen", [1, 2, 9])
def test_conv_reference_and_torch_path(width, activation, with_state, seqlen):
    g = torch.Generator().manual_seed(width * 7 + seqlen)
    x = torch.randn(2, 5, seqlen, generator=g, dtype=torch.float64)
    w = torch.randn(5, width, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    init = torch.randn(2, 5, width - 1, generator=g, dtype=torch.float64) if with_state else None
    out, final = causal_conv1d_ref(x, w, b, init, True, activation)
    # independent definition: pad with the initial state, y[t] = sum_k w[k] x[t - (width-1) + k]
    full = torch.cat([init if with_state else torch.zeros(2, 5, width - 1, dtype=x.dtype), x], -1)
    want = torch.stack(
        [(full[:, :, t : t + width] * w).sum(-1) + b for t in range(seqlen)],
        dim=-1,
    )
    if activation:
        want = F.silu(want)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(final, full[:, :, -(width - 1) :])
    out2, final2 = causal_conv1d_torch(x, w, b, init, True, activation)
    torch.testing.assert_close(out2, want)
    torch.testing.assert_close(final2, final)


def test_conv_gradcheck():
    g = torch.Generator().manual_seed(0)
    args = [
        torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
        for s in ((1, 3, 6), (3, 4), (3,), (1, 3, 3))
    ]
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_ref(*a, activation="silu"), tuple(args))


@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("rms", [True, False])
def test_add_norm(residual_in_fp32, rms):
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    res = torch.randn(2, 3, 8, dtype=torch.float32)
    w = torch.rand(8) + 0.5
    out, new_res = add_norm(x, w, None, res, 1e-5, residual_in_fp32, rms)
    s = x.float() + res
    want = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w if rms else F.layer_norm(s, (8,), w, None, 1e-5)
    torch.testing.assert_close(out, want.to(torch.bfloat16))
    assert new_res.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    torch.testing.assert_close(new_res.float(), s, atol=1e-2, rtol=1e-2)
    _, res0 = add_norm_ref(x, w)  # no residual: the residual is x itself
    torch.testing.assert_close(res0, x.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_backend_add_norm_equals_reference(dtype, with_residual, with_bias):
    """The torch backend (fused F.rms_norm) gives the reference's values and gradients."""
    g = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(2, 5, 16, generator=g).to(dtype),
        torch.rand(16, generator=g) + 0.5,
        torch.randn(16, generator=g) if with_bias else None,
        torch.randn(2, 5, 16, generator=g) if with_residual else None,
    ]
    results = []
    for fn in (add_norm_ref, add_norm_torch):
        args = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
        out, res = fn(*args, 1e-5, True, True)
        (out.float().square().sum() + res.float().sin().sum()).backward()
        results.append([out, res] + [a.grad for a in args if a is not None])
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- bad arguments ---------------------------------------------------------------------------------
def _bad_scan_cases():
    x = {k: v.detach() for k, v in scan_inputs(dtype=torch.float32).items()}
    base = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    yield "delta shape", (x["u"], x["delta"][:, :, :-1], *base[2:]), {}, r"delta must have shape \(2, 4, 5\)"
    yield "A rows", (*base[:2], x["A"][:3], *base[3:]), {}, r"A must have shape \(dim=4, d_state\)"
    yield "B seqlen", (*base[:3], x["B"][..., :2], x["C"]), {}, r"B must have shape \(2, 3, 5\)"
    yield "C ndim", (*base[:4], x["C"][0]), {}, r"C must have 3 or 4 dimensions, got shape \(3, 5\)"
    yield "D shape", base, {"D": torch.ones(3)}, r"D must have shape \(4,\)"
    yield "z shape", base, {"z": torch.ones(2, 4, 6)}, r"z must have shape \(2, 4, 5\)"
    yield "bias shape", base, {"delta_bias": torch.ones(2, 4)}, r"delta_bias must have 1 dimensions"
    yield "state shape", base, {"initial_state": torch.ones(2, 4, 4)}, r"initial_state must have shape \(2, 4, 3\)"
    yield "int u", (x["u"].long(), *base[1:]), {}, r"u must be a floating-point tensor, got dtype torch.int64"
    yield "not tensor", ([1.0], *base[1:]), {}, r"u must be a torch.Tensor, got list"
    yield (
        "groups",
        (*base[:3], torch.ones(2, 3, 3, 5), torch.ones(2, 3, 3, 5)),
        {},
        r"B has 3 groups, which must divide dim=4",
    )
    yield "device", base, {"D": torch.ones(4, device="meta")}, r"D is on meta but the other inputs are on cpu"
    yield (
        "backend name",
        base,
        {"backend": "cuda-fast"},
        r"backend must be one of auto, torch, triton, cuda; got 'cuda-fast'",
    )


@pytest.mark.parametrize(
    "args,kwargs,pattern", [c[1:] for c in _bad_scan_cases()], ids=[c[0] for c in _bad_scan_cases()]
)
def test_scan_bad_arguments_are_named(args, kwargs, pattern):
    with pytest.raises(
        (ValueError, TypeError), match=r"selective_scan: " + pattern if "backend" not in kwargs else pattern
    ):
        selective_scan(*args, **kwargs)


def test_conv_bad_arguments_are_named():
    x, w = torch.randn(2, 4, 5), torch.randn(4, 3)
    cases = [
        ((x, torch.randn(3, 3)), {}, r"weight must have shape \(dim=4, width\)"),
        ((x, torch.randn(4, 6)), {}, r"weight width must be between 1 and 4, got 6"),
        ((x, w, torch.randn(5)), {}, r"bias must have shape \(4,\)"),
        ((x, w), {"initial_states": torch.randn(2, 4, 3)}, r"initial_states must have shape \(2, 4, 2\)"),
        ((x, w), {"activation": "relu"}, r'activation must be None, "silu" or "swish", got \'relu\''),
        ((x[0], w), {}, r"x must have 3 dimensions"),
    ]
    for args, kwargs, pattern in cases:
        with pytest.raises(ValueError, match="causal_conv1d: " + pattern):
            causal_conv1d(*args, **kwargs)


@pytest.mark.parametrize("is_rms_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm_checks_its_arguments(is_rms_norm, dtype):
    x, w = torch.randn(3, 8, dtype=dtype), torch.ones(8)
    cases = [
        ((x, torch.ones(7)), {}, r"weight must have shape \(8,\) \(hidden,\), got \(7,\)"),
        ((x, w, torch.zeros(1)), {}, r"bias must have shape \(8,\) \(hidden,\), got \(1,\)"),
        ((x, w), {"residual": torch.randn(3, 7)}, r"residual must have shape \(3, 8\) like x"),
    ]
    for args, kwargs, pattern in cases:
        with pytest.raises(ValueError, match="add_norm: " + pattern):
            add_norm(*args, **kwargs, is_rms_norm=is_rms_norm)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    x = {k: v.detach() for k, v in scan_inputs(dtype=torch.float32).items()}
    with pytest.raises(BackendUnavailableError, match=r"selective_scan: backend 'cuda' is"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="cuda")
    monkeypatch.setenv("OPENLM_MAMBA_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$OPENLM_MAMBA_BACKEND must be one of"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    monkeypatch.setenv("OPENLM_MAMBA_BACKEND", "torch")
    assert selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"]).shape == (2, 4, 5)
    with pytest.raises(TypeError, match=r"backend must be a string, one of auto, torch, triton, cuda; got int"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend=1)
    with pytest.raises(ValueError, match=r"unknown op 'causal_conv1d_update'; ops with backends: add_norm, "):
        available_backends("causal_conv1d_update")


def test_grid_of_reference_shapes_is_consistent():
    """Chunking invariance: scanning two halves with the carried state equals one scan."""
    for seqlen, groups in itertools.product([1, 6, 11], [None, 2]):
        x = {k: v.detach() for k, v in scan_inputs(seqlen=seqlen, groups=groups).items()}
        full, last = selective_scan_ref(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True
        )
        h = seqlen // 2

        def part(sl, state, x=x):
            return selective_scan_ref(
                x["u"][..., sl], x["delta"][..., sl], x["A"], x["B"][..., sl], x["C"][..., sl],
                x["D"], x["z"][..., sl], x["delta_bias"], True, True, initial_state=state,
            )  # fmt: skip

        o1, s1 = part(slice(0, h), None)
        o2, s2 = part(slice(h, seqlen), s1)
        torch.testing.assert_close(torch.cat([o1, o2], -1), full)
        torch.testing.assert_close(s2, last)


def test_a_model_wide_backend_is_a_preference_for_ops_without_it(monkeypatch):
    """$OPENLM_MAMBA_BACKEND and MambaLM.set_backend name a backend for the ops that have it; add_norm has no
    "cuda", so it takes auto instead of failing; the norms follow set_backend; an unknown name fails at once."""
    from openlm_mamba import MambaLM
    from openlm_mamba.ops import add_norm, dispatch

    x, w = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(BackendUnavailableError, match=r"add_norm: backend 'cuda' is not implemented"):
        add_norm(x, w, backend="cuda")  # asked of the op itself: an error
    monkeypatch.setenv("OPENLM_MAMBA_BACKEND", "cuda")
    assert dispatch.resolve("add_norm", torch.device("cpu"))[0] == "torch"
    with pytest.raises(BackendUnavailableError, match=r"causal_conv1d: backend 'cuda' is unavailable on cpu"):
        MambaLM({"d_model": 16, "n_layer": 1, "vocab_size": 32})(torch.zeros(1, 4, dtype=torch.long))
    monkeypatch.delenv("OPENLM_MAMBA_BACKEND")
    model = MambaLM({"d_model": 16, "n_layer": 1, "vocab_size": 32})
    model.set_backend("cuda")
    assert model.layers[0].norm.backend == "cuda" and dispatch.for_op("add_norm", "cuda") == "auto"
    assert dispatch.for_op("add_norm", "torch") == "torch" and dispatch.for_op("selective_scan", "cuda") == "cuda"
    with pytest.raises(ValueError, match=r"backend must be one of auto, torch, triton, cuda; got 'bogus'"):
        model.set_backend("bogus")
    model.set_backend(None)
    assert model.layers[0].norm.backend is None
