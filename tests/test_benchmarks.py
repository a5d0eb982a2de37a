"""The benchmark scripts' command lines: bad values end in one argparse error (exit 2) before anything runs,
GPU scripts say so on a machine without CUDA, --quick fills only the flags not given, bench_convert
never removes what it did not write, and a failing shape in the sweep's compile workers is a row."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import help_parser, undocumented_flags

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.fixture
def load(monkeypatch):
    """Import a benchmark script as a module (its directory on sys.path, as when run as a script)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def _load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return _load


def usage_error(module, argv: list[str], capsys) -> str:
    """Run ``module.main(argv)``; it must stop in argparse with exit code 2. Returns the error line."""
    grad = torch.is_grad_enabled()
    try:
        with pytest.raises(SystemExit) as info:
            module.main(argv)
    finally:
        torch.set_grad_enabled(grad)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and ": error: " in lines[-1] and lines[0].startswith("usage: "), err
    return lines[-1]


BAD_FLAGS = [
    ("bench_generate", ["--new-tokens", "1"], "--new-tokens: must be at least 2"),
    ("bench_generate", ["--new-tokens", "0"], "--new-tokens: expected a positive int"),
    ("bench_generate", ["--hf-repeats", "0"], "--hf-repeats: expected a positive int"),
    ("bench_generate", ["--repeats", "0"], "--repeats: expected a positive int"),
    ("bench_generate", ["--dtype", "foo"], "--dtype: invalid choice"),
    ("bench_generate", ["--threads", "-1"], "--threads: expected a positive int"),
    ("bench_generate", ["--contexts", "0"], "--contexts: expected comma-separated positive ints"),
    ("bench_generate", ["--contexts", "8,abc"], "--contexts: expected comma-separated positive ints"),
    ("bench_generate", ["--batch", "0"], "--batch: expected a positive int"),
    ("bench_generate", ["--backend", "nope"], "--backend: invalid choice"),
    ("bench_generate", ["--device", "nodevice"], "--device: not a torch device"),
    ("bench_prefill", ["--rounds", "0"], "--rounds: expected a positive int"),
    ("bench_prefill", ["--calls", "0"], "--calls: expected a positive int"),
    ("bench_kernels", ["--seqlen", "0"], "--seqlen: expected a positive int"),
    ("bench_kernels", ["--repeats", "0"], "--repeats: expected a positive int"),
    ("bench_kernels", ["--ops", "foo"], "--ops: expected comma-separated names from selective_scan"),
    ("bench_kernels", ["--backends", "torch,foo"], "--backends: expected comma-separated names from torch"),
    ("bench_kernels", ["--width", "7"], "--width: invalid choice"),
    ("bench_kernels", ["--quick", "--tokens", "12"], "--tokens (12) must be a multiple of --seqlen (8)"),
    ("bench_cpu", ["--scaling", "abc"], "--scaling: expected comma-separated positive ints"),
    ("bench_cpu", ["--runs", "0"], "--runs: expected a positive int"),
    ("bench_cpu", ["--seq", "0"], "--seq: expected a positive int"),
    ("bench_cpu", ["--contenders", "openlm_mamba,mambpy"], "(unknown: mambpy)"),
    ("bench_cpu", ["--threads", "-1"], "--threads: expected an int >= 0"),
    ("bench_train_gpu", ["--contenders", "openlm_mamba,typo"], "openlm_mamba+ckpt"),
    ("bench_train_gpu", ["--contenders", "mambapy"], "--contenders: must include openlm_mamba"),
    ("bench_train_gpu", ["--quick", "--model", "nosuch"], "--model: unknown model config 'nosuch'"),
    ("sweep_scan", ["--fwd", "8x16"], "--fwd: expected comma-separated shapes"),
    ("sweep_scan", ["--fwd", "8x16xa"], "--fwd: expected comma-separated shapes"),
    ("sweep_scan", ["--jobs", "-1"], "--jobs: expected an int >= 0"),
    ("sweep_scan", ["--fwd", "tile:8x16x4"], "--fwd: expected comma-separated shapes"),
    ("bench_convert", ["--model", "nosuch"], "--model: unknown model config 'nosuch'"),
]


@pytest.mark.parametrize(("script", "argv", "message"), BAD_FLAGS, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD_FLAGS])
def test_bad_flag_is_one_argparse_error(load, capsys, script, argv, message):
    assert message in usage_error(load(script), argv, capsys)


