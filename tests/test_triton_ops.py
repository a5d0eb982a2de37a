"""Triton kernels against the reference ops: forward and every gradient.

On a GPU the kernels run natively. Without one they run through Triton's CPU interpreter, which
must be switched on (TRITON_INTERPRET=1) before triton is first imported, so on CPU this file
runs only in a process started with it: tests/test_triton_model.py starts one. CI runs a
representative subset; ``--full`` runs the full grid (>= 40 scan cases):

    python -m pytest --full tests/test_triton_model.py            # CPU: runs this file, full grid
    TRITON_INTERPRET=1 python -m pytest --full tests/test_triton_ops.py

Tolerances: float64 inputs (accumulated in float64) to 1e-10; float32 inputs to 1e-4 relative
(rtol 1e-4, atol 1e-4 * max|reference|); bfloat16 inputs to 2e-2 relative (rtol 2e-2, atol 2e-2 * max|reference|) and float16 to 5e-3,
the reference being the same op computed in float32 from the same low-precision inputs (bf16
keeps 8 significant bits, so rounding alone is 4e-3 per stored value; fp16 keeps 11).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from openlm_mamba.ops import BackendUnavailableError, add_norm, causal_conv1d, selective_scan
from openlm_mamba.ops.causal_conv1d.reference import causal_conv1d_ref
from openlm_mamba.ops.rms_norm.reference import add_norm_ref
from openlm_mamba.ops.selective_scan.reference import selective_scan_ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET", "0").strip() in ("", "0"):
    # Triton reads TRITON_INTERPRET when triton.language and each kernel are defined, so it must be
    # set before anything imports triton; tests/test_triton_model.py runs this file in such a process.
    pytest.skip(
        "no GPU and TRITON_INTERPRET is not set: run by test_triton_model.py::test_op_grid_through_interpreter "
        "(or TRITON_INTERPRET=1 python -m pytest tests/test_triton_ops.py)",
        allow_module_level=True,
    )

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from openlm_mamba.ops.selective_scan.triton import _combine  # noqa: E402


def tol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-10}.get(dtype, 1e-4)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# selective scan


def scan_case(batch, dim, seqlen, dstate, *, groups=0, z=True, D=True, bias=True, softplus=True, h0=True, dtype=None):
    return {
        "batch": batch,
        "dim": dim,
        "seqlen": seqlen,
        "dstate": dstate,
        "groups": groups,
        "z": z,
        "D": D,
        "bias": bias,
        "softplus": softplus,
        "h0": h0,
        "dtype": dtype or torch.float32,
    }


def case_id(c: dict) -> str:
    flags = "".join(k for k in ("z", "D", "bias", "softplus", "h0") if c.get(k))
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[c["dtype"]]
    extra = f"-g{c['groups']}" if c.get("groups") else ""
    return f"b{c['batch']}-d{c['dim']}-L{c['seqlen']}-N{c['dstate']}{extra}-{flags or 'plain'}-{dt}"


# Tests use chunk=16 so "longer than a chunk" stays cheap in the interpreter; one case keeps the
# default chunk (128) with seqlen 129. block_d=16 makes d_inner=20/40 span several partial blocks.
SCAN_CI = [
    scan_case(2, 20, 37, 16),  # every option, 3 chunks (last one partial), 2 channel blocks
    scan_case(1, 20, 7, 4, z=False, D=False, bias=False, softplus=False, h0=False),
    scan_case(3, 8, 1, 1, softplus=False),
    scan_case(2, 24, 21, 4, groups=2, h0=False),  # grouped B/C
    scan_case(1, 20, 19, 16, dtype=torch.bfloat16),
    scan_case(1, 12, 129, 4, z=False, h0=False),  # runs with the default chunk (128)
    scan_case(1, 8, 7, 4, dtype=torch.float16),
    scan_case(1, 8, 9, 4, dtype=torch.float64),  # float64 inputs accumulate in float64 (tolerance 1e-10)
]


def _full_scan_grid() -> list[dict]:
    flags = list(itertools.product([True, False], repeat=5))
    cases, i = [], 0
    for seqlen in (1, 7, 37, 129):
        for dstate in (1, 4, 16):
            for _ in range(4):
                z, D, bias, softplus, h0 = flags[(i * 7) % len(flags)]
                groups = 2 if i % 5 == 4 else 0
                dtype = torch.bfloat16 if i % 4 == 3 else (torch.float16 if i % 8 == 5 else torch.float32)
                dim = 40 if groups else (20 if i % 2 else 13)
                cases.append(
                    scan_case(
                        1 + i % 3,
                        dim,
                        seqlen,
                        dstate,
                        groups=groups,
                        z=z,
                        D=D,
                        bias=bias,
                        softplus=softplus,
                        h0=h0,
                        dtype=dtype,
                    )
                )
                i += 1
    return cases


SCAN_FULL = _full_scan_grid()


def make_scan_inputs(c: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, d, L, N, G, dt = c["batch"], c["dim"], c["seqlen"], c["dstate"], c["groups"], c["dtype"]

    def r(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    bc = (b, G, N, L) if G else (b, N, L)
    # the model's layout: (batch, dim, seqlen) views of (batch, seqlen, dim) tensors
    inputs = {
        "u": r(b, L, d).transpose(1, 2),
        "delta": r(b, L, d, scale=0.5).transpose(1, 2),
        "A": -(torch.rand(d, N, generator=g) + 0.2).to(DEVICE),
        "B": r(*bc),
        "C": r(*bc),
        "D": r(d, dtype=torch.float32) if c["D"] else None,
        "z": r(b, L, d).transpose(1, 2) if c["z"] else None,
        "delta_bias": r(d, scale=0.3, dtype=torch.float32) if c["bias"] else None,
        "initial_state": r(b, d, N, dtype=torch.float32) if c["h0"] else None,
    }
    if not c["softplus"]:
        inputs["delta"] = inputs["delta"].abs()  # keep dt >= 0 without the softplus
        if inputs["delta_bias"] is not None:
            inputs["delta_bias"] = inputs["delta_bias"].abs()
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def check_scan(c: dict, chunk: int = 16, block_d: int = 16, tile: int = 0, inputs: dict | None = None) -> None:
    from openlm_mamba.ops.selective_scan.triton import selective_scan_triton

    inputs = inputs or make_scan_inputs(c)
    names = [k for k, v in inputs.items() if v is not None]
    kw = {k: inputs[k] for k in ("D", "z", "delta_bias", "initial_state")}
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    out, last = selective_scan_triton(
        *args, **kw, delta_softplus=c["softplus"], return_last_state=True, chunk=chunk, block_d=block_d, tile=tile
    )
    ref_out, ref_last = selective_scan_ref(*args, **kw, delta_softplus=c["softplus"], return_last_state=True)
    rel = tol(c["dtype"])
    assert_close(out, ref_out, rel, "out")
    assert_close(last, ref_last, rel, "last_state")
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=g).to(DEVICE)
    g_last = torch.randn(last.shape, generator=g).to(DEVICE)
    tensors = [inputs[k] for k in names]
    grads = torch.autograd.grad((out.float() * g_out).sum() + (last * g_last).sum(), tensors)
    ref_grads = torch.autograd.grad((ref_out.float() * g_out).sum() + (ref_last * g_last).sum(), tensors)
    for name, got, ref in zip(names, grads, ref_grads):
        assert_close(got, ref, rel, f"d{name}")


@pytest.mark.parametrize("c", SCAN_CI, ids=case_id)
def test_scan_matches_reference(c):
    check_scan(c, chunk=128 if c["seqlen"] == 129 else 16)


@pytest.mark.parametrize("tile", [1, 4, 8])
@pytest.mark.parametrize(
    "c", [scan_case(2, 20, 37, 16), scan_case(1, 12, 30, 4, groups=2, dtype=torch.bfloat16)], ids=case_id
)
def test_scan_several_tiles_per_chunk(c, tile):
    """Tiles shorter than the chunk: tile-start states in the backward's scratch, partial last tile."""
    check_scan(c, chunk=16, tile=tile)


