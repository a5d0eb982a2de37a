"""The C++ residual add + RMSNorm (the "torch" backend on CPU) against the reference definition.

Outputs are compared with :func:`add_norm_ref` in the same dtype: max |fast - ref| <= tol * max |ref|
with tol 1e-6 for float32 (the same float32 math, the sum of squares in another order) and 1e-12 for
float64; the new residual (one float add) must match exactly. Rows span four decades of scale, so
eps matters. The profiler shows which kernels ran: the C++ op alone for inference, the C++ backward
for gradients, none of it where the torch path must run.
"""

from __future__ import annotations

import pytest
import torch

from openlm_mamba.ops import cpp
from openlm_mamba.ops.rms_norm import add_norm, add_norm_ref, add_norm_torch
from openlm_mamba.ops.rms_norm.cpu import add_norm_cpu

SHAPES = [(1, 1, 8), (2, 7, 256), (1, 1024, 256), (3, 5, 4096), (5, 64)]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
FWD, BWD = "openlm_mamba_cpu::add_norm_fwd", "openlm_mamba_cpu::add_norm_bwd"


@pytest.fixture
def ext():
    """Skip unless the C++ kernels are built (they fall back to torch otherwise)."""
    if not cpp.load_extension():
        pytest.skip(f"C++ CPU kernels unavailable: {cpp._ext_state.get('reason', 'unknown reason')}")


