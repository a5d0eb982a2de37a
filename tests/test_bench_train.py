"""benchmarks/bench_train_gpu.py --quick (tiny model on CPU): every contender runs, same weights, same loss."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path


def test_bench_train_quick_runs(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_train_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    contenders = ["openlm_mamba", "openlm_mamba+ckpt", "openlm_mamba+seq"] + (
        ["mambapy"] if importlib.util.find_spec("mambapy") else []
    )
    rc = bench.main(["--quick", "--contenders", ",".join(contenders)])
    out = capsys.readouterr().out
    assert rc == 0, out
    losses = {
        m.group(1): float(m.group(2)) for m in re.finditer(r"^  (\S+): [\d.]+ ms/step, loss ([\d.]+)$", out, re.M)
    }
    assert set(losses) == set(contenders), out
    assert max(losses.values()) - min(losses.values()) < 1e-3, losses  # same weights, same data
    for name in contenders:
        assert re.search(rf"^\| {re.escape(name)} \| [\d.]+ \| [\d,]+ \|", out, re.M), out


def test_seq_contender_sets_the_launch_only_while_it_runs(monkeypatch):
    """openlm_mamba+seq selects the seq scan kernels for its own steps and restores the caller's setting."""
    import os

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_train_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []
    real_build = bench._build

    def build(name, cfg):
        model, fwd = real_build(name, cfg)
        return model, lambda ids: (seen.append(os.environ.get(bench.LAUNCH_ENV)), fwd(ids))[1]

    monkeypatch.setattr(bench, "_build", build)
    monkeypatch.setenv(bench.LAUNCH_ENV, "fwd=8x16x4")
    assert bench.main(["--quick", "--contenders", "openlm_mamba,openlm_mamba+seq"]) == 0
    assert set(seen) == {"fwd=8x16x4", bench.SEQ_LAUNCH}, seen
    assert os.environ[bench.LAUNCH_ENV] == "fwd=8x16x4"