class _LaunchSpy:
    """Stands in for a Triton kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


SEQ_CI = [
    scan_case(2, 20, 37, 16),  # every option, 3 chunks, 2 channel blocks, an initial state
    scan_case(2, 24, 21, 4, groups=2, h0=False, softplus=False),
    scan_case(1, 24, 17, 3, groups=4, z=False, D=False),  # d_state not a power of two, 4 groups
    scan_case(1, 8, 9, 4, dtype=torch.float64),
    scan_case(1, 12, 1, 1, bias=False, dtype=torch.bfloat16),
]


def check_seq(c: dict, tile: int, monkeypatch, fwd: bool = True, bwd: bool = True) -> None:
    """The plain-recurrence kernels (launch "seq:...") for the forward and/or the backward, against the
    reference (forward and every gradient); the spies make sure the seq kernels are the ones that ran."""
    from openlm_mamba.ops.selective_scan import triton as ss

    spies = {}
    for name, on in (("_scan_fwd_seq_kernel", fwd), ("_scan_bwd_seq_kernel", bwd)):
        if on:
            spies[name] = _LaunchSpy(getattr(ss, name))
            monkeypatch.setattr(ss, name, spies[name])
    launch = [f"{w}=seq:{tile}x16x1" for w, on in (("fwd", fwd), ("bwd", bwd)) if on]
    monkeypatch.setenv(ss.LAUNCH_ENV, ",".join(launch))
    check_scan(c, chunk=16)
    assert all(spy.launches >= 1 for spy in spies.values()), spies


def test_launch_specs_parse_and_select_the_kernel(monkeypatch):
    from openlm_mamba.ops.selective_scan import triton as ss

    assert ss.parse_launch("8x16x4") == (8, 16, 4)
    assert ss.parse_launch("seq:2x128x4") == (2, 128, 4, "seq")
    for bad, match in [
        ("seq:2x128", "expected a launch like"),
        ("foo:2x2x2", "expected a launch like"),
        ("tile:2x2x2", "expected a launch like"),
        (":2x2x2", "expected a launch like"),
        ("0x16x4", "expected a launch like"),
        ("3x16x4", "power of two"),
    ]:
        with pytest.raises(ValueError, match=match):
            ss.parse_launch(bad)
    monkeypatch.setenv(ss.LAUNCH_ENV, "fwd=seq:2x32x2,bwd=4x32x4")
    assert ss._launch("fwd", 64, 128, 0, 0) == (2, 32, 2, "seq")
    assert ss._launch("bwd", 64, 128, 0, 0) == (4, 32, 4, "tile")
    assert ss._launch("fwd", 64, 128, 8, 16) == (8, 16, 2, "seq")  # explicit tile / block_d win
    monkeypatch.setenv(ss.LAUNCH_ENV, "bwd=seq:2x32x2")
    assert ss._launch("bwd", 64, 128, 0, 0) == (2, 32, 2, "seq")
    monkeypatch.setenv(ss.LAUNCH_ENV, "fwd=seq:2x32x2,bwd=seq:2x32")  # a bad entry fails whichever pass asks
    for which in ("fwd", "bwd"):
        with pytest.raises(ValueError, match=r"OPENLM_MAMBA_SCAN_LAUNCH: 'bwd=seq:2x32': expected a launch like"):
            ss._launch(which, 64, 128, 0, 0)


@pytest.mark.parametrize("tile", [1, 4])
@pytest.mark.parametrize("c", SEQ_CI, ids=case_id)
def test_seq_kernels_match_reference(c, tile, monkeypatch):
    check_seq(c, tile, monkeypatch)


@pytest.mark.parametrize("fwd", [True, False], ids=["seq-fwd-tile-bwd", "tile-fwd-seq-bwd"])
def test_seq_and_tile_kernels_mix(fwd, monkeypatch):
    """Either kernel's saved chunk states feed the other's backward."""
    check_seq(scan_case(2, 20, 37, 16), 2, monkeypatch, fwd=fwd, bwd=not fwd)


def test_seq_backward_without_grad_last_equals_the_tile_backward(monkeypatch):
    """The op's backward without a gradient for the last state (HAS_GL off; autograd always passes one)."""
    from openlm_mamba.ops.selective_scan import triton as ss

    x = {k: (v.detach() if v is not None else None) for k, v in make_scan_inputs(scan_case(2, 20, 37, 4)).items()}
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    _, _, states = ss.selective_scan_fwd(*args, x["initial_state"], True, True, 16, 16)
    go = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    runs = []
    for launch in ("bwd=4x16x1", "bwd=seq:2x16x1"):
        monkeypatch.setenv(ss.LAUNCH_ENV, launch)
        runs.append(ss.selective_scan_bwd(*args, states, go, None, True, 16, 16))
    for name, a, b in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias", "dh0"], *runs):
        assert_close(a, b, 1e-5, name)