def make(shape, dtype, residual: bool, bias: bool, seed: int = 0):
    """x, weight, bias, residual; the rows' scales run from 1e-2 to 1e2 (eps shows in the small ones)."""
    g = torch.Generator().manual_seed(seed)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    scale = torch.logspace(-2, 2, rows, dtype=torch.float64)[torch.randperm(rows, generator=g)].reshape(*shape[:-1], 1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = (rnd(*shape) * scale).to(dtype)
    w = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = rnd(shape[-1]).to(dtype) if bias else None
    r = (rnd(*shape) * scale).to(dtype) if residual else None
    return x, w, b, r


def assert_near(fast: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert fast.dtype == ref.dtype and fast.shape == ref.shape, (what, fast.dtype, ref.dtype, fast.shape, ref.shape)
    err = ((fast.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, (what, err)


def kernels_run(fn) -> set[str]:
    """Names of the ops the profiler saw while ``fn()`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("residual_in_fp32", [True, False], ids=["fp32res", "xres"])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_forward_matches_reference(ext, shape, dtype, residual, residual_in_fp32, eps, bias):
    x, w, b, r = make(shape, dtype, residual, bias)
    want_out, want_res = add_norm_ref(x, w, b, r, eps, residual_in_fp32)
    with torch.no_grad():
        out, res = add_norm_cpu(x, w, b, r, eps, residual_in_fp32)
    assert_near(out, want_out, TOL[dtype], "out")
    assert res.dtype == want_res.dtype and torch.equal(res, want_res)
    if r is None:
        assert res is x, "without a residual the new residual is x itself, as in the reference"


def test_dispatched_add_norm_runs_the_cpp_kernel_alone(ext):
    x, w, _, r = make((1, 1024, 256), torch.float32, True, False)
    with torch.no_grad():
        names = kernels_run(lambda: add_norm(x, w, None, r, 1e-5, True))
        step = kernels_run(lambda: add_norm(x[:, -1:], w, None, r[:, -1:], 1e-5, True))  # a decoding step
    for seen in (names, step):
        assert FWD in seen, sorted(seen)
        torch_math = {"aten::add", "aten::mul", "aten::rsqrt", "aten::mean", "aten::pow", "aten::rms_norm"}
        assert not seen & torch_math, sorted(seen & torch_math)


@pytest.mark.parametrize(
    "dtype, rms, backend",
    [(torch.bfloat16, True, None), (torch.float32, False, None), (torch.float32, True, "compile")],
    ids=["bf16", "layernorm", "compiling"],
)
def test_torch_path_where_the_kernel_does_not_apply(monkeypatch, dtype, rms, backend):
    if backend == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, w, b, r = make((2, 3, 16), torch.float64, True, True)
    x, r = x.to(dtype), r.float()
    with torch.no_grad():
        names = kernels_run(lambda: add_norm_cpu(x, w, b, r, 1e-5, True, rms))
        out, res = add_norm_cpu(x, w, b, r, 1e-5, True, rms)
    assert FWD not in names
    want_out, want_res = add_norm_torch(x, w, b, r, 1e-5, True, rms)
    assert torch.equal(out, want_out) and torch.equal(res, want_res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("used", ["both", "out", "res"])
@pytest.mark.parametrize("shape", [(2, 7, 256), (1, 1, 8)], ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_reference(ext, dtype, residual, bias, used, shape):
    leaves = [t for t in make(shape, dtype, residual, bias) if t is not None]
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(shape, generator=g, dtype=dtype)
    g_res = torch.randn(shape, generator=g, dtype=dtype)

    def run(fn):
        args = [t.detach().clone().requires_grad_() for t in leaves]
        x, w = args[0], args[1]
        b = args[2] if bias else None
        r = args[-1] if residual else None
        out, res = fn(x, w, b, r, 1e-5, True)
        loss = {
            "both": (out * g_out).sum() + (res * g_res).sum(),
            "out": (out * g_out).sum(),
            "res": (res * g_res).sum(),
        }
        names = kernels_run(lambda: loss[used].backward())
        return [out, res] + [a.grad if a.grad is not None else torch.zeros_like(a) for a in args], names

    want, _ = run(add_norm_ref)
    got, names = run(add_norm)
    assert BWD in names, sorted(names)
    for i, (f, r) in enumerate(zip(got, want)):
        assert_near(f, r, 10 * TOL[dtype], f"output/grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_non_contiguous_inputs(ext, dtype):
    x, w, b, r = make((6, 4, 128), dtype, True, True)
    cases = {
        "strided hidden": (x.repeat_interleave(2, -1)[..., ::2], r),  # last dim strided: copied
        "transposed": (x.transpose(0, 1).contiguous().transpose(0, 1), r.transpose(0, 1).contiguous().transpose(0, 1)),
        "row slice": (torch.cat([x, x], -1)[..., :128], r),  # rows strided, hidden contiguous: read in place
    }
    for name, (xv, rv) in cases.items():
        assert not xv.is_contiguous()
        want_out, want_res = add_norm_ref(xv, w, b, rv, 1e-5)
        with torch.no_grad():
            out, res = add_norm_cpu(xv, w, b, rv, 1e-5)
        assert_near(out, want_out, TOL[dtype], name)
        assert torch.equal(res, want_res), name
        # and through autograd
        xg = xv.detach().clone().requires_grad_()
        out_g, _ = add_norm_cpu(xg, w, b, rv, 1e-5)
        out_g.sum().backward()
        xr = xv.detach().clone().requires_grad_()
        add_norm_ref(xr, w, b, rv, 1e-5)[0].sum().backward()
        assert_near(xg.grad, xr.grad, 10 * TOL[dtype], name + " grad")


def test_other_dtypes_converted_and_bad_op_arguments(ext):
    x, w, b, r = make((2, 3, 32), torch.float32, True, True)
    want_out, want_res = add_norm_ref(x, w.double(), b.half(), r.double(), 1e-5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, res = add_norm_cpu(x.requires_grad_(grad), w.double(), b.half(), r.double(), 1e-5)
        assert_near(out, want_out, TOL[torch.float32])
        assert torch.equal(res, want_res)
    with pytest.raises(RuntimeError, match="residual must be like x"):
        torch.ops.openlm_mamba_cpu.add_norm_fwd(x, r[:1], w, None, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"weight must be \(hidden,\)"):
        torch.ops.openlm_mamba_cpu.add_norm_fwd(x, r, w[:16], None, 1e-5, True)
