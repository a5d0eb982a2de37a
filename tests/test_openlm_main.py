"""Drive the real, unmodified ``open_lm.main`` in subprocesses (``python -m open_lm.main``, ``torchrun``).

Nothing imports ``openlm_mamba`` in those processes before OpenLM does: the Mamba model is built
only because the installed ``.pth`` hook activates the plugin (auto-activation). The fallback
``python -m openlm_mamba.train`` is driven with the hook switched off.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.openlm,
    pytest.mark.skipif(importlib.util.find_spec("open_lm") is None, reason="open_lm is not importable"),
]

ROOT = Path(__file__).resolve().parent.parent
N_LAYER = 2
TINY = {
    "model_type": "mamba",
    "d_model": 32,
    "n_layer": N_LAYER,
    "vocab_size": 320,
    "seq_len": 32,
    "d_state": 8,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "norm_epsilon": 1e-5,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
SEQ = TINY["seq_len"]
LOSS_RE = re.compile(r"Train Epoch: (\d+) \[.*?\] Loss: ([0-9.]+)")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OPENLM_MAMBA_AUTOLOAD", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONFAULTHANDLER", "1")  # SIGABRT on a timeout prints every thread's stack
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children before their own children."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [p for p, pp in parent.items() if pp == cur]
        out += kids
        todo += kids
    return out


def run(cmd: list[str], cwd: Path, timeout: int = 240, **env: str) -> str:
    """Run ``cmd`` in its own process group; fail with the output tail on error or timeout."""
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # where it hangs: SIGABRT makes each Python process print its threads' stacks (faulthandler)
        pids = [proc.pid, *_descendants(proc.pid)]  # torchrun's workers run in their own sessions
        for sig, pause in ((signal.SIGABRT, 3), (signal.SIGKILL, 0)):
            for pid in reversed(pids):  # workers before torchrun
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(pause)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = "(no output: a process still holds the pipe)"
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-12000:]}")
    if proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}: {' '.join(map(str, cmd))}\n{out[-6000:]}")
    return out


def open_lm_main(*args) -> list[str]:
    return [sys.executable, "-m", "open_lm.main", *map(str, args)]


def torchrun(*args) -> list[str]:
    # No --logs here: torchrun's own parser would take it for its --logs-specs; OpenLM's default is ./logs.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "open_lm.main",
        *map(str, args),
    ]


def losses(log_dir: Path) -> list[float]:
    return [float(m.group(2)) for m in LOSS_RE.finditer((log_dir / "out.log").read_text())]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    sd = ckpt.get("state_dict", ckpt.get("av_model_sd", ckpt))  # training or averager checkpoint
    return {k.replace("module.", "").replace("_orig_mod.", ""): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("openlm_main")
    (d / "mamba_test_tiny.json").write_text(json.dumps(TINY))
    return d


@pytest.fixture(scope="module")
def tiny_data(workdir) -> dict:
    spec = importlib.util.spec_from_file_location("make_tiny_data", ROOT / "examples" / "make_tiny_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_tiny_dataset(
        workdir / "data", vocab_size=TINY["vocab_size"], seq_len=SEQ, train_shards=2, max_chars=30_000
    )


def _common(workdir: Path, name: str) -> list:
    return [
        "--model", workdir / "mamba_test_tiny.json",
        "--logs", workdir / "logs",
        "--name", name,
        "--dataset-type", "synthetic",
        "--train-num-samples", 4 * SEQ,  # tokens: 4 sequences = one step per epoch
        "--global-batch-size", 4,
        "--precision", "fp32",
        "--lr", 1e-2,
        "--lr-scheduler", "const",
        "--warmup", 1,
        "--workers", 0,
        "--seed", 3,
        "--log-every-n-steps", 1,
        "--z-loss-coefficient", 1e-4,
        "--grad-clip-norm", 1.0,
        "--accum-freq", 2,
        "--averagers", "poly_08_1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def resumed_runs(workdir) -> dict[str, Path]:
    """4 steps in one run; 2 steps (explicit fallback entry point) + `--resume latest` for 2 more."""
    run(open_lm_main(*_common(workdir, "full"), "--epochs", 4), workdir)
    half = ["-m", "openlm_mamba.train", *map(str, _common(workdir, "half"))]
    run([sys.executable, *half, "--epochs", 2], workdir, OPENLM_MAMBA_AUTOLOAD="0")
    run(open_lm_main(*_common(workdir, "half"), "--epochs", 4, "--resume", "latest"), workdir)
    return {"full": workdir / "logs" / "full", "half": workdir / "logs" / "half"}


def test_trains_with_falling_loss_and_saves_checkpoints(resumed_runs):
    full = resumed_runs["full"]
    assert "MambaLM(" in (full / "out.log").read_text(), "open_lm did not build our MambaLM (auto-activation)"
    got = losses(full)
    assert len(got) == 4, got
    assert got[-1] < got[0] - 0.05, f"loss did not fall: {got}"
    for prefix in ("epoch", "optimizer", "stats", "poly_08_1"):
        assert (full / "checkpoints" / f"{prefix}_4.pt").is_file(), prefix
    sd = state_dict(full / "checkpoints" / "epoch_4.pt")
    assert torch.equal(sd["model.lm_head.weight"], sd["model.backbone.embedding.weight"])


def test_params_txt_records_the_full_model_config(resumed_runs):
    """OpenLM's params.txt keeps only the --model JSON's file name; our hook adds the whole config, from which
    the converter rebuilds the model (no --model needed)."""
    from openlm_mamba import MambaConfig
    from openlm_mamba.convert import read_checkpoint

    full = resumed_runs["full"]
    text = (full / "params.txt").read_text()
    assert re.search(r"^model: mamba_test_tiny$", text, re.MULTILINE), text
    recorded = re.search(r"^mamba_config: (.+)$", text, re.MULTILINE)
    assert recorded, text
    want = MambaConfig.from_dict(TINY, source="mamba_test_tiny.json")
    assert MambaConfig.from_dict(json.loads(recorded.group(1))) == want
    with read_checkpoint(full / "checkpoints" / "epoch_4.pt") as ckpt:
        assert ckpt.config == want


def test_resume_matches_uninterrupted_run(resumed_runs):
    full, half = resumed_runs["full"], resumed_runs["half"]
    assert "resuming checkpoint" in (half / "out.log").read_text()
    assert losses(full)[2:] == pytest.approx(losses(half)[-2:], abs=2e-3)
    for name in ("epoch_4.pt", "poly_08_1_4.pt"):
        a, b = state_dict(full / "checkpoints" / name), state_dict(half / "checkpoints" / name)
        assert a.keys() == b.keys()
        tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
        assert "model.backbone.layers.1.mixer.A_log" in tensors
        for k in tensors:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_pretrained_upstream_layout_webdataset_val_gradckpt_bf16(workdir, tiny_data, resumed_runs):
    """A bare upstream-OpenLM Mamba checkpoint with `module.` keys loads with --pretrained (lr 0 keeps it)."""
    src = state_dict(resumed_runs["full"] / "checkpoints" / "epoch_4.pt")
    assert all(k.startswith("model.") for k in src)
    bare = workdir / "upstream_layout.pt"
    torch.save({f"module.{k}": v for k, v in src.items()}, bare)
    run(
        open_lm_main(
            "--model", workdir / "mamba_test_tiny.json", "--logs", workdir / "logs", "--name", "pretrained",
            "--train-data", tiny_data["train_data"], "--data-key", "json.gz",
            "--train-num-samples", 8 * SEQ, "--global-batch-size", 4, "--workers", 1,
            "--val-data", tiny_data["val_data"], "--val-data-key", "json.gz",
            "--val-num-samples", 4 * SEQ, "--global-val-batch-size", 4,
            "--pretrained", bare, "--grad-checkpointing", "--precision", "amp_bfloat16",
            "--lr", 0.0, "--lr-scheduler", "const", "--warmup", 1, "--epochs", 1,
        ),
        workdir,
    )  # fmt: skip
    out = workdir / "logs" / "pretrained"
    assert "loaded checkpoint" in (out / "out.log").read_text()
    assert len(losses(out)) >= 1
    after = state_dict(out / "checkpoints" / "epoch_1.pt")
    for k, v in src.items():
        assert torch.equal(after[k], v), f"{k}: --pretrained weights were not loaded"
    results = [json.loads(line) for line in (out / "checkpoints" / "results.jsonl").read_text().splitlines()]
    val_loss = results[-1][0]["loss"] if isinstance(results[-1], list) else results[-1]["loss"]
    assert 0 < val_loss < 20


def test_pretrained_of_another_size_is_one_clear_error(workdir, resumed_runs):
    """--pretrained with a checkpoint of another size: our message (what the checkpoint holds, what the model
    is), not torch's list of every mismatched tensor."""
    ckpt = resumed_runs["full"] / "checkpoints" / "epoch_4.pt"
    cmd = open_lm_main(
        "--model", "mamba_tiny", "--pretrained", ckpt, "--logs", workdir / "logs", "--name", "mismatch",
        "--dataset-type", "synthetic", "--train-num-samples", 4 * SEQ, "--global-batch-size", 4,
        "--precision", "fp32", "--epochs", 1, "--workers", 0,
    )  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "the checkpoint does not fit model 'mamba_tiny' (d_model 64, 2 layers" in out, out[-2000:]
    assert f"it holds d_model 32, {N_LAYER} layers, vocabulary 320" in out, out[-2000:]
    assert "size mismatch for" not in out  # torch's own message never comes