@pytest.mark.slow
@pytest.mark.parametrize("c", SCAN_FULL, ids=case_id)
def test_seq_kernels_match_reference_full(c, monkeypatch):
    check_seq(c, 2, monkeypatch)


@triton.jit
def _scan_probe(a_ptr, b_ptr, out_ptr, T: tl.constexpr, REVERSE: tl.constexpr):
    r = tl.arange(0, T)[:, None] * 4 + tl.arange(0, 4)[None, :]
    _, x = tl.associative_scan((tl.load(a_ptr + r), tl.load(b_ptr + r)), 0, _combine, reverse=REVERSE)
    tl.store(out_ptr + r, x)


@pytest.mark.parametrize("reverse", [False, True])
def test_associative_scan_solves_the_recurrence(reverse):
    """The scan the kernels build on, with its (non-commutative) combine: forward
    x_t = a_t x_{t-1} + b_t, reverse x_t = a_t x_{t+1} + b_t (what the backward's adjoint needs)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(16, 4, generator=g) + 0.5).to(DEVICE)
    b = torch.randn(16, 4, generator=g).to(DEVICE)
    out = torch.empty_like(b)
    if not ON_GPU:  # the interpreter's scan, vectorised by openlm_mamba (same combine order)
        from openlm_mamba.ops.triton_utils import vectorize_interpreter_scan

        assert vectorize_interpreter_scan()
    _scan_probe[(1,)](a, b, out, T=16, REVERSE=reverse)
    ref, x = torch.empty_like(b), torch.zeros(4, device=DEVICE)
    for t in reversed(range(16)) if reverse else range(16):
        x = a[t] * x + b[t]
        ref[t] = x
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("c", SCAN_FULL, ids=case_id)
def test_scan_matches_reference_full(c):
    check_scan(c, chunk=128 if c["seqlen"] == 129 and c["batch"] == 1 else 16)


def test_full_grid_covers_the_acceptance_matrix():
    cases = SCAN_FULL
    assert len(cases) >= 40
    assert {1, 7, 129} <= {c["seqlen"] for c in cases} and max(c["seqlen"] for c in cases) > 16
    assert {c["dstate"] for c in cases} == {1, 4, 16}
    assert {c["batch"] for c in cases} == {1, 2, 3}
    assert any(c["dim"] % 16 for c in cases)
    for key in ("z", "D", "bias", "softplus", "h0"):
        assert {c[key] for c in cases} == {True, False}, key
    assert {c["dtype"] for c in cases} == {torch.float32, torch.bfloat16, torch.float16}
    assert any(c["groups"] for c in cases)


def test_scan_dispatch_and_saved_memory():
    """backend="triton" goes through the public op; forward saves only chunk-boundary states."""
    from openlm_mamba.ops.selective_scan.triton import selective_scan_fwd

    c = scan_case(1, 8, 20, 4)
    x = make_scan_inputs(c)
    out = selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, backend="triton"
    )
    ref = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    assert_close(out, ref, 1e-4, "out")
    with torch.no_grad():
        args = (x["u"], x["delta"], x["A"], x["B"], x["C"], None, None, None, None, True)
        _, _, states = selective_scan_fwd(*args, True, 8, 0)
        assert tuple(states.shape) == (1, math.ceil(20 / 8), 8, 4)  # (batch, chunks, dim, N), not (.., seqlen, N)
        _, _, none = selective_scan_fwd(*args, False, 8, 0)
        assert none.numel() == 0


@pytest.mark.parametrize("groups", [(0, 3), (2, 0), (2, 3)], ids=lambda g: f"B{g[0]}-C{g[1]}")
def test_scan_mixed_group_layouts(groups):
    """B and C may each be ungrouped or grouped with their own group count."""
    from openlm_mamba.ops.selective_scan.triton import selective_scan_triton

    g = torch.Generator().manual_seed(0)
    b, d, L, N = 1, 12, 6, 4

    def bc(G):
        return torch.randn(*((b, G, N, L) if G else (b, N, L)), generator=g).to(DEVICE).requires_grad_()

    u = torch.randn(b, d, L, generator=g).to(DEVICE).requires_grad_()
    delta = torch.rand(b, d, L, generator=g).to(DEVICE).requires_grad_()
    A = (-torch.rand(d, N, generator=g) - 0.2).to(DEVICE).requires_grad_()
    B, C = bc(groups[0]), bc(groups[1])
    out = selective_scan_triton(u, delta, A, B, C, block_d=4)
    ref = selective_scan_ref(u, delta, A, B, C)
    assert_close(out, ref, 1e-4, "out")
    go = torch.randn(out.shape, generator=g).to(DEVICE)
    for name, got, want in zip(
        ["u", "delta", "A", "B", "C"],
        torch.autograd.grad((out * go).sum(), (u, delta, A, B, C)),
        torch.autograd.grad((ref * go).sum(), (u, delta, A, B, C)),
    ):
        assert_close(got, want, 1e-4, f"d{name}")


def test_triton_backend_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    u = torch.randn(1, 2, 3)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        selective_scan(u, u, -torch.ones(2, 1), torch.ones(1, 1, 3), torch.ones(1, 1, 3), backend="triton")


# --------------------------------------------------------------------------------------------
# causal conv1d


def conv_case(batch, dim, seqlen, width, bias=True, init=True, silu=True, dtype=torch.float32):
    return {
        "batch": batch,
        "dim": dim,
        "seqlen": seqlen,
        "width": width,
        "bias": bias,
        "init": init,
        "silu": silu,
        "dtype": dtype,
    }


def conv_id(c: dict) -> str:
    flags = "".join(k for k in ("bias", "init", "silu") if c[k]) or "plain"
    return f"b{c['batch']}-d{c['dim']}-L{c['seqlen']}-w{c['width']}-{flags}-{str(c['dtype'])[6:]}"


CONV_CI = [
    conv_case(2, 20, 37, 4),
    conv_case(1, 5, 2, 4, bias=False, silu=False),  # seqlen < width - 1: final state mixes initial state and x
    conv_case(3, 7, 9, 2, init=False),
    conv_case(2, 12, 33, 3, dtype=torch.bfloat16),
    conv_case(1, 8, 9, 4, dtype=torch.float64),
]
CONV_FULL = [
    conv_case(1 + i % 3, (5, 16, 20, 33)[i % 4], seqlen, width, bias=i % 2 == 0, init=i % 3 != 1, silu=i % 4 != 3,
              dtype=torch.bfloat16 if i % 5 == 4 else (torch.float16 if i % 7 == 6 else torch.float32))
    for i, (seqlen, width) in enumerate(itertools.product((1, 3, 7, 129, 300), (1, 2, 3, 4)))
]  # fmt: skip


def check_conv(c: dict) -> None:
    g = torch.Generator().manual_seed(0)
    b, d, L, W, dt = c["batch"], c["dim"], c["seqlen"], c["width"], c["dtype"]

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dt).to(DEVICE)

    x = r(b, L, d).transpose(1, 2).requires_grad_()
    w = r(d, W).requires_grad_()
    bias = r(d).requires_grad_() if c["bias"] else None
    init = r(b, d, W - 1).requires_grad_() if c["init"] else None
    act = "silu" if c["silu"] else None
    out, final = causal_conv1d(x, w, bias, init, True, act, backend="triton")
    ref, ref_final = causal_conv1d_ref(x, w, bias, init, True, act)
    rel = tol(dt)
    assert_close(out, ref, rel, "out")
    assert_close(final, ref_final, rel, "final_states")
    tensors = [t for t in (x, w, bias, init) if t is not None]
    names = [n for n, t in zip(("x", "weight", "bias", "initial_states"), (x, w, bias, init)) if t is not None]
    go = torch.randn(out.shape, generator=g).to(DEVICE)
    gf = torch.randn(final.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((out.float() * go).sum() + (final.float() * gf).sum(), tensors)
    ref_grads = torch.autograd.grad((ref.float() * go).sum() + (ref_final.float() * gf).sum(), tensors)
    for name, got, want in zip(names, grads, ref_grads):
        assert_close(got, want, rel, f"d{name}")


@pytest.mark.parametrize("c", CONV_CI, ids=conv_id)
def test_conv_matches_reference(c):
    check_conv(c)


@pytest.mark.slow
@pytest.mark.parametrize("c", CONV_FULL, ids=conv_id)
def test_conv_matches_reference_full(c):
    check_conv(c)


# --------------------------------------------------------------------------------------------
# residual add + RMSNorm / LayerNorm

NORM_CASES = [
    # shape, residual, bias, rms, residual_in_fp32, dtype, in CI
    ((2, 7, 40), True, False, True, True, torch.float32, True),
    ((3, 33), False, True, False, True, torch.float32, True),
    ((70, 64), True, False, True, True, torch.bfloat16, True),
    ((2, 5, 24), True, True, False, False, torch.float32, False),
    ((1, 1, 8), True, False, True, False, torch.bfloat16, False),
    ((130, 100), True, True, False, True, torch.float32, False),
    ((2, 3, 257), False, False, True, True, torch.bfloat16, False),
]


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=() if c[-1] else pytest.mark.slow) for c in NORM_CASES],
    ids=lambda c: (
        f"{'x'.join(map(str, c[0]))}-res{int(c[1])}-bias{int(c[2])}-{'rms' if c[3] else 'ln'}-fp32res{int(c[4])}-{str(c[5])[6:]}"
    ),
)
def test_add_norm_matches_reference(case):
    shape, has_res, has_bias, rms, res_fp32, dt, _ = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dt).to(DEVICE).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dt).to(DEVICE).requires_grad_()
    b = torch.randn(shape[-1], generator=g).to(dt).to(DEVICE).requires_grad_() if has_bias else None
    res = torch.randn(shape, generator=g).to(DEVICE).requires_grad_() if has_res else None
    out, new_res = add_norm(x, w, b, res, 1e-5, res_fp32, rms, backend="triton")
    ref, ref_res = add_norm_ref(x, w, b, res, 1e-5, res_fp32, rms)
    rel = tol(dt)
    assert_close(out, ref, rel, "out")
    assert_close(new_res, ref_res, rel, "residual")
    tensors = [t for t in (x, w, b, res) if t is not None]
    go = torch.randn(out.shape, generator=g).to(DEVICE)
    gr = torch.randn(new_res.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((out.float() * go).sum() + (new_res.float() * gr).sum(), tensors)
    ref_grads = torch.autograd.grad((ref.float() * go).sum() + (ref_res.float() * gr).sum(), tensors)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, rel, "grad")


def test_add_norm_bias_grad_keeps_the_bias_dtype_precision():
    """A float32 bias beside a bf16 weight gets its gradient summed and kept in float32 (it was rounded to bf16)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).to(DEVICE)
    go = torch.randn(64, 32, generator=g).to(DEVICE)
    w = torch.randn(32, generator=g).to(torch.bfloat16).to(DEVICE).requires_grad_()
    b = torch.randn(32, generator=g).to(DEVICE).requires_grad_()
    out, _ = add_norm(x, w, b, backend="triton")
    (db,) = torch.autograd.grad(out, b, go)
    assert db.dtype == torch.float32
    assert (db - go.sum(0)).abs().max().item() < 1e-4  # bf16 rounding gave 0.04


