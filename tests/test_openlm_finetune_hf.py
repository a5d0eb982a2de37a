"""A converted HF directory fine-tunes through OpenLM's own trainer (``open_lm.main --pretrained``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .conftest import has_module

pytestmark = [
    pytest.mark.openlm,
    pytest.mark.skipif(not has_module("open_lm"), reason="open_lm is not importable (install OpenLM to run this test)"),
]


def _run_open_lm(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    # fmt: off
    args = [
        "--model", "mamba_tiny", "--dataset-type", "synthetic", "--train-num-samples", "1024",
        "--global-batch-size", "4", "--lr", "1e-4", "--warmup", "1", "--precision", "fp32", "--workers", "0",
        "--name", "ft", "--logs", str(tmp_path / "logs"), *extra,
    ]
    # fmt: on
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "openlm_mamba.train", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_converted_checkpoint_resumes_with_open_lm_main(tmp_path):
    from openlm_mamba import MambaLM
    from openlm_mamba.convert import convert

    torch.save(MambaLM("mamba_tiny").state_dict(), tmp_path / "src.pt")
    convert(tmp_path / "src.pt", tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    convert(tmp_path / "hf", tmp_path / "epoch_0.pt", to="openlm", model="mamba_tiny", progress=False)
    proc = _run_open_lm(tmp_path, "--resume", str(tmp_path / "epoch_0.pt"), "--epochs", "1")
    assert "resuming checkpoint" in proc.stdout + proc.stderr
    assert (tmp_path / "logs" / "ft" / "checkpoints" / "epoch_1.pt").is_file()


def test_hf_dir_converted_to_openlm_finetunes_with_open_lm_main(tmp_path):
    from openlm_mamba import MambaLM
    from openlm_mamba.convert import convert, load_state_dict

    torch.manual_seed(0)
    model = MambaLM("mamba_tiny")
    torch.save(model.state_dict(), tmp_path / "src.pt")
    convert(tmp_path / "src.pt", tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    convert(tmp_path / "hf", tmp_path / "pretrained.pt", to="openlm", model="mamba_tiny", progress=False)

    proc = _run_open_lm(tmp_path, "--pretrained", str(tmp_path / "pretrained.pt"), "--epochs", "1")
    saved = tmp_path / "logs" / "ft" / "checkpoints" / "epoch_1.pt"
    assert saved.is_file(), proc.stderr[-2000:]

    # OpenLM's own checkpoint converts back (architecture from the run's params.txt) ...
    convert(saved, tmp_path / "hf_ft", to="hf", progress=False)
    cfg, tuned = load_state_dict(tmp_path / "hf_ft")
    assert cfg.d_model == 64 and cfg.n_layer == 2
    # ... and holds the pretrained weights moved by a few small optimizer steps (a fresh init would be far off)
    start = model.state_dict()
    deltas = [(tuned[k].float() - start[k].float()).abs().max().item() for k in start]
    assert max(deltas) > 0, "no parameter changed: training did not run"
    assert max(deltas) < 5e-3, f"weights moved by {max(deltas)}: --pretrained weights were not loaded"