def test_dataset_manifest_with_torchcompile(workdir, tiny_data):
    run(
        open_lm_main(
            "--model", workdir / "mamba_test_tiny.json", "--logs", workdir / "logs", "--name", "manifest",
            "--dataset-manifest", tiny_data["train_manifest"], "--data-key", "json.gz",
            "--train-num-samples", 8 * SEQ, "--global-batch-size", 4, "--workers", 1, "--epochs", 1,
            "--precision", "fp32", "--lr", 1e-3, "--warmup", 1, "--torchcompile",
        ),
        workdir,
        timeout=400,
    )  # fmt: skip
    out = workdir / "logs" / "manifest"
    assert "Compiling model" in (out / "out.log").read_text()
    assert len(losses(out)) >= 1
    stats = torch.load(out / "checkpoints" / "stats_1.pt", weights_only=False)
    assert stats["samples_seen"] == 8 and stats["next_shard_per_source"][0] >= 1  # manifest position saved
    assert any("_orig_mod." in k for k in torch.load(out / "checkpoints" / "epoch_1.pt")["state_dict"])


def _distributed_args(workdir: Path, name: str) -> list:
    return [
        "--model", workdir / "mamba_test_tiny.json", "--name", name, "--dataset-type", "synthetic",
        "--train-num-samples", 8 * SEQ, "--global-batch-size", 4, "--epochs", 1, "--workers", 0,
        "--dist-backend", "gloo", "--log-every-n-steps", 1, "--lr", 1e-2, "--warmup", 1,
    ]  # fmt: skip