def test_add_norm_of_zero_width_rows():
    x = torch.randn(3, 0, device=DEVICE)
    out, res = add_norm(x, torch.ones(0, device=DEVICE), backend="triton")
    assert out.shape == res.shape == (3, 0)


# --------------------------------------------------------------------------------------------
# torch.compile: the custom ops keep a compiled function in one graph


def test_compiled_triton_ops_have_no_graph_breaks():
    c = scan_case(1, 8, 6, 4)
    x = make_scan_inputs(c)
    w = torch.randn(8, 4, device=DEVICE)

    def f(u, delta, A, B, C, D, z, delta_bias):
        h = causal_conv1d(u, w, None, activation="silu", backend="triton")
        y = selective_scan(h, delta, A, B, C, D, z, delta_bias, True, backend="triton")
        return add_norm(y.transpose(1, 2), torch.ones(8, device=DEVICE), backend="triton")[0]

    args = [x[k].detach() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    explanation = torch._dynamo.explain(f)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert_close(compiled(*args), f(*args), 1e-5, "compiled")


# --------------------------------------------------------------------------------------------
# launch wrappers: strided parameters, the tensors' device, fake kernels, accumulation dtype


def every_other(n: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """An (n,) view with stride 2 (every other element of a buffer, e.g. a slice of a packed parameter)."""
    v = (torch.randn(2 * n, generator=g) * scale).to(DEVICE)[::2]
    assert v.stride() == (2,)
    return v.requires_grad_()


def test_scan_reads_strided_D_and_delta_bias():
    c = scan_case(2, 12, 9, 4)
    x = make_scan_inputs(c)
    g = torch.Generator().manual_seed(5)
    x["D"], x["delta_bias"] = every_other(12, g), every_other(12, g, 0.3)
    check_scan(c, block_d=4, inputs=x)  # forward and every gradient against the reference


def test_conv_reads_a_strided_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 6, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    w = torch.randn(6, 4, generator=g).to(DEVICE).requires_grad_()
    bias = every_other(6, g)
    out = causal_conv1d(x, w, bias, activation="silu", backend="triton")
    ref = causal_conv1d_ref(x, w, bias, activation="silu")
    assert_close(out, ref, 1e-4, "out")
    go = torch.randn(out.shape, generator=g).to(DEVICE)
    for name, got, want in zip(
        ("x", "weight", "bias"),
        torch.autograd.grad((out * go).sum(), (x, w, bias)),
        torch.autograd.grad((ref * go).sum(), (x, w, bias)),
    ):
        assert_close(got, want, 1e-4, f"d{name}")


def test_state_update_reads_strided_D_and_dt_bias():
    from openlm_mamba.ops import selective_state_update, selective_state_update_ref

    g = torch.Generator().manual_seed(0)
    b, d, N = 2, 8, 4
    state = torch.randn(b, d, N, generator=g).to(DEVICE)
    x, dt, z = (torch.randn(b, d, generator=g).to(DEVICE) for _ in range(3))
    A = (-torch.rand(d, N, generator=g) - 0.1).to(DEVICE)
    B, C = (torch.randn(b, N, generator=g).to(DEVICE) for _ in range(2))
    D, dt_bias = every_other(d, g).detach(), every_other(d, g, 0.5).detach()
    s_tri, s_ref = state.clone(), state.clone()
    out = selective_state_update(s_tri, x, dt, A, B, C, D, z, dt_bias, True, backend="triton")
    ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, dt_bias, True)
    assert_close(out, ref, 1e-5, "out")
    assert_close(s_tri, s_ref, 1e-5, "state")


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layernorm"])
def test_add_norm_reads_strided_weight_and_bias(rms):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g).to(DEVICE).requires_grad_()
    res = torch.randn(3, 8, generator=g).to(DEVICE).requires_grad_()
    w, b = every_other(8, g), every_other(8, g)
    out, new_res = add_norm(x, w, b, res, 1e-5, True, rms, backend="triton")
    ref, ref_res = add_norm_ref(x, w, b, res, 1e-5, True, rms)
    assert_close(out, ref, 1e-4, "out")
    assert_close(new_res, ref_res, 1e-4, "residual")
    go = torch.randn(out.shape, generator=g).to(DEVICE)
    for name, got, want in zip(
        ("x", "weight", "bias", "residual"),
        torch.autograd.grad((out * go).sum(), (x, w, b, res)),
        torch.autograd.grad((ref * go).sum(), (x, w, b, res)),
    ):
        assert_close(got, want, 1e-4, f"d{name}")


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the *current* CUDA device and stream: each launch wrapper enters
    on_device(tensor) (torch.cuda.device for a GPU tensor, nothing for a CPU one), so a model on
    cuda:1 runs its kernels there while cuda:0 is current."""
    from openlm_mamba.ops import selective_state_update, triton_utils
    from openlm_mamba.ops.causal_conv1d import triton as conv_triton
    from openlm_mamba.ops.rms_norm import triton as norm_triton
    from openlm_mamba.ops.selective_scan import triton as scan_triton
    from openlm_mamba.ops.state_update import triton as step_triton

    assert isinstance(triton_utils.on_device(torch.zeros(1)), contextlib.nullcontext)
    ctx = triton_utils.on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1  # built, not entered: no GPU needed

    launches = []

    def spy(t):
        launches.append(sys._getframe(1).f_code.co_name)
        return triton_utils.on_device(t)

    for module in (scan_triton, conv_triton, norm_triton, step_triton):
        monkeypatch.setattr(module, "on_device", spy)
    x = make_scan_inputs(scan_case(1, 8, 5, 4))
    y = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], backend="triton")
    y = causal_conv1d(y, torch.ones(8, 4, device=DEVICE), backend="triton")
    out, _ = add_norm(y.transpose(1, 2), torch.ones(8, device=DEVICE), backend="triton")
    out.sum().backward()
    state = torch.zeros(1, 8, 4, device=DEVICE)
    with torch.no_grad():
        selective_state_update(
            state, x["u"][:, :, 0], x["delta"][:, :, 0], x["A"], x["B"][..., 0], x["C"][..., 0], backend="triton"
        )
    assert sorted(launches) == [
        "add_norm_bwd",
        "add_norm_fwd",
        "causal_conv1d_bwd",
        "causal_conv1d_fwd",
        "selective_scan_bwd",
        "selective_scan_fwd",
        "selective_state_update_triton",
    ]


def test_fake_kernels_give_the_real_strides():
    """torch.compile plans with the fakes: each output's strides must be the real op's, also for a
    transposed A or conv weight (their gradients are sums, hence contiguous)."""
    from openlm_mamba.ops.causal_conv1d import triton as conv_triton
    from openlm_mamba.ops.rms_norm import triton as norm_triton
    from openlm_mamba.ops.selective_scan import triton as scan_triton

    g = torch.Generator().manual_seed(0)
    b, d, L, N = 1, 8, 5, 4

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    u, delta, z = (r(b, L, d).transpose(1, 2) for _ in range(3))
    delta = delta.abs()
    A = -(r(N, d).abs() + 0.2).t()  # (d, N) with strides (1, d)
    B, C, D, bias = r(b, N, L), r(b, N, L), r(2 * d)[::2], r(2 * d)[::2]
    with torch.no_grad():
        _, _, states = scan_triton.selective_scan_fwd(u, delta, A, B, C, D, z, bias, None, True, True, 16, 0, 0)
    args = (u, delta, A, B, C, D, z, bias, states, r(b, d, L), None, True, 16, 0, 0)
    torch.library.opcheck(scan_triton.selective_scan_bwd, args, test_utils="test_faketensor")
    w = r(4, d).t()  # (d, width) with strides (1, d)
    args = (u, w, bias, r(b, d, 3), r(b, d, L), True)
    torch.library.opcheck(conv_triton.causal_conv1d_bwd, args, test_utils="test_faketensor")
    h, res, w = r(6, d), r(6, d), r(2 * d)[::2]
    with torch.no_grad():
        _, _, mean, rstd = norm_triton.add_norm_fwd(h, w, None, res, 1e-5, True, False)
    args = (h, w, res, mean, rstd, r(6, d), r(6, d), True, False)
    torch.library.opcheck(norm_triton.add_norm_bwd, args, test_utils="test_faketensor")


def test_scan_backward_accumulates_in_float64_with_a_float64_initial_state():
    """A float64 initial_state makes the forward run in float64; the backward too (the forward's
    dtype reaches it through the saved states), so dinitial_state is exact like the forward."""
    from openlm_mamba.ops.selective_scan.triton import selective_scan_triton

    g = torch.Generator().manual_seed(0)
    b, d, L, N = 1, 8, 20, 4
    u = torch.randn(b, d, L, generator=g).to(DEVICE).requires_grad_()
    delta = torch.rand(b, d, L, generator=g).to(DEVICE).requires_grad_()
    A = (-torch.rand(d, N, generator=g) - 0.2).to(DEVICE).requires_grad_()
    B, C = (torch.randn(b, N, L, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    h0 = torch.randn(b, d, N, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    _, last = selective_scan_triton(u, delta, A, B, C, initial_state=h0, return_last_state=True, chunk=8, block_d=8)
    _, ref_last = selective_scan_ref(u, delta, A, B, C, initial_state=h0, return_last_state=True)
    assert_close(last, ref_last, 1e-12, "last_state")
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(DEVICE)
    (dh0,) = torch.autograd.grad((last * gl).sum(), h0)
    (ref_dh0,) = torch.autograd.grad((ref_last * gl).sum(), h0)
    assert_close(dh0, ref_dh0, 1e-12, "dinitial_state")


def test_state_update_puts_the_batch_on_grid_axis_0(monkeypatch):
    """CUDA allows 65535 programs on grid axes 1 and 2: the batch (a server may step more
    sequences than that) goes on axis 0, the channel blocks on axis 1."""
    from openlm_mamba.ops.state_update import triton as step_triton

    grids = []

    class Kernel:  # records the launch grid instead of running 70000 programs
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(step_triton, "_state_update_kernel", Kernel())
    batch = 70_000
    state = torch.zeros(batch, 2, 1, device=DEVICE)
    x = torch.zeros(batch, 2, device=DEVICE)
    B = torch.zeros(batch, 1, device=DEVICE)
    step_triton.selective_state_update_triton(state, x, x, -torch.ones(2, 1, device=DEVICE), B, B)
    (grid,) = grids
    assert grid[0] == batch and all(n <= 65535 for n in grid[1:]), grid


def test_conv_puts_time_tiles_on_grid_axis_0():
    """Axis 0 takes 2^31 - 1 programs, axes 1 and 2 only 65535: the time tiles (L / BLOCK_T, over 65535 from
    about 2M tokens at the model's BLOCK_T) go on axis 0, the batch on axis 2, which is checked."""
    from openlm_mamba.ops.causal_conv1d import triton as ct

    grids = []
    real = ct._conv_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    x = torch.randn(3, 8, 70).to(DEVICE)
    w = torch.randn(8, 4).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ct, "_conv_fwd_kernel", Spy())
        ct.causal_conv1d_fwd(x, w, None, None, True)
    (grid,) = grids
    bd, bt = ct._blocks(8, 70, False)
    assert grid == (triton.cdiv(70, bt), triton.cdiv(8, bd), 3), grid  # time tiles on axis 0, the batch on axis 2
    with pytest.raises(ValueError, match="batch 65536 is more than the 65535 sequences one launch takes"):
        ct._check_batch(65536)