@no_cuda
@pytest.mark.parametrize("script", ["bench_generate", "bench_train_gpu"])
def test_device_cuda_without_cuda_is_one_error(load, capsys, script):
    assert "torch sees no CUDA device" in usage_error(load(script), ["--device", "cuda"], capsys)


@no_cuda
@pytest.mark.parametrize("script", ["bench_kernels", "sweep_scan", "bench_train_gpu"])
def test_gpu_scripts_without_cuda_and_without_quick_exit_2(load, capsys, script):
    assert load(script).main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{script}: needs a CUDA GPU") and "--quick" in err, err


@pytest.mark.parametrize(
    "script",
    [
        "bench_convert",
        "bench_cpu",
        "bench_generate",
        "bench_kernels",
        "bench_prefill",
        "bench_train_gpu",
        "sass_scan",
        "sweep_scan",
    ],
)
def test_help_shows_the_docstring_and_every_flag_explained(load, capsys, monkeypatch, script):
    module = load(script)
    parser = help_parser(monkeypatch, module.main)
    out = capsys.readouterr().out
    assert module.__doc__.strip().splitlines()[-1].strip() in out, out  # the whole docstring, not its first line
    assert not undocumented_flags(parser), undocumented_flags(parser)


def test_help_of_gpu_scripts_says_a_gpu_is_needed(load, capsys):
    for script in ("bench_kernels", "sweep_scan"):
        with pytest.raises(SystemExit):
            load(script).main(["--help"])
        assert "without --quick a CUDA GPU is needed" in " ".join(capsys.readouterr().out.split())


