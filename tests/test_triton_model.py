"""MambaLM with every op on the Triton kernels equals the torch backend; the kernel benchmark runs.

Each check runs in a fresh process; without a GPU it sets TRITON_INTERPRET=1 there (Triton reads
it when a kernel is defined, so it must not leak into, or depend on, the rest of the session).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run python in a fresh process: Triton natively on a GPU, else through the interpreter."""
    # OPENLM_MAMBA_DISABLE_CPP: the torch backend's vectorised path, so no C++ build runs here
    env = dict(os.environ, OPENLM_MAMBA_DISABLE_CPP="1", PYTHONPATH=str(ROOT))
    env.pop("OPENLM_MAMBA_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


MODEL_CHECK = textwrap.dedent(
    """
    import torch
    from openlm_mamba import MambaLM

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MambaLM("mamba_tiny").to(device)
    ids = torch.randint(0, model.vocab_size, (2, 12), device=device)

    def run(backend):
        model.set_backend(backend)
        model.zero_grad(set_to_none=True)
        logits, _, _ = model(ids)
        (logits.float().square().mean() + logits[:, -1].float().sum()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run("torch")
    logits, grads = run("triton")
    scale = ref_logits.abs().max()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * scale)
    assert set(grads) == set(ref_grads) and len(grads) > 5
    for name, g in grads.items():
        r = ref_grads[name]
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max(), msg=lambda m, n=name: f"{n}: {m}")
    print("OK", len(grads), "parameter grads match")
    """
)


def test_model_triton_backend_matches_torch():
    proc = run_python(MODEL_CHECK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parameter grads match" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU tests/test_triton_ops.py runs natively in-process")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"),
    reason="TRITON_INTERPRET is set: tests/test_triton_ops.py runs in this process",
)
def test_op_grid_through_interpreter(request):
    """Run tests/test_triton_ops.py (the op grids; --full passes on) in a process with TRITON_INTERPRET=1."""
    full = ["--full"] if request.config.getoption("--full") else []
    proc = run_python(
        "", "-m", "pytest", "-q", "-p", "no:cacheprovider", *full, str(ROOT / "tests" / "test_triton_ops.py"),
        timeout=3600 if full else 900,
    )  # fmt: skip
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= (80 if full else 20), summary
    assert "failed" not in summary and "error" not in summary, summary
    print(summary)


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_python("", str(ROOT / "benchmarks" / "bench_kernels.py"), "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    rows = json.loads(out.read_text())["rows"]
    measured = {(r["op"], r["backend"]) for r in rows if "fwd_ms" in r}
    for op in ("selective_scan", "causal_conv1d", "add_norm"):
        assert {(op, "torch"), (op, "triton")} <= measured, rows
    assert all(r["fwd_bwd_ms"] > 0 and r["saved_MiB"] > 0 for r in rows if "fwd_ms" in r)
    assert "fwd+bwd ms" in proc.stdout


def test_sweep_scan_quick(tmp_path):
    """benchmarks/sweep_scan.py --quick: every launch shape timed, checked against torch, a best one named."""
    out = tmp_path / "sweep.json"
    proc = run_python("", str(ROOT / "benchmarks" / "sweep_scan.py"), "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    result = json.loads(out.read_text())
    kinds = {(r["pass"], r["kernel"]) for r in result["rows"]}
    assert kinds == {("fwd", "tile"), ("fwd", "seq"), ("bwd", "tile"), ("bwd", "seq")}, result["rows"]
    assert all(r["ms"] > 0 and r["rel_err"] < 1e-5 for r in result["rows"]), result["rows"]
    assert set(result["best"]) == {"fwd", "bwd"} and "best launch: fwd=" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its checks (minutes)")
def test_gpu_check_script_says_when_there_is_no_gpu(tmp_path):
    """benchmarks/gpu_check.sh without CUDA: a clear message and exit code 2, not a traceback."""
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device visible to torch" in (tmp_path / "device.txt").read_text()
