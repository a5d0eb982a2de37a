"""The fast CPU selective scan (the "torch" backend) against the reference recurrence.

Tolerance: for every output and every gradient, max |fast - ref| <= RTOL * max |ref| (normwise
relative error), with the fast path in float32 and the reference in float64 (the exact answer to
float32 rounding); float64 inputs must agree to 1e-10.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from openlm_mamba.ops import cpp, dispatch
from openlm_mamba.ops.selective_scan import cpu as scan_cpu
from openlm_mamba.ops.selective_scan import selective_scan
from openlm_mamba.ops.selective_scan.cpu import selective_scan_cpu
from openlm_mamba.ops.selective_scan.reference import selective_scan_ref

RTOL = 1e-4
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(
    batch=2,
    dim=20,
    L=64,
    N=4,
    groups=None,
    D=True,
    z=True,
    bias=True,
    x0=True,
    dtype=torch.float64,
    delta_scale=0.5,
    A_scale=1.0,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    A = (-(torch.rand(dim, N, generator=g, dtype=torch.float64) + 0.2) * A_scale).to(dtype)
    return {
        "u": rnd(batch, dim, L),
        "delta": rnd(batch, dim, L, scale=delta_scale),
        "A": A,
        "B": rnd(*bc),
        "C": rnd(*bc),
        "D": rnd(dim) if D else None,
        "z": rnd(batch, dim, L) if z else None,
        "delta_bias": rnd(dim, scale=0.3) if bias else None,
        "initial_state": rnd(batch, dim, N) if x0 else None,
    }


def run(fn, inputs, softplus=True, grads=True, to=None):
    """(out, last_state, grads of every given input) of ``fn``; inputs cast to ``to`` first."""
    leaves = {k: (None if v is None else v.detach().to(to or v.dtype).requires_grad_(grads)) for k, v in inputs.items()}
    out, last = fn(**leaves, delta_softplus=softplus, return_last_state=True)
    res = {"out": out, "last_state": last}
    if grads:
        g = torch.Generator().manual_seed(123)
        go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
        names = [k for k, v in leaves.items() if v is not None]
        gs = torch.autograd.grad((out * go).sum() + (last * gl).sum(), [leaves[k] for k in names])
        res.update({f"d{k}": v for k, v in zip(names, gs)})
    return res


def assert_close(fast: dict, ref: dict, rtol: float) -> None:
    assert fast.keys() == ref.keys()
    for k in ref:
        a, b = fast[k].double(), ref[k].double()
        assert a.shape == b.shape, k
        assert torch.isfinite(a).all(), f"{k}: non-finite values"
        err = (a - b).abs().max().item() if b.numel() else 0.0
        scale = b.abs().max().item() if b.numel() else 0.0
        assert err <= rtol * max(scale, 1e-30), f"{k}: max abs err {err:.3e} > {rtol} * max|ref| {scale:.3e}"


CASES = [
    # (batch, dim, L, N, groups, D, z, bias, x0, softplus)
    (2, 20, 1, 4, None, True, True, True, True, True),
    (2, 20, 63, 4, None, True, True, True, True, True),
    (1, 33, 64, 16, None, False, False, False, False, False),
    (2, 40, 129, 8, 2, True, True, True, True, True),
    (1, 16, 200, 5, 4, True, False, True, False, True),
    (3, 7, 65, 1, None, False, True, False, True, False),
    (1, 18, 512, 3, None, True, True, True, True, True),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}-d{}-L{}-N{}-g{}-{}".format(
        *c[:5], "".join("DzbxS"[i] if f else "-" for i, f in enumerate(c[5:]))
    ),
)
def test_fp32_matches_fp64_reference(case):
    batch, dim, L, N, groups, D, z, bias, x0, sp = case
    inputs = make_inputs(batch, dim, L, N, groups, D, z, bias, x0)
    ref = run(selective_scan_ref, inputs, sp)
    fast = run(selective_scan_cpu, inputs, sp, to=torch.float32)
    assert fast["out"].dtype == torch.float32 and fast["last_state"].dtype == torch.float32
    assert_close(fast, ref, RTOL)


@pytest.mark.parametrize("groups", [None, 2])
def test_fp64_matches_reference_exactly(groups):
    inputs = make_inputs(2, 36, 150, 6, groups)
    ref = run(selective_scan_ref, inputs)
    fast = run(selective_scan_cpu, inputs)
    assert fast["last_state"].dtype == torch.float64
    assert_close(fast, ref, 1e-10)


def test_bf16_inputs_accumulate_in_fp32():
    inputs = make_inputs(2, 24, 100, 4, dtype=torch.bfloat16)
    ref = run(selective_scan_ref, inputs)
    fast = run(selective_scan_cpu, inputs)
    assert fast["out"].dtype == torch.bfloat16
    assert fast["last_state"].dtype == torch.float32
    assert fast["du"].dtype == torch.bfloat16
    # same fp32 math on the same bf16 inputs: only the final bf16 rounding of outputs / grads differs
    assert_close({"last_state": fast["last_state"]}, {"last_state": ref["last_state"]}, 1e-5)
    assert_close(fast, ref, 2e-2)


@pytest.mark.parametrize("N", [3, 8, 9, 16, 17])
def test_state_counts(N):
    """float32 runs the states in register groups of 8, then one at a time: every split agrees."""
    inputs = make_inputs(2, 40, 130, N, seed=N)
    assert_close(run(selective_scan_cpu, inputs, to=torch.float32), run(selective_scan_ref, inputs), RTOL)


@pytest.mark.parametrize("A_scale", [1e2, 1e5, 1e7, 1e27, 1e38])
def test_extreme_decay(A_scale):
    """dt * A far below exp's range (past 2^17 for 1e7, where the fast exp's rounding trick
    no longer yields an integer; past 6e26, where its polynomial overflows): the decay underflows
    to exactly 0, never inf, NaN or garbage, forward and backward."""
    inputs = make_inputs(2, 32, 40, 16, A_scale=A_scale, seed=3)
    ref = run(selective_scan_ref, inputs)
    fast = run(selective_scan_cpu, inputs, to=torch.float32)
    assert_close(fast, ref, RTOL)


@pytest.mark.parametrize("where", ["A", "delta"])
def test_huge_dt_a_beside_ordinary_channels(where):
    """One channel's |dt A| past float's range (a huge A, or a huge delta through softplus) in the same
    16-channel block and time chunk as ordinary ones: that channel decays to 0, and the others keep the
    accuracy of the ordinary path (the checked exp those steps take is exact elsewhere)."""
    inputs = make_inputs(2, 32, 40, 16, seed=4)
    if where == "A":
        inputs["A"][5] = -1e30
    else:
        inputs["delta"][:, 5, 10:30] = 1e30
    ref = run(selective_scan_ref, inputs)
    fast = run(selective_scan_cpu, inputs, to=torch.float32)
    assert_close(fast, ref, RTOL)


@pytest.mark.slow
def test_length_4096_with_gradients():
    inputs = make_inputs(1, 18, 4096, 3, x0=True, seed=1)
    ref = run(selective_scan_ref, inputs)
    fast = run(selective_scan_cpu, inputs, to=torch.float32)
    assert_close(fast, ref, RTOL)


@pytest.mark.parametrize(
    ("delta_scale", "A_scale", "softplus"),
    [(8.0, 50.0, True), (1e-7, 1.0, False), (1e-7, 1e-3, False)],
    ids=["strong-decay", "near-zero-delta", "near-zero-delta-slow-A"],
)
def test_long_sequences_stay_finite_and_accurate(delta_scale, A_scale, softplus):
    inputs = make_inputs(2, 17, 4096, 4, delta_scale=delta_scale, A_scale=A_scale, seed=2)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # a raw delta must be >= 0
        inputs["delta_bias"] = None
    ref = run(selective_scan_ref, inputs, softplus, grads=False)
    fast = run(selective_scan_cpu, inputs, softplus, to=torch.float32)
    for v in fast.values():
        assert torch.isfinite(v).all()
    assert_close({k: fast[k] for k in ref}, ref, RTOL)


def test_no_state_sized_tensor_saved_for_backward():
    """Memory stays bounded: autograd keeps nothing of size (batch, dim, L, N)."""
    batch, dim, L, N = 2, 32, 1024, 16
    inputs = make_inputs(batch, dim, L, N, dtype=torch.float32)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = selective_scan_cpu(**leaves, delta_softplus=True)
    out.sum().backward()
    assert max(saved) <= batch * dim * L  # the largest saved tensors are (batch, dim, L) inputs
    assert sum(saved) < batch * dim * L * N / 2


def test_is_the_torch_backend_and_dispatch_uses_it():
    name, fn = dispatch.resolve("selective_scan", torch.device("cpu"), "torch")
    assert name == "torch" and fn is selective_scan_cpu
    inputs = make_inputs(1, 8, 40, 4, dtype=torch.float32)
    a = selective_scan(**inputs, delta_softplus=True, backend="torch")
    b = selective_scan_ref(**inputs, delta_softplus=True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs():
    inputs = make_inputs(2, 20, 50, 4, dtype=torch.float32)
    strided = {k: (None if v is None else v.transpose(0, -1).contiguous().transpose(0, -1)) for k, v in inputs.items()}
    strided["u"] = torch.cat([inputs["u"], inputs["u"]], 1)[:, ::2]
    inputs["u"] = strided["u"].contiguous()
    assert not strided["u"].is_contiguous()
    torch.testing.assert_close(run(selective_scan_cpu, strided), run(selective_scan_cpu, inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_first_inputs(dtype):
    """Every input stored (L, batch, dim), as a sequence-first model keeps activations: the gradients
    (allocated by the kernel, not copied from u's layout) equal those of contiguous inputs."""
    inputs = make_inputs(2, 20, 37, 4, dtype=dtype)
    seq_first = dict(inputs)
    for k in ("u", "delta", "z"):
        seq_first[k] = inputs[k].permute(2, 0, 1).contiguous().permute(1, 2, 0)
        assert not seq_first[k].is_contiguous()
    got, want = run(selective_scan_cpu, seq_first), run(selective_scan_cpu, inputs)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("where", ["delta", "delta_bias", "z", "u"])
@pytest.mark.parametrize("softplus", [False, True])
def test_nan_inputs_propagate_like_the_reference(where, softplus):
    """A NaN in an input gives NaN exactly where the reference has one (the vector clamps in exp and
    softplus must not replace it by a finite value: a diverging run has to show)."""
    inputs = make_inputs(1, 32, 9, 4, dtype=torch.float32, x0=False)
    t = inputs[where]
    t[(0,) * (t.dim() - 1) + (3,)] = float("nan")  # delta_bias: channel 3; others: channel 0 at step 3
    with torch.no_grad():
        fast = selective_scan_cpu(**inputs, delta_softplus=softplus, return_last_state=True)
        ref = selective_scan_ref(**inputs, delta_softplus=softplus, return_last_state=True)
    assert torch.isnan(ref[0]).any()
    for a, b in zip(fast, ref):  # the output, then the last state (which a NaN gate leaves finite)
        assert torch.equal(torch.isnan(a), torch.isnan(b))


@pytest.mark.parametrize("gb,gc", [(6, None), (None, 3), (2, 3), (None, 1)])  # None: ungrouped
def test_b_and_c_with_different_group_layouts(gb, gc):
    """B and C grouped differently (the kernel takes one group count from B) match the reference,
    forward and backward."""
    inputs = make_inputs(2, 12, 20, 4)
    g = torch.Generator().manual_seed(1)
    for name, groups in (("B", gb), ("C", gc)):
        inputs[name] = torch.randn(*((2, 4, 20) if groups is None else (2, groups, 4, 20)), generator=g).double()
    assert_close(run(selective_scan, inputs), run(selective_scan_ref, inputs), 1e-10)


LAYOUTS = {
    "contiguous": lambda base: base[..., :4].transpose(1, 2).contiguous(),  # time stride N
    "slice": lambda base: base[..., 4:8].transpose(1, 2),  # a time-major slice of a projection: time stride 13
    "broadcast": lambda base: base[:, :1, :4].transpose(1, 2).expand(-1, -1, 40),  # time stride 0
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("lb", "lc"),
    [("contiguous", "slice"), ("slice", "contiguous"), ("broadcast", "slice"), ("contiguous", "broadcast")],
)
def test_b_and_c_with_different_time_strides(lb, lc, dtype):
    """B and C laid out differently in memory (each read with its own time stride) match the
    reference, forward and backward, including B or C broadcast along time."""
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(2, 40, 13, generator=g, dtype=torch.float64) for k in "BC"}
    u, delta = (
        torch.randn(2, 24, 40, generator=g, dtype=torch.float64),
        torch.rand(2, 24, 40, generator=g, dtype=torch.float64),
    )
    A = -torch.rand(24, 4, generator=g, dtype=torch.float64) - 0.2

    def grads(fn, cast):
        leaves = [t.to(cast).requires_grad_() for t in (u, base["B"], base["C"])]
        Bv, Cv = LAYOUTS[lb](leaves[1]), LAYOUTS[lc](leaves[2])
        out, last = fn(leaves[0], delta.to(cast), A.to(cast), Bv, Cv, return_last_state=True)
        return [out, last, *torch.autograd.grad(out.square().sum() + last.sum(), leaves)]

    fast = grads(selective_scan_cpu, dtype)
    ref = grads(selective_scan_ref, torch.float64)
    names = ("out", "last_state", "du", "dB", "dC")
    assert_close(dict(zip(names, fast)), dict(zip(names, ref)), RTOL if dtype == torch.float32 else 1e-10)