def test_torchrun_ddp_cpu_gloo_pretrained_from_a_bare_file(workdir):
    """DDP, with --pretrained a bare state dict saved from an unwrapped, compiled model (`_orig_mod.` keys, no
    `module.`): OpenLM loads it into the DDP wrapper, which failed with every key missing and unexpected."""
    from openlm_mamba import MambaConfig
    from openlm_mamba.openlm import build_model

    torch.manual_seed(3)
    src = build_model(MambaConfig.load(workdir / "mamba_test_tiny.json")).state_dict()
    bare = workdir / "compiled_bare.pt"
    torch.save({f"_orig_mod.{k}": v for k, v in src.items()}, bare)
    args = [a if a != 1e-2 else 0.0 for a in _distributed_args(workdir, "ddp")]  # lr 0: the loaded weights stay
    run(torchrun(*args, "--precision", "fp32", "--pretrained", bare, "--lr-scheduler", "const"), workdir)
    out = workdir / "logs" / "ddp"
    text = (out / "out.log").read_text()
    assert "world_size: 2" in text and "DistributedDataParallel(" in text and "MambaLM(" in text
    assert len(losses(out)) == 2
    sd = state_dict(out / "checkpoints" / "epoch_1.pt")
    assert "model.backbone.layers.0.mixer.A_log" in sd
    for k, v in src.items():
        assert torch.equal(sd[k], v), f"{k}: --pretrained weights were not loaded"


def _count_fsdp_units(model_repr: str) -> int:
    # nn.Module's repr folds identical children: "(0-1): 2 x FullyShardedDataParallel(".
    return sum(int(m.group(1) or 1) for m in re.finditer(r"(?:(\d+) x )?FullyShardedDataParallel\(", model_repr))