def test_state_update_in_float64_accumulates_in_float64():
    """float64 inputs: the step computes in float64 (it was float32 throughout), over 20 decode steps."""
    from openlm_mamba.ops import selective_state_update, selective_state_update_ref

    g = torch.Generator().manual_seed(1)
    b, d, N = 2, 8, 4
    f64 = {"dtype": torch.float64}
    state = torch.randn(b, d, N, generator=g, **f64).to(DEVICE)
    A = (-torch.rand(d, N, generator=g, **f64) - 0.1).to(DEVICE)
    D, dt_bias = torch.randn(d, generator=g, **f64).to(DEVICE), torch.randn(d, generator=g, **f64).to(DEVICE)
    s_tri, s_ref = state.clone(), state.clone()
    for _ in range(20):
        x, dt, z = (torch.randn(b, d, generator=g, **f64).to(DEVICE) for _ in range(3))
        B, C = (torch.randn(b, N, generator=g, **f64).to(DEVICE) for _ in range(2))
        out = selective_state_update(s_tri, x, dt, A, B, C, D, z, dt_bias, True, backend="triton")
        ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, dt_bias, True)
        assert out.dtype == torch.float64
        assert_close(out, ref, 1e-12, "out")
    assert_close(s_tri, s_ref, 1e-12, "state")


def test_conv_final_states_are_not_a_view_of_x():
    x = torch.randn(2, 8, 10, device=DEVICE)
    w = torch.randn(8, 4, device=DEVICE)
    _, final = causal_conv1d(x, w, return_final_states=True, backend="triton")
    want = x[:, :, -3:].clone()
    x.zero_()
    assert torch.equal(final, want)


def test_add_norm_residual_dtype_follows_x_not_residual():
    """As the reference: a float64 residual does not make the new (float32) residual float64."""
    x = torch.randn(4, 32, device=DEVICE)
    res = torch.randn(4, 32, device=DEVICE, dtype=torch.float64)
    w = torch.rand(32, device=DEVICE) + 0.5
    out, new_res = add_norm(x, w, None, res, 1e-5, True, True, backend="triton")
    ref_out, ref_res = add_norm_ref(x, w, None, res, 1e-5, True, True)
    assert new_res.dtype == ref_res.dtype == torch.float32 and out.dtype == torch.float32
    assert_close(new_res, ref_res, 1e-6, "residual")
    assert_close(out, ref_out, 1e-5, "out")