def test_build_lock_left_by_a_killed_build_is_removed(tmp_path):
    """torch waits forever on a build lock a killed build left behind; the loader breaks a stale one."""
    import os
    import threading
    import time

    assert cpp.wait_for_build_lock(tmp_path) is False  # no lock: no wait
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()  # a build in progress finishes: wait for it, keep nothing
    t0 = time.perf_counter()
    assert cpp.wait_for_build_lock(tmp_path, stale_after=60, poll=0.05) is False
    assert 0.25 < time.perf_counter() - t0 < 5
    lock.touch()
    old = time.time() - 1000
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert cpp.wait_for_build_lock(tmp_path, stale_after=300) is True
    assert not lock.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_builders_take_turns_under_a_file_lock_a_dead_build_cannot_keep(tmp_path, capsys):
    """A live build is waited for, saying so (it was a silent wait, and a build slower than 5 minutes had its lock
    broken); torch's lock found by the next builder was left by a killed one and goes at once (it took 5 minutes)."""
    import fcntl
    import os
    import threading
    import time

    held = os.open(tmp_path / ".openlm_mamba_build.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # another builder's turn
    threading.Timer(0.4, os.close, (held,)).start()
    t0 = time.perf_counter()
    with cpp.build_turn(tmp_path):
        waited = time.perf_counter() - t0
    assert 0.3 < waited < 5, waited
    assert f"waiting for another process building the C++ CPU kernels in {tmp_path}" in capsys.readouterr().err
    (tmp_path / "lock").touch()  # fresh, but no process holds the turn: a killed build's
    t0 = time.perf_counter()
    warned = pytest.warns(RuntimeWarning, match="removed a build lock left by an interrupted build")
    with warned, cpp.build_turn(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert time.perf_counter() - t0 < 2


def test_failed_build_names_the_compiler_error(tmp_path):
    """The warning quoted only ninja's last line ("build stopped: subcommand failed"); it names the error and
    where the whole output was kept."""
    output = (
        "Error building extension 'openlm_mamba_cpu_x':\n[1/2] c++ -c step_cpu.cpp -o step_cpu.o\nFAILED: step_cpu.o\n"
        "c++ -c step_cpu.cpp\nstep_cpu.cpp:12:10: fatal error: torch/library.h: No such file or directory\n"
        "compilation terminated.\nninja: build stopped: subcommand failed."
    )
    reason = cpp.build_failure(RuntimeError(output), tmp_path)
    assert reason == (
        "RuntimeError: step_cpu.cpp:12:10: fatal error: torch/library.h: No such file or directory "
        f"(the whole compiler output: {tmp_path / 'build_error.log'})"
    )
    assert (tmp_path / "build_error.log").read_text().strip() == output
    assert cpp.build_failure(RuntimeError("no C++ compiler: 'c++' not found"), tmp_path).endswith("not found")


def test_sources_compile_from_one_place_for_every_checkout(tmp_path):
    """The build compiles a copy of csrc/ kept in the build directory: another checkout of the same
    sources reuses the cached library instead of rebuilding (ninja rebuilds when a path changes)."""
    src = cpp._stable_sources(tmp_path)
    assert src == tmp_path / "src"
    for name in cpp.SOURCES:
        assert (src / name).read_bytes() == (cpp.CSRC / name).read_bytes()
    (src / cpp.SOURCES[0]).write_text("stale")
    cpp._stable_sources(tmp_path)  # a changed source is refreshed
    assert (src / cpp.SOURCES[0]).read_bytes() == (cpp.CSRC / cpp.SOURCES[0]).read_bytes()


def test_c_extension_is_used_here():
    """CI machines have a compiler: the fast path must not silently run the slow fallback."""
    if cpp.cpp_disabled():
        pytest.skip(f"${cpp.DISABLE_ENV} is set")
    assert cpp.load_extension(), cpp._ext_state.get("reason")


@pytest.fixture
def forced_fallback(monkeypatch):
    """Pretend no compiler is present (as $OPENLM_MAMBA_DISABLE_CPP=1 does), then restore."""
    saved = dict(cpp._ext_state)
    cpp._ext_state.clear()
    monkeypatch.setenv(cpp.DISABLE_ENV, "1")
    yield
    cpp._ext_state.clear()
    cpp._ext_state.update(saved)


@pytest.mark.parametrize("groups", [None, 2])
def test_pure_pytorch_fallback_warns_once_and_matches(forced_fallback, groups):
    inputs = make_inputs(2, 20, 70, 4, groups)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = run(selective_scan_cpu, inputs)
        run(selective_scan_cpu, inputs, grads=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "pure PyTorch path" in msgs[0] and "\n" not in msgs[0], msgs
    assert not cpp.load_extension()
    assert_close(fast, run(selective_scan_ref, inputs), 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("L", [1, 2, 63, 64, 65, 127, 511, 1000, 2048, 4096])
@pytest.mark.parametrize("N", [1, 16])
@pytest.mark.parametrize("groups", [None, 1, 4])
def test_full_grid(L, N, groups):
    inputs = make_inputs(2, 48, L, N, groups, seed=L)
    ref = run(selective_scan_ref, inputs)
    fast = run(selective_scan_cpu, inputs, to=torch.float32)
    assert_close(fast, ref, RTOL)


def test_bench_cpu_quick_runs(capsys):
    """benchmarks/bench_cpu.py --quick: the side-by-side table and the scaling table come out."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
    spec = importlib.util.spec_from_file_location("bench_cpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    contenders = ["openlm_mamba"] + (["mambapy"] if importlib.util.find_spec("mambapy") else [])
    rc = bench.main(["--quick", "--contenders", ",".join(contenders), "--scaling", "32,64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in contenders:
        assert f"| train   | {name}" in out and f"| prefill | {name}" in out, out
    assert "| 64  |" in out  # the scaling table's last row
    if len(contenders) > 1:
        assert "same weights, result spread" in out


def test_model_views_are_read_in_place(monkeypatch):
    """The model's u, delta, z, B and C are views of its projections: no time-major copies are made."""
    seen = {}
    real = scan_cpu._fwd_impl

    def spy(u, delta, At, Bt, Ct, D, z, bias, sp, x0, K):
        seen.update(u=u, delta=delta, z=z, B=Bt, C=Ct)
        return real(u, delta, At, Bt, Ct, D, z, bias, sp, x0, K)

    monkeypatch.setattr(scan_cpu, "_fwd_impl", spy)
    batch, dim, L, N = 2, 32, 50, 4
    xz = torch.randn(batch, L, 2 * dim)
    x_dbl = torch.randn(batch, L, 2 + 2 * N)
    delta = torch.randn(batch, L, dim)
    u, z = xz[..., :dim].transpose(1, 2), xz[..., dim:].transpose(1, 2)
    B, C = x_dbl[..., 2 : 2 + N].transpose(1, 2), x_dbl[..., 2 + N :].transpose(1, 2)
    args = (u, delta.transpose(1, 2), -torch.rand(dim, N) - 0.5, B, C, torch.randn(dim), z, torch.randn(dim), True)
    out = selective_scan_cpu(*args)
    assert seen["u"].data_ptr() == xz.data_ptr() and seen["z"].data_ptr() == xz[..., dim:].data_ptr()
    assert seen["delta"].data_ptr() == delta.data_ptr()
    assert seen["B"].data_ptr() == B.data_ptr() and seen["C"].data_ptr() == C.data_ptr()
    ref = selective_scan_ref(*(a.double() if torch.is_tensor(a) else a for a in args))
    assert (out.double() - ref).abs().max() <= RTOL * ref.abs().max()


EMPTY_SHAPES = [(2, 4, 0), (0, 4, 5), (0, 4, 0), (2, 0, 5)]  # (batch, dim, L): no elements


def empty_inputs(batch, dim, L, init: bool = True, dtype=torch.float32) -> dict:
    """make_inputs sliced down to (batch, dim, L): views with the strides slicing leaves, as in a model."""
    full = make_inputs(batch or 3, dim or 4, L or 5, N=3, x0=init, dtype=dtype)
    b, d, t = slice(batch if batch == 0 else None), slice(dim if dim == 0 else None), slice(L if L == 0 else None)
    where = {"u": (b, d, t), "delta": (b, d, t), "z": (b, d, t), "B": (b, slice(None), t), "C": (b, slice(None), t)}
    where.update({"A": (d,), "D": (d,), "delta_bias": (d,), "initial_state": (b, d)})
    return {k: None if v is None else v[where[k]] for k, v in full.items()}


def check_empty_scan(batch, dim, L, init: bool, dtype=torch.float32):
    inputs = empty_inputs(batch, dim, L, init, dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    out, last = selective_scan(**args, delta_softplus=True, return_last_state=True, backend="torch")
    assert out.shape == (batch, dim, L) and out.dtype == dtype
    assert last.shape == (batch, dim, 3) and last.dtype == torch.float32
    if init and L == 0:
        assert torch.equal(last, inputs["initial_state"])  # no step taken: the state comes back
    elif L == 0:
        assert not last.any()
    (out.sum() + (last * 2).sum()).backward()
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.shape == t.shape, name
    if init and L == 0:
        assert torch.equal(leaves["initial_state"].grad, torch.full_like(last, 2.0))


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("init", [False, True])
def test_empty_inputs_give_empty_outputs(shape, init):
    """Zero-size inputs (the C++ kernels need elements) give empty outputs and gradients; with no time
    step the last state is the initial state (or zeros)."""
    check_empty_scan(*shape, init)
    with torch.no_grad():
        out = selective_scan(*(empty_inputs(*shape)[k] for k in NAMES[:5]))
    assert out.shape == shape


@pytest.mark.parametrize("shape", EMPTY_SHAPES[:2])
def test_empty_inputs_without_the_extension(forced_fallback, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one "pure PyTorch path" warning
        check_empty_scan(*shape, init=True)


def test_double_backward_is_an_error_not_zeros():
    """The C++ backward kernels have no autograd of their own: differentiating a gradient again
    (create_graph=True) must fail loudly, not return zeros."""
    from openlm_mamba.ops import causal_conv1d

    inputs = make_inputs(1, 16, 8, 2, x0=False)
    u = inputs["u"].clone().requires_grad_()
    out = selective_scan(u, inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="torch")
    (g,) = torch.autograd.grad(out.square().sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.square().sum().backward()
    x = inputs["u"].clone().requires_grad_()
    (g,) = torch.autograd.grad(
        causal_conv1d(x, torch.randn(16, 4, dtype=x.dtype), activation="silu").square().sum(), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.square().sum().backward()


def test_ninja_of_an_unactivated_venv_is_found(tmp_path, monkeypatch):
    """The package depends on ninja, which pip puts in the venv's bin/; a venv's python run without activating it
    has no bin/ on $PATH, and torch's builder runs ``ninja`` from $PATH: that bin/ is put on it."""
    import os
    import sys

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (bin_dir / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "ninja", None)  # no PyPI ninja module either: only the venv's bin/
    cpp._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(bin_dir)
    cpp._ninja_on_path()  # found now: PATH is left alone
    assert os.environ["PATH"].count(str(bin_dir)) == 1
