"""The benchmark scripts' command lines: bad values end in one argparse error (exit 2) before anything runs,
GPU scripts say so on a machine without CUDA, --quick fills only the flags not given, bench_convert
never removes what it did not write, a failing shape in the sweep's compile workers is a row, a failing
contender or profile is a failed row and a non-zero exit code, and --json writes valid JSON to a checked path."""

from __future__ import annotations

import importlib.util
import json
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
    ("bench_generate", ["--device", "cpu", "--backend", "cuda"], "--backend: selective_scan: backend 'cuda' is una"),
    ("bench_eval", ["--workloads", "mmlu,foo"], "--workloads: expected comma-separated names from mmlu, hellaswag"),
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


def test_ncu_script_exits_1_when_a_profile_fails(tmp_path):
    """A stand-in ncu, first on PATH: it profiles the scan, and fails the conv / norm run when $NCU_FAIL is set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ncu").write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '    *"--ops selective_scan "*) echo "  _scan_fwd_kernel (1, 1, 1)" ;;\n'
        '    *) [ -n "$NCU_FAIL" ] && exit 3; echo "  _conv_bwd_kernel (1, 1, 1)" ;;\n'
        "esac\n"
    )
    (bin_dir / "ncu").chmod(0o755)

    def run(fail: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, OUT=str(tmp_path / "out"), NCU_FAIL=fail)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        cmd = ["bash", str(BENCH / "ncu_kernels.sh")]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    proc = run("")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ncu_conv_norm.txt rc=0 (1 kernel reports)" in proc.stdout, proc.stdout
    proc = run("1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ncu_scan.txt rc=0 (1 kernel reports)" in proc.stdout, proc.stdout  # the other profile still ran
    assert "ncu_conv_norm.txt rc=3 (0 kernel reports)" in proc.stdout, proc.stdout
    assert "1 of 2 profiles failed" in proc.stderr, proc.stderr


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
def strict_json(path: Path):
    """The file's JSON, refusing NaN / Infinity (not JSON, though Python's json writes and reads them)."""

    def refuse(token):
        raise ValueError(f"{token} is not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_cpu_quick_keeps_given_flags_and_reports_progress(load, capsys, tmp_path):
    bench = load("bench_cpu")
    grad = torch.is_grad_enabled()
    try:
        argv = ["--quick", "--contenders", "openlm_mamba", "--d-model", "48", "--scaling", "32"]
        rc = bench.main([*argv, "--json", str(tmp_path / "cpu.json")])
    finally:
        torch.set_grad_enabled(grad)
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "# config: d_model 48, n_layer 2," in out, out
    assert "| 32  |" in out and "| 64 " not in out, out  # --scaling 32 kept, not --quick's 64,128
    assert "# openlm_mamba train: " in err and "# openlm_mamba prefill: " in err, err  # progress on stderr
    assert "# openlm_mamba train: " not in out
    results = strict_json(tmp_path / "cpu.json")  # in-process --quick: no memory numbers, null rather than NaN
    assert results["train/openlm_mamba"]["peak_rss_mib"] is None and results["scaling/32"]["act_mib"] is None


def test_train_quick_keeps_given_flags_and_prints_no_nan(load, capsys, tmp_path):
    bench = load("bench_train_gpu")
    grad = torch.is_grad_enabled()
    try:
        argv = ["--quick", "--contenders", "openlm_mamba", "--seq", "32", "--runs", "2"]
        rc = bench.main([*argv, "--json", str(tmp_path / "train.json")])
    finally:
        torch.set_grad_enabled(grad)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "batch 2 x 32," in out, out
    assert "nan" not in out and "| openlm_mamba | " in out, out
    results = strict_json(tmp_path / "train.json")["results"]
    assert [r["name"] for r in results] == ["openlm_mamba"], results
    if not torch.cuda.is_available():
        assert "| - | 1.00x |" in out, out  # no GPU memory to report on CPU
        assert results[0]["peak_gib"] is None, results  # null, not NaN


# -- --json: its directory is checked before the run; failures are rows and exit code 1 ---------------------
@pytest.mark.parametrize("script", ["bench_cpu", "bench_kernels", "bench_train_gpu", "sweep_scan"])
def test_json_path_is_checked_before_the_run(load, capsys, tmp_path, script):
    module = load(script)
    missing = tmp_path / "no" / "such" / "out.json"
    assert "--json: directory" in usage_error(module, ["--json", str(missing)], capsys)
    assert "does not exist" in usage_error(module, ["--json", str(missing)], capsys)
    assert "(a directory)" in usage_error(module, ["--json", str(tmp_path)], capsys)


def test_json_path_must_be_writable(load, monkeypatch, tmp_path):
    import argparse

    args = load("_bench_args")
    assert args.output_file(str(tmp_path / "out.json")) == str(tmp_path / "out.json")
    monkeypatch.setattr(args.os, "access", lambda path, mode: False)  # as a non-root user in a read-only dir
    with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
        args.output_file(str(tmp_path / "out.json"))


def fake_measure(fail: str = ""):
    """A stand-in for bench_train_gpu.measure: records the contenders measured; ``fail`` raises."""
    measured = []

    def measure(name, cfg, args):
        measured.append(name)
        if name == fail:
            raise RuntimeError("CUDA out of memory\nmore detail")
        return {"name": name, "times": [0.01], "median_s": 0.01, "peak_gib": float("nan"), "loss": 1.0}

    return measure, measured


def test_train_failing_contender_is_a_row_and_exit_code_1(load, capsys, monkeypatch, tmp_path):
    bench = load("bench_train_gpu")
    measure, measured = fake_measure(fail="openlm_mamba+ckpt")
    monkeypatch.setattr(bench, "measure", measure)
    argv = ["--quick", "--contenders", "openlm_mamba,openlm_mamba+ckpt,mambapy"]
    rc = bench.main([*argv, "--json", str(tmp_path / "train.json")])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert measured == ["openlm_mamba", "openlm_mamba+ckpt", "mambapy"], measured  # the others still ran
    assert "  openlm_mamba+ckpt: failed: RuntimeError: CUDA out of memory\n" in out, out
    assert "| openlm_mamba+ckpt | failed |" in out and "| mambapy | 10.0 |" in out, out
    results = strict_json(tmp_path / "train.json")["results"]
    assert results[1] == {"name": "openlm_mamba+ckpt", "error": "RuntimeError: CUDA out of memory"}, results


@no_cuda
def test_train_quick_on_cpu_leaves_out_the_seq_kernels(load, capsys, monkeypatch):
    """openlm_mamba+seq only changes the Triton scan: on CPU (torch backend) it would repeat openlm_mamba."""
    bench = load("bench_train_gpu")
    measure, measured = fake_measure()
    monkeypatch.setattr(bench, "measure", measure)
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert measured == ["openlm_mamba", "openlm_mamba+ckpt", "mambapy", "transformers"], measured
    assert "# openlm_mamba+seq left out: " in out, out
    measured.clear()
    assert bench.main(["--quick", "--contenders", "openlm_mamba,openlm_mamba+seq"]) == 0  # named: it runs
    assert measured == ["openlm_mamba", "openlm_mamba+seq"], measured
    assert "left out" not in capsys.readouterr().out


def test_cpu_warms_transformers_up_in_quick_mode_only(load, capsys, monkeypatch):
    """--quick: transformers gets a warm-up run like the others; at full size (a step takes minutes) none, and
    the header says so."""
    bench = load("bench_cpu")
    calls = []

    def run_worker(args, name, task, runs, warmup, **over):
        calls.append((name, task, warmup))
        r = {"name": name, "task": task, "times": [0.01] * runs, "median_s": 0.01, "value": 1.0}
        return {**r, "peak_rss_mib": 100.0, "act_mib": 10.0}

    monkeypatch.setattr(bench, "run_worker", run_worker)
    argv = ["--contenders", "openlm_mamba,transformers", "--scaling", "32"]
    assert bench.main(["--quick", *argv]) == 0
    assert ("transformers", "train", 1) in calls and ("transformers", "prefill", 1) in calls, calls
    assert "no warm-up" not in capsys.readouterr().out
    calls.clear()
    assert bench.main(argv) == 0
    assert ("transformers", "train", 0) in calls and ("openlm_mamba", "train", 1) in calls, calls
    assert "# transformers: no warm-up run at this size" in capsys.readouterr().out


# -- bench_generate: --backend is the whole model's, checked against the device up front --------------------
def test_generate_backend_that_cannot_run_on_the_device_is_one_error(load, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = usage_error(load("bench_generate"), ["--device", "cpu", "--backend", "triton"], capsys)
    assert "argument --backend: selective_scan: backend 'triton' is unavailable on cpu" in line, line
    monkeypatch.setenv("OPENLM_MAMBA_BACKEND", "cuda")  # the model's backend when --backend is not given
    line = usage_error(load("bench_generate"), ["--device", "cpu"], capsys)
    assert "$OPENLM_MAMBA_BACKEND: selective_scan: backend 'cuda' is unavailable on cpu" in line, line


def test_generate_backend_is_set_on_the_model(load, capsys, monkeypatch):
    """--backend goes to model.set_backend (prompt and decoding step); generate() gets no backend= of its own."""
    bench = load("bench_generate")
    seen = []

    def generate(model, ids, **kwargs):
        seen.append((model.layers[0].mixer.backend, "backend" in kwargs))
        return real(model, ids, **kwargs)

    real = bench.generate
    monkeypatch.setattr(bench, "generate", generate)
    argv = ["--device", "cpu", "--backend", "torch", "--no-hf", "--contexts", "8", "--new-tokens", "2"]
    grad = torch.is_grad_enabled()
    try:
        bench.main([*argv, "--repeats", "1", "--d-model", "16", "--n-layer", "1", "--vocab", "64"])
    finally:
        torch.set_grad_enabled(grad)
    out = capsys.readouterr().out
    assert seen and set(seen) == {("torch", False)}, seen
    assert "backend=torch" in out and "| 8 | " in out, out


# -- bench_eval: a workload named twice runs once ---------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_eval_runs_a_repeated_workload_once(load, capsys):
    bench = load("bench_eval")
    argv = ["--workloads", "mmlu,mmlu", "--questions", "1", "--no-hf", "--repeats", "1"]
    grad = torch.is_grad_enabled()
    try:
        assert bench.main([*argv, "--d-model", "16", "--n-layer", "1", "--vocab", "300"]) == 0
    finally:
        torch.set_grad_enabled(grad)
    out = capsys.readouterr().out
    assert out.count("| mmlu |") == 1, out


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
    rows = strict_json(out)["rows"]
    shapes = [(r["pass"], r["tile"], r["block_d"], r["warps"]) for r in rows]
    assert shapes == [("fwd", 3, 7, 1), ("fwd", 4, 16, 1), ("bwd", 3, 7, 1)], rows
    assert "error" in rows[0] and "error" in rows[2] and rows[1]["ms"] > 0, rows
    assert "# compiled 1/3: fwd (3, 7, 1): failed: " in proc.stdout, proc.stdout
    assert "sweep_scan: ignoring $OPENLM_MAMBA_SCAN_LAUNCH" in proc.stderr, proc.stderr
    assert "best launch: fwd=4x16x1 (set $OPENLM_MAMBA_SCAN_LAUNCH" in proc.stdout, proc.stdout
    assert "no bwd launch shape ran and matched torch" in proc.stdout, proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_sweep_says_when_no_launch_shape_ran(tmp_path):
    env = dict(os.environ, OPENLM_MAMBA_DISABLE_CPP="1", PYTHONPATH=str(ROOT))
    env.pop("OPENLM_MAMBA_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(BENCH / "sweep_scan.py"), "--quick", "--fwd", "3x7x1", "--bwd", "3x7x1", "--jobs", "0"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "best launch: none: no launch shape ran and matched torch" in proc.stdout, proc.stdout
    assert "best launch:  " not in proc.stdout and "to use it" not in proc.stdout, proc.stdout


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


# -- bench_convert: each case starts after os.sync() and ends once its output is on disk --------------------
def test_convert_syncs_before_every_case(load, monkeypatch, capsys, tmp_path):
    bc = load("bench_convert")
    events = []
    monkeypatch.setattr(bc.os, "sync", lambda: events.append("sync"))
    monkeypatch.setattr(bc, "make_checkpoint", lambda model, path: 1)
    monkeypatch.setattr(bc, "size_of", lambda path: 1)

    def run(kind, src, dst, to, extra=None):
        events.append("run")
        return {"base_kb": 1, "peak_kb": 1, "base_anon_kb": 0, "peak_anon_kb": 0, "s": 0.1, "fsync_s": 0.01}

    monkeypatch.setattr(bc, "run", run)
    assert bc.main(["--model", "mamba_tiny", "--dir", str(tmp_path / "work")]) == 0
    assert events == ["sync", "run"] * 8, events
    assert "# time s: the conversion + fsync of its output" in capsys.readouterr().out


def test_convert_child_times_the_fsync_of_every_output_file(load, monkeypatch, tmp_path):
    bc = load("bench_convert")
    child = bc.CHILD % {"durable": "def durable(path): ..."}
    start, convert, sync, stop = (
        child.index(s) for s in ("t = time.perf_counter()", "if kind ==", "durable(dst)", "end = time")
    )
    assert start < convert < sync < stop  # inside the timed region, after whichever converter ran
    out = tmp_path / "hf"
    (out / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "sub/x.bin"):
        (out / name).write_text("x")
    opened, synced = {}, []
    real_open = os.open

    def os_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        opened[fd] = os.path.abspath(path)
        return fd

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(opened[fd]))
    bc.durable(str(out))
    files = {str(out / n) for n in ("model.safetensors", "config.json", "sub/x.bin")}
    assert files <= set(synced) and {str(out), str(out / "sub"), str(tmp_path)} <= set(synced), synced
    synced.clear()
    bc.durable(str(out / "config.json"))  # a single-file output (a .pt checkpoint)
    assert synced == [str(out / "config.json"), str(out)], synced


# -- bench_generate: both sides warmed at every context; their tokens compared --------------------------------
GEN_ARGV = ["--device", "cpu", "--d-model", "16", "--n-layer", "1", "--new-tokens", "4", "--repeats", "1"]


def run_main(module, argv: list[str]):
    grad = torch.is_grad_enabled()
    try:
        return module.main(argv)
    finally:
        torch.set_grad_enabled(grad)


def test_generate_warms_both_sides_at_every_context(load, capsys, monkeypatch):
    bench = load("bench_generate")
    calls = []
    real_generate, real_hf_model = bench.generate, bench.hf_model

    def generate(model, ids, **kwargs):
        calls.append(("ours", ids.shape[1]))
        return real_generate(model, ids, **kwargs)

    def hf_model(model, *a):
        hf = real_hf_model(model, *a)
        real = hf.generate

        def hf_generate(ids, **kwargs):
            calls.append(("hf", ids.shape[1]))
            return real(ids, **kwargs)

        hf.generate = hf_generate
        return hf

    monkeypatch.setattr(bench, "generate", generate)
    monkeypatch.setattr(bench, "hf_model", hf_model)
    run_main(bench, [*GEN_ARGV, "--contexts", "8,16", "--vocab", "64"])
    out = capsys.readouterr().out
    warm = calls[:4]  # warm-up: ours then transformers, at each context; then the timed round
    assert warm == [("ours", 8), ("hf", 8), ("ours", 16), ("hf", 16)], calls
    assert calls[4:] == [("ours", 8), ("hf", 8), ("ours", 16), ("hf", 16)], calls
    assert "# context 8: greedy tokens match transformers'" in out and "# context 16: greedy tokens" in out, out


def test_generate_greedy_tokens_that_differ_end_the_run(load, capsys, monkeypatch):
    """A fast path that decodes other tokens must not win: the first greedy difference from transformers (not
    a near-tie) is an error."""
    bench = load("bench_generate")
    real = bench.generate

    def wrong(model, ids, **kwargs):
        out = real(model, ids, **kwargs)
        out[:, -1] = (out[:, -1] + 1) % 64
        return out

    monkeypatch.setattr(bench, "generate", wrong)
    with pytest.raises(SystemExit) as info:
        run_main(bench, [*GEN_ARGV, "--contexts", "8", "--vocab", "64"])
    message = str(info.value.code)
    assert message.startswith("bench_generate: error: at context 8, ours and transformers' greedy tokens differ"), (
        message
    )
    assert "row 0, new token 3" in message and "near-tie tolerance" in message, message
    assert "| context |" not in capsys.readouterr().out  # no table from a wrong run


def test_generate_greedy_check_allows_near_ties_and_padded_rows(load):
    from types import SimpleNamespace

    bench = load("bench_generate")
    logits = torch.zeros(1, 2, 8)  # transformers' logits after the 2-token prompt: the first new token's
    logits[0, -1, 2], logits[0, -1, 3] = 1.0, 1.0 - 1e-6  # a near-tie between tokens 2 and 3

    def hf(ids):
        return SimpleNamespace(logits=logits[:, : ids.shape[1]])

    prompt = torch.tensor([[5, 6]])
    ours, theirs = torch.cat([prompt, torch.tensor([[3]])], 1), torch.cat([prompt, torch.tensor([[2]])], 1)
    error, found = bench.check_greedy(ours, theirs, 2, hf, vocab=8, rtol=1e-4)
    assert error is None and "near-tie" in found, found
    logits[0, -1, 3] = 0.5  # a clear gap: an error
    error, found = bench.check_greedy(ours, theirs, 2, hf, vocab=8, rtol=0.6)  # within a loose tolerance
    assert error is None and "near-tie" in found, found
    error, _ = bench.check_greedy(ours, theirs, 2, hf, vocab=8, rtol=1e-4)
    assert error is not None and "row 0, new token 0: ours 3, transformers 2" in error, error
    error, found = bench.check_greedy(ours, theirs, 2, hf, vocab=2, rtol=1e-4)  # token 2 is a padded row
    assert error is None and "padded vocabulary row" in found, found
    error, found = bench.check_greedy(theirs, theirs, 2, hf, vocab=8, rtol=1e-4)
    assert (error, found) == (None, "greedy tokens match transformers'")


def test_generate_sampling_says_per_context_whether_tokens_match(load, capsys):
    bench = load("bench_generate")
    run_main(bench, [*GEN_ARGV, "--contexts", "8,16", "--vocab", "100", "--sample"])  # padded to 104 rows
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("# context ")]
    assert [line.split(":")[0] for line in lines] == ["# context 8", "# context 16"], out
    assert all("sampled tokens match transformers'" in s or "sampled tokens differ from" in s for s in lines), out
    assert "the vocabulary is padded, 104 rows for 100 tokens" in out and "not an error" in out, out


def hide_transformers(monkeypatch) -> None:
    import openlm_mamba.convert

    def to_transformers(model):
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(openlm_mamba.convert, "to_transformers", to_transformers)


def test_generate_says_when_transformers_is_unavailable(load, capsys, monkeypatch):
    bench = load("bench_generate")
    hide_transformers(monkeypatch)
    run_main(bench, [*GEN_ARGV, "--contexts", "8", "--vocab", "64"])
    out = capsys.readouterr().out
    assert "# transformers unavailable (No module named 'transformers'): its columns are skipped\n" in out, out
    assert "| 8 | " in out and "HF TTFT" not in out, out


# -- bench_prefill: ours and every kernel give the same number of samples; HF ratios are medians only -----------
def test_prefill_times_every_call_of_ours_and_of_each_kernel(load, capsys):
    bench = load("bench_prefill")
    counts = {"ours": 0, "a": 0, "b": 0, "hf": 0}

    def sample(name: str, value: float):
        def call() -> float:
            counts[name] += 1
            return value + counts[name] * 1e-3

        return call

    parts = {"a": sample("a", 1.0), "b": sample("b", 2.0)}
    samples = bench.measure(sample("ours", 5.0), parts, sample("hf", 9.0), rounds=3, calls=4, hf_rounds=2)
    assert {k: len(v) for k, v in samples.items()} == {"ours": 12, "a": 12, "b": 12, "hf": 2}, samples
    assert counts == {"ours": 12, "a": 12, "b": 12, "hf": 2}, counts  # no untimed extra calls inside the rounds
    med, fast = bench.summarize(samples, ["a", "b"])
    assert list(med) == ["ours", "a", "b", "floor", "hf"], med  # the table's row order
    assert med["floor"] == pytest.approx(med["a"] + med["b"]) and fast["floor"] == pytest.approx(1.001 + 2.001)
    assert bench.measure(sample("ours", 5.0), parts, None, 1, 2, 3)["hf"] == []


def test_prefill_says_when_transformers_is_unavailable(load, capsys, monkeypatch):
    bench = load("bench_prefill")
    if not bench.load_extension():
        pytest.skip("the C++ CPU kernels are unavailable")
    hide_transformers(monkeypatch)
    argv = ["--d-model", "16", "--n-layer", "1", "--vocab", "64", "--context", "16", "--rounds", "2", "--calls", "3"]
    run_main(bench, argv)
    out = capsys.readouterr().out
    assert "# transformers unavailable (No module named 'transformers'): its row and ratios are skipped\n" in out
    assert "| ours: TTFT |" in out and "| floor: sum of the bare kernels |" in out and "transformers TTFT" not in out
    assert "# samples: ours 6, each kernel 6 (2 rounds x 3 calls)" in out, out
    assert "HF /" not in out, out


def test_prefill_hf_ratios_are_medians_only(load, capsys, monkeypatch):
    bench = load("bench_prefill")
    if not bench.load_extension():
        pytest.skip("the C++ CPU kernels are unavailable")
    argv = ["--d-model", "16", "--n-layer", "1", "--vocab", "64", "--context", "16", "--rounds", "2", "--calls", "2"]
    run_main(bench, [*argv, "--hf-rounds", "1"])
    out = capsys.readouterr().out
    hf_lines = [line for line in out.splitlines() if line.startswith("HF /")]
    assert len(hf_lines) == 2 and all("median" in s and "fastest" not in s for s in hf_lines), out
    assert "; transformers 1 (its ratios: medians only)" in out, out


# -- bench_kernels: no gradient accumulates; a backend whose results differ from torch's is marked -----------
def test_kernels_mark_a_wrong_backend_and_accumulate_no_grads(load, capsys, monkeypatch, tmp_path):
    """A stand-in 'triton' (the torch backend with wrong input gradients: the same output) must be marked
    MISMATCH, a correct stand-in 'cuda' ok; timed runs leave no .grad behind."""
    import openlm_mamba.ops

    bk = load("bench_kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(openlm_mamba.ops, "available_backends", lambda op, device: ("torch", "triton", "cuda"))
    real_op_fn, real_inputs, inputs = bk.op_fn, bk.make_inputs, []

    def op_fn(op):
        real = real_op_fn(op)

        def fn(x, *rest, backend, **kwargs):
            out = real(x, *rest, backend="torch", **kwargs)
            return out + 0.5 * (x - x.detach()) if backend == "triton" else out

        return fn

    def make_inputs(*a):
        made = real_inputs(*a)
        inputs.append(made[0])
        return made

    monkeypatch.setattr(bk, "op_fn", op_fn)
    monkeypatch.setattr(bk, "make_inputs", make_inputs)
    rc = bk.main(["--quick", "--ops", "causal_conv1d", "--repeats", "2", "--json", str(tmp_path / "k.json")])
    out = capsys.readouterr().out
    assert rc == 1, out  # a mismatch fails the run
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("causal_conv1d ")}
    assert rows["torch"].endswith("  ref") and rows["cuda"].endswith("  ok"), out
    assert "  MISMATCH " in rows["triton"], out
    assert "check" in out.splitlines()[1] and "check = output and input gradients vs the torch backend's" in out
    results = strict_json(tmp_path / "k.json")["rows"]
    assert [r.get("check") for r in results] == [None, "MISMATCH", "ok"], results
    leaves = [t for tensors in inputs for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    assert leaves and all(t.grad is None for t in leaves)  # fwd+bwd runs take fresh grads, none accumulate


# -- bench_eval: a missing tokenizer dependency and a shared-context mismatch are one error line --------------
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_eval_without_transformers_is_one_error(load, capsys, monkeypatch):
    import openlm_mamba.evaluation  # noqa: F401  (imported before transformers is hidden)

    bench = load("bench_eval")
    monkeypatch.setitem(sys.modules, "transformers", None)
    rc = run_main(bench, ["--no-hf", "--questions", "1", "--d-model", "16", "--n-layer", "1", "--vocab", "300"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: bench_eval needs transformers") and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_eval_ours_that_differs_from_whole_is_an_error(load, capsys, monkeypatch):
    bench = load("bench_eval")
    real, n = bench.timed, []

    def timed(fn, reqs, repeats):
        t, lls = real(fn, reqs, repeats)
        n.append(1)
        return t, [ll + (0.5 if len(n) == 2 else 0.0) for ll in lls]  # ours-whole scores differently

    monkeypatch.setattr(bench, "timed", timed)
    argv = ["--no-hf", "--questions", "1", "--repeats", "1", "--workloads", "mmlu"]
    rc = run_main(bench, [*argv, "--d-model", "16", "--n-layer", "1", "--vocab", "300"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "error: mmlu: ours and ours-whole log-likelihoods differ by 5.0e-01" in err, err
