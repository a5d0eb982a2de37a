"""``openlm-mamba info``: config listing, one config's sizes, and ``--env`` (what this machine runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from openlm_mamba.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("add_norm", "causal_conv1d", "selective_scan", "selective_state_update")


def test_list_and_one_config(capsys):
    assert cli_main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    assert "mamba_7b" in out and "n_layer=64" in out
    assert cli_main(["info", "mamba_7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["d_model"], info["n_layer"], info["dt_rank"], info["padded_vocab_size"]) == (4096, 64, 256, 50432)


def test_list_json_and_readable_sizes(capsys):
    assert cli_main(["info", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["mamba_7b"]["n_layer"] == 64 and rows["mamba_tiny"]["parameters"] == 98240
    assert cli_main(["info"]) == 0  # no model: the list, with sizes at a readable scale
    out = capsys.readouterr().out
    assert "params=98.2K" in out and "params=6.947B" in out and "params=129.3M" in out, out


def test_unknown_config_is_an_error(capsys):
    assert cli_main(["info", "mamba_9z"]) == 2
    assert "mamba_9z" in capsys.readouterr().err


def test_checkpoints(capsys, tmp_path, monkeypatch):
    """A checkpoint (OpenLM .pt, HF directory): its config, tensor count, dtypes and size. A shipped config's
    name still means the config beside a directory of that name (./NAME for the directory); a binary file given
    as a JSON config is named as such."""
    import torch

    from openlm_mamba import MambaLM
    from openlm_mamba.convert import convert

    torch.manual_seed(0)
    model = MambaLM("mamba_tiny")
    pt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, pt)
    monkeypatch.chdir(tmp_path)
    convert(pt, tmp_path / "mamba_tiny", to="hf", model="mamba_tiny", dtype="bfloat16", progress=False)
    for arg, fmt, dtype in ((str(pt), "openlm", "float32 (22)"), ("./mamba_tiny", "hf", "bfloat16 (22)")):
        assert cli_main(["info", arg, "--json"]) == 0, capsys.readouterr().err
        info = json.loads(capsys.readouterr().out)
        assert (info["checkpoint_format"], info["checkpoint_dtypes"], info["d_model"]) == (fmt, dtype, 64), info
        assert info["checkpoint_tensors"] == 22 and info["parameters"] == 98240
        assert info["checkpoint_tensor_bytes"] == 98240 * (4 if fmt == "openlm" else 2)
    assert cli_main(["info", "mamba_tiny", "--json"]) == 0  # the shipped config, not the directory
    assert "checkpoint_format" not in json.loads(capsys.readouterr().out)
    assert cli_main(["info", "mamba_tiny.json"]) == 2  # no such file: a clear error, as before
    assert "mamba_tiny.json" in capsys.readouterr().err
    assert cli_main(["convert", "--to", "hf", str(pt), "out", "--model", str(pt), "--no-progress"]) == 2
    assert "not a JSON model config (binary data: a checkpoint?" in capsys.readouterr().err
    assert cli_main(["info", str(tmp_path / "empty_dir_missing")]) == 2
    capsys.readouterr()


def test_checkpoint_fields_not_recorded_are_marked(capsys, tmp_path):
    """Fields a checkpoint does not record (defaults, or inferred from its tensors) are marked as such, not shown
    as if read from it: a bare state dict of a seq_len-128 model shows seq_len 2,048 *as a default*."""
    import torch

    from openlm_mamba import MambaLM
    from openlm_mamba.convert import convert

    torch.manual_seed(0)
    model = MambaLM({"d_model": 64, "n_layer": 2, "vocab_size": 512, "seq_len": 128})
    bare = tmp_path / "bare" / "epoch_1.pt"
    bare.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, bare)

    assert cli_main(["info", str(bare)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for field in ("seq_len", "norm_epsilon", "residual_in_fp32", "dt_min"):
        assert lines[field].endswith("(default: not recorded in the checkpoint)"), lines[field]
    assert "seq_len                   2,048   (default" in lines["seq_len"]
    assert "(inferred from the embedding's rows: not recorded in the checkpoint)" in lines["vocab_size"]
    for field in ("d_model", "n_layer", "d_state", "tie_embeddings", "parameters", "checkpoint_format"):
        assert "not recorded" not in lines[field], lines[field]
    assert cli_main(["info", str(bare), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["not_recorded"]
    assert {"seq_len", "norm_epsilon", "vocab_size"} <= set(notes) and not {"d_model", "d_state"} & set(notes)

    # a run whose params.txt names a config: its values, said to come from there
    (tmp_path / "params.txt").write_text("model: mamba_tiny\n")
    assert cli_main(["info", str(bare), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["not_recorded"]
    assert (
        notes["seq_len"]
        == f"from mamba_tiny: not recorded in the checkpoint; {tmp_path / 'params.txt'} names mamba_tiny"
    )

    # our converter records the whole config in the .pt: nothing marked; an HF config has no seq_len
    exact = tmp_path / "exact.pt"
    convert(bare, exact, to="openlm", seq_len=128, progress=False)
    convert(exact, tmp_path / "hf", to="hf", progress=False)
    assert cli_main(["info", str(exact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["seq_len"], info["not_recorded"]) == (128, {})
    assert cli_main(["info", str(exact)]) == 0
    assert "not recorded" not in capsys.readouterr().out
    assert cli_main(["info", str(tmp_path / "hf"), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["not_recorded"]
    assert notes["seq_len"] == "default: not recorded in the checkpoint; HF configs have none"
    assert "norm_epsilon" not in notes and "d_model" not in notes
    assert notes["rescale_prenorm_residual"].endswith(
        "HF configs hold False for this init-only flag, whatever was trained"
    )
    # an HF vocab_size (the embedding's rows) that 8 does not divide: the multiple shown is 1, and says why
    hf_cfg = tmp_path / "hf" / "config.json"
    data = json.loads(hf_cfg.read_text())
    assert "pad_vocab_size_multiple" not in notes and data["vocab_size"] % 8 == 0
    for recorded in (8, None):
        data["vocab_size"] += 1  # more rows than the embedding has: info reads the config, shapes check later
        data.pop("pad_vocab_size_multiple", None)
        if recorded:
            data["pad_vocab_size_multiple"] = recorded
        hf_cfg.write_text(json.dumps(data))
        from openlm_mamba.commands.info import _dir_unrecorded

        note = _dir_unrecorded("hf", hf_cfg)["pad_vocab_size_multiple"]
        had = "config.json has 8" if recorded else "the default is 8"
        assert note == f"1: {had}, which does not divide vocab_size {data['vocab_size']} (the embedding's rows)"
    assert cli_main(["info", "mamba_tiny", "--json"]) == 0  # a config, not a checkpoint: nothing to mark
    assert "not_recorded" not in json.loads(capsys.readouterr().out)


def test_conflicting_info_requests_are_an_error(capsys):
    """A model name with --list or --env would be silently ignored: refused instead."""
    for argv in (["info", "mamba_tiny", "--list"], ["info", "mamba_tiny", "--env"], ["info", "--list", "--env"]):
        assert cli_main(argv) == 2, argv
        assert "give one of MODEL, --list and --env" in capsys.readouterr().err


def test_env_reports_versions_kernels_and_backends(capsys):
    import torch

    from openlm_mamba.ops.cpp import load_extension

    assert cli_main(["info", "--env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] == torch.__version__
    assert set(env["packages"]) >= {"open_lm", "triton", "mamba_ssm", "causal_conv1d"}
    if load_extension():
        assert env["cpp_kernels"] == "built" and env["cpu_decode_step"].startswith("fused")
    else:
        assert env["cpp_kernels"].startswith("unavailable: ")
    assert set(env["ops"]) == set(OPS)
    for op in OPS:
        assert env["ops"][op]["cpu"]["picked"] == "torch"  # auto on CPU
        assert "torch" in env["ops"][op]["cpu"]["available"]
    assert cli_main(["info", "--env"]) == 0
    text = capsys.readouterr().out
    assert "C++ CPU kernels:" in text and all(op in text for op in OPS)


def run_env(**variables) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, **variables)
    env.pop("TRITON_INTERPRET", None)
    code = "from openlm_mamba.cli import main; raise SystemExit(main(['info', '--env']))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_env_says_why_a_requested_backend_cannot_run():
    """In a fresh process: kernels disabled and the Triton backend forced on CPU without the interpreter."""
    proc = run_env(OPENLM_MAMBA_DISABLE_CPP="1", OPENLM_MAMBA_BACKEND="triton")
    assert "C++ CPU kernels: unavailable: RuntimeError: disabled by $OPENLM_MAMBA_DISABLE_CPP" in proc.stdout
    assert "CPU decoding: per-layer Python step" in proc.stdout
    assert "backend requested: triton" in proc.stdout
    assert "selective_scan           cpu: none (" in proc.stdout and "can run: torch" in proc.stdout


def test_env_reports_unavailable_kernels_without_a_raw_warning():
    """The kernels' "unavailable" RuntimeWarning is not printed above the report that says the same."""
    proc = run_env(OPENLM_MAMBA_DISABLE_CPP="1")
    assert "C++ CPU kernels: unavailable: RuntimeError: disabled by $OPENLM_MAMBA_DISABLE_CPP" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr and "kernels unavailable" not in proc.stderr, proc.stderr