def test_kernels_header_says_whether_the_interpreter_runs(load, monkeypatch):
    bk = load("bench_kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bk.device_name(torch.device("cpu")) == "CPU (Triton interpreter)"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert bk.device_name(torch.device("cpu")) == "CPU"


@pytest.mark.parametrize("script", ["gpu_check.sh", "ncu_kernels.sh"])
def test_gpu_script_help_starts_nothing(tmp_path, script):
    out = tmp_path / "results"
    for flag in ("-h", "--help"):
        proc = subprocess.run(
            ["bash", str(BENCH / script), flag],
            env=dict(os.environ, OUT=str(out)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: bash benchmarks/{script}"), proc.stdout
        assert "Results go to $OUT" in proc.stdout  # the header comment explains what it runs and writes
        assert not out.exists()  # no results directory, no stage started
    proc = subprocess.run(["bash", str(BENCH / script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.skipif(shutil.which("ncu") is not None, reason="Nsight Compute is installed here")
def test_ncu_script_says_when_ncu_is_missing(tmp_path):
    proc = subprocess.run(
        ["bash", str(BENCH / "ncu_kernels.sh")],
        env=dict(os.environ, OUT=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "ncu (Nsight Compute) not found" in proc.stderr, proc.stderr


# -- bench_convert: only what it wrote is removed; a failing child is reported, not dumped ------------------
def test_convert_refuses_a_non_empty_dir(load, capsys, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    assert "is not empty" in usage_error(
        load("bench_convert"), ["--model", "mamba_tiny", "--dir", str(tmp_path)], capsys
    )
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_convert_cleanup_removes_only_its_own_entries(load, tmp_path):
    bc = load("bench_convert")
    work = tmp_path / "work"
    (work / "hf").mkdir(parents=True)
    (work / "hf" / "model.safetensors").write_text("x")
    (work / "epoch_0.pt").write_text("x")
    (work / ".hf_sharded.partial-host-123").mkdir()
    (work / "other.txt").write_text("not ours")
    bc.remove_outputs(work, ["epoch_0.pt", "hf", "hf_sharded", "back.pt"], created=True)
    assert sorted(p.name for p in work.iterdir()) == ["other.txt"]  # not empty: the directory stays
    (work / "other.txt").unlink()
    bc.remove_outputs(work, ["epoch_0.pt"], created=False)
    assert work.is_dir()  # given by the user: stays even when empty
    bc.remove_outputs(work, ["epoch_0.pt"], created=True)
    assert not work.exists()  # created by the benchmark and empty: removed


def test_convert_child_failure_shows_its_stderr(load, capsys, tmp_path):
    bc = load("bench_convert")
    with pytest.raises(SystemExit) as info:
        bc.child(
            ["import sys; sys.stderr.write('line one\\nConversionError: destination exists\\n'); sys.exit(3)"], "x"
        )
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert "failed (exit code 3)" in err and "ConversionError: destination exists" in err, err
    assert "Traceback" not in err and "CalledProcessError" not in err, err


# -- --quick fills only the flags not given ----------------------------------------------------------------
def test_cpu_quick_keeps_given_flags_and_reports_progress(load, capsys):
    bench = load("bench_cpu")
    grad = torch.is_grad_enabled()
    try:
        rc = bench.main(["--quick", "--contenders", "openlm_mamba", "--d-model", "48", "--scaling", "32"])
    finally:
        torch.set_grad_enabled(grad)
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "# config: d_model 48, n_layer 2," in out, out
    assert "| 32  |" in out and "| 64 " not in out, out  # --scaling 32 kept, not --quick's 64,128
    assert "# openlm_mamba train: " in err and "# openlm_mamba prefill: " in err, err  # progress on stderr
    assert "# openlm_mamba train: " not in out


def test_train_quick_keeps_given_flags_and_prints_no_nan(load, capsys):
    bench = load("bench_train_gpu")
    grad = torch.is_grad_enabled()
    try:
        rc = bench.main(["--quick", "--contenders", "openlm_mamba", "--seq", "32", "--runs", "2"])
    finally:
        torch.set_grad_enabled(grad)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "batch 2 x 32," in out, out
    assert "nan" not in out and "| openlm_mamba | " in out, out
    if not torch.cuda.is_available():
        assert "| - | 1.00x |" in out, out  # no GPU memory to report on CPU


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_sweep_compile_worker_failure_is_a_row(tmp_path):
    """A launch shape that does not compile (not a power of 2) in a parallel compile worker becomes a row;
    --quick keeps the given --fwd / --bwd."""
    env = dict(os.environ, OPENLM_MAMBA_DISABLE_CPP="1", PYTHONPATH=str(ROOT))
    env["OPENLM_MAMBA_SCAN_LAUNCH"] = "fwd=8x16x4"  # would set every GPU row's shape: the sweep drops it
    env.pop("OPENLM_MAMBA_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # --quick on CPU switches the interpreter on itself
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(BENCH / "sweep_scan.py"), "--quick", "--fwd", "3x7x1,4x16x1", "--bwd", "3x7x1"]
    cmd += ["--jobs", "1"]
    proc = subprocess.run([*cmd, "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    rows = json.loads(out.read_text())["rows"]
    shapes = [(r["pass"], r["tile"], r["block_d"], r["warps"]) for r in rows]
    assert shapes == [("fwd", 3, 7, 1), ("fwd", 4, 16, 1), ("bwd", 3, 7, 1)], rows
    assert "error" in rows[0] and "error" in rows[2] and rows[1]["ms"] > 0, rows
    assert "# compiled 1/3: fwd (3, 7, 1): failed: " in proc.stdout, proc.stdout
    assert "sweep_scan: ignoring $OPENLM_MAMBA_SCAN_LAUNCH" in proc.stderr, proc.stderr


def _nvidia_triton() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_triton(), reason="triton with its NVIDIA backend is not installed")
def test_sass_scan_counts_the_inner_loop():
    """benchmarks/sass_scan.py compiles launches for sm_90 (no GPU) and reports their per-update cost; it runs in
    a process of its own without TRITON_INTERPRET (Triton reads it when the kernels are first defined)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)

    def sass(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(BENCH / "sass_scan.py"), *args]
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)

    proc = sass("8x16x4", "seq:1x128x4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| 8x16x4", "| seq:1x128x4"))]
    assert len(rows) == 2, proc.stdout
    per_update = [float(r.split("|")[4]) for r in rows]
    assert all(4 < v < 200 for v in per_update), rows  # at least the exp and two FMAs of the recurrence
    assert per_update[1] < per_update[0], rows  # the seq kernel's point: fewer instructions per update
    proc = sass("--backward", "seq:1x64x2")
    assert proc.returncode == 0 and "selective scan backward on sm_90" in proc.stdout, proc.stdout + proc.stderr
    assert "| seq:1x64x2 |" in proc.stdout, proc.stdout
    proc = sass("8x12x4")
    assert proc.returncode == 2 and "must be a power of two" in proc.stderr, proc.stderr
    env["TRITON_INTERPRET"] = "1"
    proc = sass("8x16x4")
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr, proc.stderr