def test_torchrun_fsdp_per_layer_units_meta_device_amp(workdir):
    out_text = run(
        torchrun(
            *_distributed_args(workdir, "fsdp"),
            "--precision", "amp_bfloat16", "--fsdp", "--fsdp-amp", "--experimental-meta-device",
        ),
        workdir,
    )  # fmt: skip
    out = workdir / "logs" / "fsdp"
    text = (out / "out.log").read_text()
    model_repr = text[text.index("Model (has") : text.index("Params:")]
    assert _count_fsdp_units(model_repr) == N_LAYER + 1, model_repr
    assert model_repr.count("(_fsdp_wrapped_module): OpenLMMambaBlock(") == 1  # folded: one line for both layers
    from openlm_mamba import MambaConfig

    n_params = MambaConfig.from_dict(TINY).num_parameters()  # tied LM head counted once
    before = re.search(r"Before FSDP parameter num: ([\d,]+)", out_text)
    assert before and int(before.group(1).replace(",", "")) == n_params, out_text[-3000:]
    after = [int(x.replace(",", "")) for x in re.findall(r"After FSDP parameter num: ([\d,]+)", out_text)]
    assert len(after) == 2 and sum(after) <= n_params + 2 * 64, after  # shards of the deduplicated (tied) params
    assert len(losses(out)) == 2
    sd = state_dict(out / "checkpoints" / "epoch_1.pt")  # full state dict saved through FSDP on CPU
    assert torch.equal(sd["model.lm_head.weight"], sd["model.backbone.embedding.weight"])
    assert sd["model.backbone.embedding.weight"].abs().sum() > 0


def test_torchrun_fsdp_fp32_evaluates_val_data(workdir, tiny_data):
    """OpenLM's evaluation is a no-grad forward: under FSDP in fp32 it must go through the FSDP-wrapped layers
    (which gather their shards), not the fused CPU prefill that reads the weights directly."""
    args = _distributed_args(workdir, "fsdp_val")
    i = args.index("--dataset-type")  # OpenLM's synthetic data cannot be combined with --val-data
    args[i : i + 2] = ["--train-data", tiny_data["train_data"], "--data-key", "json.gz"]
    run(
        torchrun(
            *args, "--precision", "fp32", "--fsdp",
            "--val-data", tiny_data["val_data"], "--val-data-key", "json.gz",
            "--val-num-samples", 8 * SEQ, "--global-val-batch-size", 4,
        ),
        workdir,
    )  # fmt: skip
    out = workdir / "logs" / "fsdp_val"
    results = [json.loads(line) for line in (out / "checkpoints" / "results.jsonl").read_text().splitlines()]
    val_loss = results[-1][0]["loss"] if isinstance(results[-1], list) else results[-1]["loss"]
    assert 0 < val_loss < 20, results
    assert (out / "checkpoints" / "epoch_1.pt").is_file()


def test_torchrun_fsdp_pure_bf16(workdir):
    run(
        torchrun(*_distributed_args(workdir, "fsdp_bf16"), "--precision", "amp_bfloat16", "--fsdp", "--fsdp-pure-bf16"),
        workdir,
    )
    out = workdir / "logs" / "fsdp_bf16"
    found = losses(out)
    assert len(found) == 2 and all(math.isfinite(x) for x in found), found
    sd = state_dict(out / "checkpoints" / "epoch_1.pt")
    assert torch.isfinite(sd["model.backbone.layers.1.mixer.out_proj.weight"]).all()


@pytest.mark.slow
def test_tiny_cpu_recipe_as_in_readme(tmp_path):
    """The README's main job, verbatim, in a copy of examples/: loss falls well below its start (~2 min)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("tiny_data", "__pycache__"))
    run([sys.executable, "examples/make_tiny_data.py"], tmp_path)
    run(open_lm_main("--config", "examples/tiny_cpu.yaml"), tmp_path, timeout=900)
    (log_dir,) = (tmp_path / "logs").iterdir()
    got = losses(log_dir)
    assert got[0] > 6.0 and got[-1] < got[0] - 1.5, got
    assert (log_dir / "checkpoints" / "epoch_1.pt").is_file()
    results = [json.loads(line) for line in (log_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert results[-1][0]["loss"] < 4.5, results[-1]