def test_env_reports_a_bad_backend_variable():
    proc = run_env(OPENLM_MAMBA_BACKEND="fastest")
    assert (
        "backend requested: invalid ($OPENLM_MAMBA_BACKEND must be one of auto, torch, triton, cuda; got 'fastest')"
        in (proc.stdout)
    )


def test_sigterm_ends_a_command_like_ctrl_c():
    """SIGTERM (kill, timeout, Slurm) raises in the command, so its cleanups run; exit code 143, one line."""
    code = (
        "import os, signal, sys, time\n"
        "import openlm_mamba.commands.info as info\n"
        "from openlm_mamba import cli\n"
        "def run(args):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "    finally:\n"
        "        print('cleanup ran', flush=True)\n"
        "info.run = run\n"
        "sys.exit(cli.main(['info']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout == "cleanup ran\n" and proc.stderr.strip() == "terminated", (proc.stdout, proc.stderr)


def test_cli_starts_without_importing_torch():
    """The package and the CLI's parser import no torch (about 1.5 s): `--help` is instant, and Ctrl-C while a
    command starts reaches its handler (one `interrupted` line) instead of interrupting an import at top level."""
    code = (
        "import sys\n"
        "import openlm_mamba\n"
        "from openlm_mamba import cli\n"
        "cli.build_parser()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'openlm')))\n"
        "from openlm_mamba import MambaLM, generate\n"  # the lazy names still resolve
        "assert 'torch' in sys.modules and callable(generate) and MambaLM.__module__ == 'openlm_mamba.model'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_ctrl_c_while_the_commands_load_is_an_interrupt(monkeypatch, capsys):
    """Ctrl-C during start-up (building the parser imports every command module): exit 130 with one line, as
    during a command, not a KeyboardInterrupt traceback."""
    from openlm_mamba import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_save_config_writes_a_config_model_accepts(capsys, tmp_path):
    """info CHECKPOINT --save-config PATH: the checkpoint's config as a JSON that --model takes (the --json output
    also carries derived fields, which a config file refuses)."""
    import torch

    from openlm_mamba import MambaConfig, MambaLM

    cfg = MambaConfig.load("mamba_tiny")
    model = MambaLM(MambaConfig(**{**cfg.__dict__, "norm_epsilon": 0.1, "name": "eps"}))
    from openlm_mamba.convert import convert

    torch.save({"epoch": 1, "state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    pt = convert(tmp_path / "epoch_1.pt", tmp_path / "eps.pt", to="openlm", model=model.cfg, progress=False)
    out = tmp_path / "cfg.json"
    assert cli_main(["info", str(pt), "--save-config", str(out)]) == 0
    saved = MambaConfig.load(out)
    assert saved.norm_epsilon == 0.1 and (saved.d_model, saved.n_layer) == (cfg.d_model, cfg.n_layer)
    capsys.readouterr()
    assert cli_main(["info", "--list", "--save-config", str(out)]) == 2
    assert "--save-config needs MODEL" in capsys.readouterr().err
    before = out.read_text()
    assert cli_main(["info", "mamba_7b", "--save-config", str(out)]) == 2  # never over an existing file
    nested = tmp_path / "new" / "dirs" / "cfg.json"  # missing parent directories are made
    assert cli_main(["info", "mamba_tiny", "--save-config", str(nested)]) == 0
    assert json.loads(nested.read_text())["d_model"] == 64
    assert "already exists" in capsys.readouterr().err and out.read_text() == before
