"""Checkpoint conversion: OpenLM <-> HF transformers <-> mamba_ssm round trips, configs, clear errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from openlm_mamba import MambaConfig, MambaLM
from openlm_mamba.cli import main as cli_main
from openlm_mamba.convert import ConversionError, convert, detect_format, hf_config, load_model, read_checkpoint

from .conftest import has_module

# Published config.json of TRI-ML/mamba-7b-rw (architecture fields, as the issue lists them).
PUBLISHED_7B = {
    "architectures": ["MambaForCausalLM"],
    "model_type": "mamba",
    "hidden_size": 4096,
    "intermediate_size": 8192,
    "num_hidden_layers": 64,
    "state_size": 16,
    "conv_kernel": 4,
    "expand": 2,
    "time_step_rank": 256,
    "vocab_size": 50432,
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "use_bias": False,
    "use_conv_bias": True,
    "layer_norm_epsilon": 1e-5,
    "pad_vocab_size_multiple": 8,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MambaLM("mamba_tiny").eval()
    with torch.no_grad():  # non-default values everywhere, so a dropped or swapped tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _openlm_ckpt(model: MambaLM, path: Path, prefix: str = "module.") -> Path:
    """An OpenLM-style epoch checkpoint, as open_lm.main writes it (DDP prefix, epoch/step keys)."""
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 2, "step": 10, "name": "run", "state_dict": sd, "evaluation_metrics": []}, path)
    return path


def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_openlm_hf_openlm_round_trip_is_bit_exact_and_hf_logits_match(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "epoch_2.pt", prefix="module._orig_mod.")
    convert(src, tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors"]
    convert(tmp_path / "hf", tmp_path / "back.pt", to="openlm", model="mamba_tiny", progress=False)
    ckpt = torch.load(tmp_path / "back.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 0
    assert MambaConfig.from_dict(ckpt["model_config"]) == MambaConfig.load("mamba_tiny")
    _assert_same_state(ckpt["state_dict"], tiny.state_dict())
    sd = ckpt["state_dict"]
    assert sd["model.lm_head.weight"].data_ptr() == sd["model.backbone.embedding.weight"].data_ptr()  # still tied

    if not has_module("transformers"):
        pytest.skip("transformers is not installed: HF logits comparison skipped")
    from transformers import MambaForCausalLM

    hf = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tiny(x)[0]
        theirs = hf(x).logits.float()
    assert (ours - theirs).abs().max().item() < 1e-4


def test_openlm_mamba_ssm_openlm_round_trip_is_bit_exact(tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "bare.pt")  # a bare state dict, no wrapper
    convert(tmp_path / "bare.pt", tmp_path / "ssm", to="mamba_ssm", model="mamba_tiny", progress=False)
    cfg = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert cfg["d_model"] == 64 and cfg["n_layer"] == 2 and cfg["vocab_size"] == 512
    assert cfg["ssm_cfg"]["d_state"] == 16 and cfg["ssm_cfg"]["dt_rank"] == 4 and cfg["tie_embeddings"] is True
    sd = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in sd and "lm_head.weight" in sd  # mamba_ssm's own key names
    assert detect_format(tmp_path / "ssm") == "mamba_ssm"
    convert(tmp_path / "ssm", tmp_path / "back.pt", to="openlm", progress=False)
    _assert_same_state(torch.load(tmp_path / "back.pt", weights_only=True)["state_dict"], tiny.state_dict())


def test_sharded_hf_output_and_bf16_cast(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "epoch_1.pt")
    convert(src, tmp_path / "hf", to="hf", model="mamba_tiny", shard_size="100KB", dtype="bfloat16", progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "hf" / s).is_file() for s in shards)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with read_checkpoint(tmp_path / "hf") as ckpt:
        emb = ckpt.source.get("backbone.embedding.weight")
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, tiny.model.backbone.embedding.weight.detach().bfloat16())


def test_hf_pytorch_bin_shards_source(tiny, tmp_path):
    """HF dirs saved as pytorch_model-*.bin shards with an index (older transformers) are read too."""
    out = tmp_path / "hfbin"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config(tiny.cfg)))
    sd = {
        k.removeprefix("model.").replace("backbone.embedding.", "backbone.embeddings."): v
        for k, v in tiny.state_dict().items()
    }
    keys = sorted(sd)
    halves = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    for name, ks in halves.items():
        torch.save({k: sd[k].clone() for k in ks}, out / name)
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_model(out, model="mamba_tiny")
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x)[0], tiny(x)[0])


def test_fsdp_keys_and_inferred_config(tiny, tmp_path):
    """A bare FSDP-wrapped full state dict with no config: architecture inferred from shapes."""
    sd = {}
    for k, v in tiny.state_dict().items():
        parts = k.split(".")
        if parts[2] == "layers":
            parts.insert(4, "_fsdp_wrapped_module")
        sd[".".join(parts)] = v
    torch.save(sd, tmp_path / "fsdp.pt")
    with read_checkpoint(tmp_path / "fsdp.pt") as ckpt:
        cfg = ckpt.config
    want = MambaConfig.load("mamba_tiny")
    for f in (
        "d_model",
        "n_layer",
        "padded_vocab_size",
        "d_state",
        "d_conv",
        "expand",
        "dt_rank_value",
        "tie_embeddings",
    ):
        assert getattr(cfg, f) == getattr(want, f), f
    assert torch.equal(load_model(tmp_path / "fsdp.pt").model.backbone.norm_f.weight, tiny.model.backbone.norm_f.weight)


def _run_dir(tmp_path: Path, model: MambaLM, params: str) -> Path:
    """logs/run/checkpoints/epoch_2.pt beside a params.txt, as open_lm.main lays out a run."""
    run = tmp_path / "logs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text(f"lr: 0.001\n{params}\nseed: 0\n")
    return _openlm_ckpt(model, run / "checkpoints" / "epoch_2.pt")


def test_params_txt_config(tmp_path, caplog):
    """A run's params.txt: the full config our OpenLM hook records wins (fields shapes cannot tell, too); with
    only a model name, the tensors' shapes win over it (a custom JSON sharing a shipped config's name)."""
    custom = MambaConfig.load("mamba_tiny").replace(d_model=32, n_layer=3, norm_epsilon=1e-6, name="mamba_tiny")
    torch.manual_seed(0)
    model = MambaLM(custom)
    recorded = json.dumps({**custom.to_dict(), "name": "mamba_tiny"})
    cases = {
        "recorded": (f"mamba_config: {recorded}\nmodel: mamba_tiny", 1e-6),
        "name only": ("model: mamba_tiny", MambaConfig.load("mamba_tiny").norm_epsilon),
        "damaged record": ("mamba_config: {not json\nmodel: mamba_tiny", MambaConfig.load("mamba_tiny").norm_epsilon),
    }
    for i, (label, (params, eps)) in enumerate(cases.items()):
        caplog.clear()
        src = _run_dir(tmp_path / str(i), model, params)
        with read_checkpoint(src) as ckpt:
            cfg = ckpt.config
        assert (cfg.d_model, cfg.n_layer, cfg.norm_epsilon) == (32, 3, eps), label
        warned = "names model 'mamba_tiny'" in caplog.text and "d_model (64 vs 32)" in caplog.text
        assert ("pass --model" in caplog.text and "norm_epsilon" in caplog.text) == warned, caplog.text
        assert warned == (label != "recorded"), (label, caplog.text)
        assert torch.equal(load_model(src).model.backbone.norm_f.weight, model.model.backbone.norm_f.weight)
    # params.txt naming the right shipped config: used as is, no warning
    caplog.clear()
    src = _run_dir(tmp_path / "shipped", MambaLM("mamba_tiny"), "model: mamba_tiny")
    with read_checkpoint(src) as ckpt:
        assert ckpt.config == MambaConfig.load("mamba_tiny")
    assert "params.txt" not in caplog.text


def test_load_model_detects_every_format(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "epoch_0.pt")
    convert(src, tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    convert(src, tmp_path / "ssm", to="mamba_ssm", model="mamba_tiny", progress=False)
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        want = tiny(x)[0]
        for path, fmt in (
            (tmp_path, "openlm"),
            (src, "openlm"),
            (tmp_path / "hf", "hf"),
            (tmp_path / "ssm", "mamba_ssm"),
        ):
            assert detect_format(path) == fmt
            model = load_model(path)
            assert model.model.lm_head.weight is model.model.backbone.embedding.weight
            assert torch.equal(model(x)[0], want), path


def test_mamba_7b_hf_config_matches_published():
    cfg = hf_config(MambaConfig.load("mamba_7b"))
    for key, value in PUBLISHED_7B.items():
        assert cfg[key] == value, f"{key}: generated {cfg[key]!r}, published {value!r}"
    for key in (
        "time_step_init_scheme",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "time_step_scale",
        "initializer_range",
        "rescale_prenorm_residual",
        "torch_dtype",
    ):
        assert key in cfg, key
    # our converter maps the HF config back to the same architecture
    from openlm_mamba.convert import config_from_hf

    back = config_from_hf(cfg, "config.json")
    assert back.replace(seq_len=2048, initializer_range=0.02) == MambaConfig.load("mamba_7b")
    if has_module("transformers"):
        from transformers import MambaConfig as HFMambaConfig

        hf = HFMambaConfig(
            **{
                k: v
                for k, v in cfg.items()
                if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")
            }
        )
        assert (hf.hidden_size, hf.intermediate_size, hf.time_step_rank, hf.vocab_size) == (4096, 8192, 256, 50432)


# -- errors: clear messages, nothing left behind --------------------------------------------------------
def test_architecture_mismatch_is_reported_field_by_field(tiny, tmp_path):
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "hf", tmp_path / "out.pt", to="openlm", model="mamba_130m", progress=False)
    msg = str(e.value)
    assert "architecture mismatch" in msg
    assert "d_model: " in msg and "has 64" in msg and "has 768" in msg
    assert "n_layer: " in msg and "vocab_size (padded)" in msg
    assert not (tmp_path / "out.pt").exists() and not _no_leftovers(tmp_path)


def test_config_disagreeing_with_tensors_names_the_tensor(tiny, tmp_path):
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["state_size"] = 8
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"backbone\.layers\.0\.mixer\.A_log: expected shape \(128, 8\), got \(128, 16\)"
    ):
        convert(tmp_path / "hf", tmp_path / "out", to="mamba_ssm", progress=False)
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_input_gives_clear_error_and_no_output(tiny, tmp_path, fmt):
    if fmt == "pt":
        src = _openlm_ckpt(tiny, tmp_path / "epoch_1.pt")
        victim, dst, to = src, tmp_path / "out_hf", "hf"
    else:
        convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
        src = victim = tmp_path / "hf" / "model.safetensors"
        src, dst, to = tmp_path / "hf", tmp_path / "out.pt", "openlm"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConversionError, match="truncated or corrupted"):
        convert(src, dst, to=to, model="mamba_tiny", progress=False)
    assert not dst.exists() and not _no_leftovers(tmp_path)
    assert cli_main(["convert", str(src), str(dst), "--to", to, "--no-progress"]) == 2


def test_failure_midway_through_writing_leaves_nothing(tiny, tmp_path):
    """The second shard of a sharded source is damaged: the first output shard is written, then removed."""
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    convert(src, tmp_path / "hf", to="hf", model="mamba_tiny", shard_size="100KB", progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "hf" / last).unlink()
    with pytest.raises(ConversionError, match=f"lists shard '{last}', which does not exist"):
        convert(tmp_path / "hf", tmp_path / "hf2", to="hf", shard_size="100KB", progress=False)

    def boom(*_):
        raise OSError("disk full")

    from openlm_mamba.convert import common

    real = common.TensorSource.get
    calls = {"n": 0}

    def flaky(self, key, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:
            boom()
        return real(self, key, **kwargs)

    common.TensorSource.get = flaky
    try:
        with pytest.raises(OSError, match="disk full"):
            convert(src, tmp_path / "hf3", to="hf", model="mamba_tiny", shard_size="100KB", progress=False)
    finally:
        common.TensorSource.get = real
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf3").exists() and not _no_leftovers(tmp_path)


def test_existing_destination_and_bad_arguments(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, tmp_path / "taken", to="hf", progress=False)
    convert(src, tmp_path / "taken", to="hf", overwrite=True, progress=False)
    assert (tmp_path / "taken" / "model.safetensors").is_file() and not _no_leftovers(tmp_path)
    with pytest.raises(ConversionError, match=r"unknown target format 'gguf' .*expected one of openlm, hf"):
        convert(src, tmp_path / "x", to="gguf")
    for bad in (-4, 0, 2.5):  # an argument error, not one of the source's config
        with pytest.raises(ConversionError, match=rf"seq_len \(--seq-len\) must be a positive int, got {bad}"):
            convert(src, tmp_path / "x", to="hf", seq_len=bad)
    other = tmp_path / "three_layers.json"
    tiny.cfg.replace(n_layer=3).save(other)
    with pytest.raises(ConversionError, match=rf"--model {re.escape(str(other))}"):  # the path as given
        convert(src, tmp_path / "x", to="hf", model=other)
    with pytest.raises(ConversionError, match=r"give a path ending in \.pt"):
        convert(src, tmp_path / "x", to="openlm")
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "missing.pt", tmp_path / "x", to="hf")
    with pytest.raises(ConversionError, match="--model: unknown model config 'mamba_nope'"):
        convert(src, tmp_path / "x", to="hf", model="mamba_nope")
    torch.save({"optimizer": {}}, tmp_path / "opt.pt")
    with pytest.raises(ConversionError, match="expected an OpenLM checkpoint"):
        convert(tmp_path / "opt.pt", tmp_path / "x", to="hf")
    with pytest.raises(TypeError, match=r"convert: src must be a checkpoint path .* got NoneType"):
        convert(None, tmp_path / "x", to="hf")
    with pytest.raises(TypeError, match=r"convert: dst must be the output path .* got int"):
        convert(src, 5, to="hf")
    for size in (True, 1.5):
        with pytest.raises(ConversionError, match=r"shard size must be an int number of bytes or a string like 5GB"):
            convert(src, tmp_path / "x", to="hf", shard_size=size)
    assert not (tmp_path / "x").exists()


def test_cli_convert(tiny, tmp_path, capsys):
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    assert (
        cli_main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--model", "mamba_tiny", "--no-progress"])
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert (
        cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "b.pt"), "--to", "openlm", "--model", "mamba_130m"])
        == 2
    )
    assert "d_model" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()


def test_load_model_path_of_another_type_is_a_type_error(tiny, tmp_path):
    """Not Path()'s bare "expected str, bytes or os.PathLike object, not int": the argument is named."""
    from openlm_mamba.convert import load_state_dict

    with pytest.raises(TypeError, match=r"^load_model: path_or_dir must be a checkpoint path \(str or os.PathLike"):
        load_model(123)
    with pytest.raises(TypeError, match=r"^load_state_dict: path must be a checkpoint path .*, got NoneType$"):
        load_state_dict(None)
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    with pytest.raises(TypeError, match=r"^model must be a MambaConfig, a shipped config name .*, got int$"):
        load_model(src, model=5)


def test_cli_convert_help_says_the_dtype_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    assert "(default: keep the source's dtypes)" in " ".join(capsys.readouterr().out.split())


def test_untied_head_round_trip_through_hf(tmp_path):
    torch.manual_seed(3)
    cfg = MambaConfig.load("mamba_tiny").replace(tie_embeddings=False, name="tiny_untied")
    cfg.save(tmp_path / "tiny_untied.json")
    model = MambaLM(cfg).eval()
    assert model.model.lm_head.weight is not model.model.backbone.embedding.weight
    torch.save(model.state_dict(), tmp_path / "u.pt")
    convert(tmp_path / "u.pt", tmp_path / "hf", to="hf", model=tmp_path / "tiny_untied.json", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    convert(tmp_path / "hf", tmp_path / "back.pt", to="openlm", progress=False)
    _assert_same_state(torch.load(tmp_path / "back.pt", weights_only=True)["state_dict"], model.state_dict())
    if has_module("transformers"):
        from transformers import MambaForCausalLM

        hf = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        x = torch.randint(0, 512, (1, 20))
        with torch.no_grad():
            assert (hf(x).logits - model(x)[0]).abs().max().item() < 1e-4


def test_hf_to_hf_keeps_special_token_ids_and_generation_config(tiny, tmp_path):
    """An HF source's bos / eos / pad ids and generation_config.json are not in a MambaConfig: a conversion to HF
    (another dtype, in place or elsewhere) keeps them instead of writing the NeoX defaults (0 / 0 / 0)."""
    hf = tmp_path / "hf"
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), hf, to="hf", model="mamba_tiny", progress=False)
    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    (hf / "config.json").write_text(json.dumps(config))
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "max_new_tokens": 50, "temperature": 0.7}
    (hf / "generation_config.json").write_text(json.dumps(gen))
    for dst, overwrite in ((tmp_path / "bf16", False), (hf, True)):
        convert(hf, dst, to="hf", dtype="bfloat16", overwrite=overwrite, progress=False)
        out = json.loads((dst / "config.json").read_text())
        assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (1, 2, 3), dst
        assert json.loads((dst / "generation_config.json").read_text()) == gen, dst
        assert out["torch_dtype"] == "bfloat16"


def test_a_distinct_head_under_a_tied_config_is_refused(tmp_path):
    """A stored lm_head.weight that differs from the embedding, in a checkpoint whose config says tied (or omits the
    flag, which means tied): refused, not silently replaced by the embedding; an identical stored head loads."""
    torch.manual_seed(4)
    cfg = MambaConfig.load("mamba_tiny").replace(tie_embeddings=False, name="tiny_untied")
    model = MambaLM(cfg).eval()
    convert(_openlm_ckpt(model, tmp_path / "u.pt"), tmp_path / "hf", to="hf", model=cfg, progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for tied in (True, None):
        if tied is None:
            config.pop("tie_word_embeddings")
        else:
            config["tie_word_embeddings"] = tied
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConversionError, match=r"lm_head\.weight differs from the embedding, but the config ties"):
            load_model(tmp_path / "hf")
    # a stored head of another shape under a tied config: named, not dropped
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    head = tensors["lm_head.weight"]
    tensors["lm_head.weight"] = torch.cat([head, head[:8]])
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"lm_head\.weight: expected shape .* \(tied to the embedding\), got"):
        load_model(tmp_path / "hf")
    # a tied model's head stored explicitly (mamba_ssm writes both keys) still loads, tied
    tiny_cfg = MambaConfig.load("mamba_tiny")
    convert(_openlm_ckpt(MambaLM(tiny_cfg), tmp_path / "t.pt"), tmp_path / "ssm", to="mamba_ssm", progress=False)
    tied = load_model(tmp_path / "ssm")
    assert tied.model.lm_head.weight is tied.model.backbone.embedding.weight


def test_hf_output_stores_tied_weights_once(tiny, tmp_path):
    from safetensors import safe_open

    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "backbone.embeddings.weight" in names and "lm_head.weight" not in names
    assert len(names) == 2 + 2 * 10  # embedding, norm_f, 2 layers x (norm + 9 mixer tensors)


def test_unsupported_or_broken_source_configs(tiny, tmp_path):
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), tmp_path / "ssm", to="mamba_ssm", model="mamba_tiny", progress=False)
    path = tmp_path / "ssm" / "config.json"
    good = json.loads(path.read_text())
    for change, message in (
        ({"ssm_cfg": {"layer": "Mamba2"}}, 'ssm_cfg.layer must be "Mamba1"'),
        ({"attn_layer_idx": [1]}, "attn_layer_idx must be empty"),
        ({"d_intermediate": 128}, "d_intermediate must be 0"),
        ({"d_model": "64"}, "d_model must be int"),
    ):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConversionError, match=message):
            load_model(tmp_path / "ssm")
    path.write_text("{not json")
    with pytest.raises(ConversionError, match=r"config\.json: invalid JSON at line 1 column 2"):
        load_model(tmp_path / "ssm")
    path.write_text(json.dumps({"n_layer": 2}))
    with pytest.raises(ConversionError, match=r"neither an HF Mamba config \(hidden_size\) nor a mamba_ssm config"):
        load_model(tmp_path / "ssm")
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "config.json").write_text(json.dumps({"model_type": "mamba2", "hidden_size": 64}))
    with pytest.raises(ConversionError, match='model_type must be "mamba"'):
        load_model(tmp_path / "hfdir")


def test_params_txt_model_name_is_a_hint_that_model_overrides(tmp_path):
    """An old run's params.txt names a shipped config, but the run used a custom JSON of that name: --model with
    the custom JSON wins (compared on the fields shapes show only); a --model the shapes refute names params.txt."""
    custom = MambaConfig.load("mamba_tiny").replace(d_model=32, n_layer=3, norm_epsilon=1e-6, name="mamba_tiny")
    custom.save(tmp_path / "custom.json")
    torch.manual_seed(0)
    src = _run_dir(tmp_path, MambaLM(custom), "model: mamba_tiny")
    with read_checkpoint(src, model=tmp_path / "custom.json") as ckpt:
        assert ckpt.config == custom  # norm_epsilon 1e-6 from --model, not the shipped mamba_tiny's 1e-5
    convert(src, tmp_path / "out.pt", to="openlm", model=tmp_path / "custom.json", progress=False)
    assert torch.load(tmp_path / "out.pt", weights_only=True)["model_config"]["norm_epsilon"] == 1e-6
    with pytest.raises(ConversionError) as e:
        read_checkpoint(src, model="mamba_tiny")
    msg = str(e.value)
    assert "params.txt names mamba_tiny" in msg and "tensor shapes" in msg and "d_model: " in msg
    assert "norm_epsilon" not in msg  # the tensors say nothing about it
    # a recorded full config is exact: every field is compared
    exact = _run_dir(tmp_path / "exact", MambaLM(custom), f"mamba_config: {json.dumps(custom.to_dict())}")
    with pytest.raises(ConversionError, match=r"params\.txt \(mamba_config\) has 1e-06, --model .* has 1e-05"):
        read_checkpoint(exact, model=custom.replace(norm_epsilon=1e-5))


def test_mamba_ssm_refuses_norm_epsilon_it_cannot_represent(tmp_path):
    cfg = MambaConfig.load("mamba_tiny").replace(norm_epsilon=0.5, name="eps")
    torch.save({"state_dict": MambaLM(cfg).state_dict(), "model_config": cfg.to_dict()}, tmp_path / "eps.pt")
    with pytest.raises(ConversionError, match=r"mamba_ssm cannot represent norm_epsilon 0\.5.*--to hf or --to openlm"):
        convert(tmp_path / "eps.pt", tmp_path / "ssm", to="mamba_ssm", progress=False)
    assert not (tmp_path / "ssm").exists() and not _no_leftovers(tmp_path)
    convert(tmp_path / "eps.pt", tmp_path / "hf", to="hf", progress=False)  # HF has the field
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_norm_epsilon"] == 0.5


def _hf_dirs(tmp_path: Path, tiny: MambaLM) -> tuple[Path, MambaLM]:
    """tmp_path/hf holding tiny's weights, and another model of the same shapes (for 'which file was read')."""
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    torch.manual_seed(7)
    other = MambaLM("mamba_tiny").eval()
    return tmp_path / "hf", other


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_weight_files_are_read_in_transformers_order(tiny, tmp_path, kind):
    """The single file wins over an index beside it, as in transformers' from_pretrained."""
    hf, other = _hf_dirs(tmp_path, tiny)
    if kind == "bin":
        sd = {k.removeprefix("model.").replace("embedding.", "embeddings."): v for k, v in tiny.state_dict().items()}
        torch.save(sd, hf / "pytorch_model.bin")
        (hf / "model.safetensors").unlink()
    torch.save(other.state_dict(), tmp_path / "other.pt")
    convert(
        tmp_path / "other.pt", tmp_path / "sharded", to="hf", model="mamba_tiny", shard_size="100KB", progress=False
    )
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    if kind == "bin":  # the other model as pytorch_model-*.bin shards with their index
        shards: dict[str, list[str]] = {}
        for key, name in index["weight_map"].items():
            shards.setdefault(name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin"), []).append(key)
        with read_checkpoint(tmp_path / "sharded") as ckpt:
            for name, keys in shards.items():
                torch.save({k: ckpt.source.get(k.replace("embeddings.", "embedding.")) for k in keys}, hf / name)
        weight_map = {k: name for name, keys in shards.items() for k in keys}
        (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        for name in [*set(index["weight_map"].values()), "model.safetensors.index.json"]:
            shutil.copy(tmp_path / "sharded" / name, hf / name)
    x = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(load_model(hf)(x)[0], tiny(x)[0])
        if has_module("transformers"):
            from transformers import MambaForCausalLM

            assert (MambaForCausalLM.from_pretrained(hf)(x).logits - tiny(x)[0]).abs().max() < 1e-4


def test_hf_shards_without_index_name_the_missing_shard(tiny, tmp_path):
    hf = tmp_path / "hfbin"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config(tiny.cfg)))
    sd = {k.removeprefix("model.").replace("embedding.", "embeddings."): v for k, v in tiny.state_dict().items()}
    keys = sorted(sd)
    for i, part in enumerate((keys[:10], keys[10:]), 1):
        torch.save({k: sd[k].clone() for k in part}, hf / f"pytorch_model-{i:05d}-of-00002.bin")
    assert torch.equal(load_model(hf).model.backbone.norm_f.weight, tiny.model.backbone.norm_f.weight)
    (hf / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ConversionError, match=r"shard 2 of 2 \(pytorch_model-00002-of-00002\.bin\) is missing"):
        load_model(hf)


def test_dtype_must_be_one_of_the_named_ones(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    for bad in (torch.int8, torch.float8_e4m3fn, torch.complex64, "double", 16):
        with pytest.raises(ConversionError, match="dtype must be one of float32, fp32, bfloat16"):
            convert(src, tmp_path / "x", to="hf", dtype=bad, progress=False)
        with pytest.raises(ConversionError, match="dtype must be one of"):
            load_model(src, dtype=bad)
    assert not (tmp_path / "x").exists()
    convert(src, tmp_path / "bf16", to="hf", dtype=torch.bfloat16, progress=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # float64, as to_transformers and float64 models support it: exact both ways
    convert(src, tmp_path / "f64", to="hf", dtype="float64", progress=False)
    wide = load_model(tmp_path / "f64", dtype=torch.float64)
    assert next(wide.parameters()).dtype == torch.float64
    for key, value in load_model(src).state_dict().items():
        assert torch.equal(wide.state_dict()[key], value.double()), key


def test_hf_config_errors_name_hf_keys(tiny, tmp_path):
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    path = tmp_path / "hf" / "config.json"
    good = json.loads(path.read_text())
    for change, message in (
        ({"hidden_size": "64"}, "hidden_size must be int, got '64'"),
        ({"intermediate_size": "128"}, "intermediate_size must be int or null, got '128'"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings must be bool, got 1"),
        ({"use_bias": "no"}, "use_bias must be bool"),
        ({"state_size": 0}, "state_size must be a positive int, got 0"),
        ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive int"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a finite number > 0"),
        ({"time_step_rank": "x"}, 'time_step_rank must be a positive int or "auto"'),
        ({"time_step_min": 0.5, "time_step_max": 0.1}, "time_step_min/time_step_max must satisfy"),
        ({"conv_kernel": True}, "conv_kernel must be int, got True"),
    ):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConversionError, match=re.escape(message)) as e:
            load_model(tmp_path / "hf")
        assert str(e.value).startswith(f"{path}: "), str(e.value)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "num_hidden_layers"}))
    with pytest.raises(ConversionError, match="missing field 'num_hidden_layers'"):
        load_model(tmp_path / "hf")


def test_a_file_that_is_not_a_pt_checkpoint_is_named(tiny, tmp_path):
    hf, _ = _hf_dirs(tmp_path, tiny)
    for name, what in (("config.json", "config"), ("model.safetensors", "weights file")):
        with pytest.raises(ConversionError, match=rf"the {what} of the HF checkpoint {re.escape(str(hf))}: pass its"):
            convert(hf / name, tmp_path / "k.pt", to="openlm", progress=False)
    (tmp_path / "loose.json").write_text('{"a": 1}')
    shutil.copy(hf / "model.safetensors", tmp_path / "loose.safetensors")
    (tmp_path / "notes.pt").write_text("epoch 3, loss 2.1\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, what in (
        ("loose.json", "a JSON file"),
        ("loose.safetensors", "a safetensors weights file"),
        ("notes.pt", "a text file"),
        ("empty.pt", "an empty file"),
    ):
        with pytest.raises(ConversionError, match=f"{what}, not an OpenLM checkpoint"):
            detect_format(tmp_path / name)
    # OpenLM's optimizer / stats files next to epoch_N.pt, and an HF directory that lost its config.json
    for name, what in (("optimizer_3.pt", "optimizer state"), ("stats_3.pt", "training statistics")):
        torch.save({"optimizer": {}}, tmp_path / name)
        with pytest.raises(
            ConversionError, match=rf"{name}: OpenLM's {what} file, not model weights: pass epoch_3\.pt"
        ):
            load_model(tmp_path / name)
    lost = tmp_path / "lost"
    lost.mkdir()
    shutil.copy(hf / "model.safetensors", lost / "model.safetensors")
    with pytest.raises(ConversionError, match=r"lost: holds model\.safetensors but no config\.json"):
        load_model(lost)
    # an HF directory's .bin weights passed as a file
    torch.save(tiny.state_dict(), hf / "pytorch_model.bin")
    with pytest.raises(
        ConversionError, match=r"pytorch_model\.bin: the weights file of the HF checkpoint .*: pass its"
    ):
        convert(hf / "pytorch_model.bin", tmp_path / "k.pt", to="openlm", progress=False)
    (hf / "pytorch_model.bin").unlink()
    # a .bin that holds safetensors bytes: said when torch.load fails on it
    shutil.move(hf / "model.safetensors", hf / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: a safetensors weights file, not a PyTorch"):
        load_model(hf)


def test_checkpoint_with_python_objects_is_reported_as_intact(tiny, tmp_path):
    sd = {"module." + k: v for k, v in tiny.state_dict().items()}
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "ns.pt")
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "ns.pt", tmp_path / "hf", to="hf", progress=False)
    msg = str(e.value)
    assert "intact" in msg and "argparse.Namespace" in msg and "weights_only" in msg
    assert "corrupted" not in msg
    from torch.utils.serialization import config  # saved without checksums (every CRC 0): not called corrupted

    was = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "ns0.pt")
    finally:
        config.save.compute_crc32 = was
    with pytest.raises(ConversionError, match=r"argparse\.Namespace") as e:
        convert(tmp_path / "ns0.pt", tmp_path / "hf", to="hf", progress=False)
    assert "corrupted" not in str(e.value)


# -- the destination: what --overwrite may replace ---------------------------------------------------------
def test_destination_holding_the_source_is_refused(tiny, tmp_path, capsys):
    """`convert run/checkpoints/epoch_2.pt run --overwrite` replaced the whole run dir, source included."""
    src = _run_dir(tmp_path, tiny, "model: mamba_tiny")
    run = src.parent.parent
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for dst in (run, run / "checkpoints", src):
        with pytest.raises(ConversionError, match=rf"(holds|is) the source {re.escape(str(src))}"):
            convert(src, dst, to="hf", overwrite=True, progress=False)
        assert cli_main(["convert", "--to", "hf", str(src), str(dst), "--overwrite", "--no-progress"]) == 2
        assert "wrote" not in capsys.readouterr().out
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    convert(src, tmp_path / "hf", to="hf", progress=False)
    # an output inside the source directory replaces nothing the conversion reads: allowed
    convert(tmp_path / "hf", tmp_path / "hf" / "out.pt", to="openlm", progress=False)
    convert(tmp_path / "hf", tmp_path / "hf" / "sub", to="mamba_ssm", progress=False)
    want = ["config.json", "generation_config.json", "model.safetensors", "out.pt", "sub"]
    assert sorted(os.listdir(tmp_path / "hf")) == want


TOKENIZER = {"tokenizer.json": '{"model": {}}', "special_tokens_map.json": "{}", "merges.txt": "a b\n"}


def test_overwrite_refuses_unrelated_entries_and_keeps_tokenizer_files(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    hf = tmp_path / "hf"
    convert(src, hf, to="hf", model="mamba_tiny", progress=False)
    for name, text in TOKENIZER.items():
        (hf / name).write_text(text)
    (hf / "notes.txt").write_text("mine")
    (hf / "checkpoints").mkdir()
    with pytest.raises(ConversionError, match=r"holds checkpoints/, notes\.txt, which a conversion to hf does not"):
        convert(src, hf, to="hf", overwrite=True, progress=False)
    assert (hf / "notes.txt").read_text() == "mine" and (hf / "checkpoints").is_dir()
    (hf / "notes.txt").unlink()
    (hf / "checkpoints").rmdir()
    convert(src, hf, to="hf", overwrite=True, dtype="bfloat16", shard_size="100KB", progress=False)
    assert (hf / "model.safetensors.index.json").is_file() and not (hf / "model.safetensors").exists()
    assert {n: (hf / n).read_text() for n in TOKENIZER} == TOKENIZER
    # mamba_ssm writes no generation_config.json: kept too; over the HF files the source is made of (in place)
    convert(hf, hf, to="mamba_ssm", overwrite=True, progress=False)
    assert sorted(os.listdir(hf)) == sorted(["config.json", "pytorch_model.bin", "generation_config.json", *TOKENIZER])
    assert detect_format(hf) == "mamba_ssm" and not _no_leftovers(tmp_path)
    # a file where a directory goes, and the reverse
    with pytest.raises(ConversionError, match="is a file; --to hf writes a directory"):
        convert(hf, src, to="hf", overwrite=True, progress=False)
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ConversionError, match="is a directory; --to openlm writes a file"):
        convert(hf, tmp_path / "dir.pt", to="openlm", overwrite=True, progress=False)
    assert src.is_file() and (tmp_path / "dir.pt").is_dir()


def test_in_place_conversion_still_works(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    hf = tmp_path / "hf"
    convert(src, hf, to="hf", model="mamba_tiny", progress=False)
    (hf / "tokenizer.json").write_text("{}")
    convert(hf, hf, to="hf", dtype="bfloat16", overwrite=True, progress=False)
    assert sorted(os.listdir(hf)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    convert(src, src, to="openlm", model="mamba_tiny", overwrite=True, progress=False)
    assert torch.load(src, weights_only=True)["model_config"]["d_model"] == 64 and not _no_leftovers(tmp_path)


# -- malformed sources and lossy casts (each a clear ConversionError, nothing written) ---------------------
def test_malformed_weight_index_values_are_named(tiny, tmp_path):
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    hf = tmp_path / "hf"
    convert(src, hf, to="hf", model="mamba_tiny", shard_size="100KB", progress=False)
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    for bad in (5, None, ["a"], "../hf/model-00001-of-00002.safetensors", ""):
        broken = {**index, "weight_map": {**index["weight_map"], key: bad}}
        index_path.write_text(json.dumps(broken))
        with pytest.raises(ConversionError, match=rf"weight_map value for {key!r} must be a shard file name in"):
            convert(hf, tmp_path / "out.pt", to="openlm", progress=False)
    index_path.write_text(json.dumps({**index, "weight_map": list(index["weight_map"])}))
    with pytest.raises(ConversionError, match="'weight_map' must be an object of tensor name -> shard file, got list"):
        convert(hf, tmp_path / "out.pt", to="openlm", progress=False)
    assert not (tmp_path / "out.pt").exists()


def test_json_that_is_not_utf8_is_named(tiny, tmp_path, capsys):
    src = _openlm_ckpt(tiny, tmp_path / "e.pt")
    hf = tmp_path / "hf"
    convert(src, hf, to="hf", model="mamba_tiny", progress=False)
    (hf / "generation_config.json").write_bytes(b'{"x": "\xff\xfe"}')
    with pytest.raises(ConversionError, match=r"generation_config.json: not a UTF-8 JSON file \(byte 7 is b'\\xff'\)"):
        convert(hf, tmp_path / "hf2", to="hf", progress=False)
    (hf / "config.json").write_bytes(b'{"hidden_size": 16, "x": "\xff"}')
    with pytest.raises(ConversionError, match=r"config.json: not a UTF-8 JSON file"):
        convert(hf, tmp_path / "out.pt", to="openlm", progress=False)
    assert cli_main(["info", str(hf)]) == 2
    assert "config.json: not a UTF-8 JSON file" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "out.pt").exists()


def test_padded_vocabulary_survives_hf_and_mamba_ssm(tmp_path, caplog):
    """A vocabulary of 50 padded to 56 rows: HF's vocab_size counts rows, so the true size travels as
    unpadded_vocab_size and comes back through HF and mamba_ssm (padding rows are never sampled)."""
    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_layer": 1, "vocab_size": 50, "pad_vocab_size_multiple": 8}
    model = MambaLM(cfg)
    src = _openlm_ckpt(model, tmp_path / "e.pt")
    convert(src, tmp_path / "hf", to="hf", model=model.cfg, progress=False)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["vocab_size"], written["unpadded_vocab_size"]) == (56, 50)
    convert(tmp_path / "hf", tmp_path / "ssm", to="mamba_ssm", progress=False)
    convert(tmp_path / "ssm", tmp_path / "back.pt", to="openlm", progress=False)
    for path in ("hf", "ssm", "back.pt"):
        assert load_model(tmp_path / path).cfg.vocab_size == 50, path
    from transformers import MambaForCausalLM

    assert MambaForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size == 56  # transformers reads rows
    # transformers keeps the key but does not update it (resize_token_embeddings): the rows win, with a warning
    written["unpadded_vocab_size"] = 40  # pads to 40, not 56
    (tmp_path / "hf" / "config.json").write_text(json.dumps(written))
    with caplog.at_level("WARNING", logger="openlm_mamba.convert.hf"):
        assert load_model(tmp_path / "hf").cfg.vocab_size == 56
    assert "unpadded_vocab_size 40 does not pad (multiple 8) to vocab_size 56; ignored" in caplog.text


def test_float16_cast_that_would_overflow_is_refused(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["model.backbone.layers.0.mixer.D"][0] = 1e6
    src = tmp_path / "big.pt"
    torch.save({"state_dict": state}, src)
    with pytest.raises(ConversionError, match=r"mixer.D: holds values up to 1e\+06, beyond float16's range"):
        convert(src, tmp_path / "o", to="hf", model="mamba_tiny", dtype="float16", progress=False)
    assert not (tmp_path / "o").exists() and _no_leftovers(tmp_path) == []
    convert(src, tmp_path / "o", to="hf", model="mamba_tiny", dtype="bfloat16", progress=False)  # in range


def test_hf_to_hf_keeps_an_explicit_null_token_id(tiny, tmp_path):
    hf = tmp_path / "hf"
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), hf, to="hf", model="mamba_tiny", progress=False)
    config = json.loads((hf / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=[0, 1])
    (hf / "config.json").write_text(json.dumps(config))
    convert(hf, tmp_path / "out", to="hf", progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out["bos_token_id"], out["eos_token_id"]) == (None, [0, 1])


def test_dangling_weights_symlink_and_wrong_argument_types(tiny, tmp_path):
    from openlm_mamba.convert import to_transformers

    hf = tmp_path / "hf"
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), hf, to="hf", model="mamba_tiny", progress=False)
    (hf / "model.safetensors").rename(tmp_path / "moved.safetensors")
    (hf / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(ConversionError, match=r"model.safetensors: a symlink to .*gone.safetensors, which does not"):
        load_model(hf)
    with pytest.raises(TypeError, match="to_transformers: model must be a MambaLM, got dict"):
        to_transformers({})
    with pytest.raises(TypeError, match="hf_config: cfg must be a MambaConfig"):
        hf_config({"d_model": 16})


def test_cli_info_of_a_missing_checkpoint_path(capsys):
    for arg in ("nonexist.pt", "some/dir/"):
        assert cli_main(["info", arg]) == 2
        assert capsys.readouterr().err.strip() == f"error: {arg}: no such file or directory"


def test_averager_file_converts_and_tokenizer_files_follow_a_directory(tiny, tmp_path):
    """An --averagers file (ema_0.99_N.pt: the averaged weights under 'av_model_sd') reads as a checkpoint; a
    directory converted into a new directory takes its tokenizer files along."""
    ema = tmp_path / "ema_0.99_1.pt"
    sd = {k: v + 0.5 for k, v in tiny.state_dict().items()}
    torch.save({"av_model_sd": sd, "method": "ema", "gamma": 0.99, "update_counter": 3}, ema)
    hf = convert(ema, tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    got = load_model(hf).state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    (hf / "tokenizer.json").write_text("{}")
    (hf / "tokenizer_config.json").write_text("{}")
    ssm = convert(hf, tmp_path / "ssm", to="mamba_ssm", progress=False)
    again = convert(ssm, tmp_path / "hf2", to="hf", progress=False)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in again.iterdir()}
    only_gen = convert(ssm, tmp_path / "ssm2", to="mamba_ssm", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (only_gen / name).unlink(missing_ok=True)
    convert(hf, only_gen, to="mamba_ssm", overwrite=True, progress=False)  # its generation_config is no tokenizer
    assert (only_gen / "tokenizer.json").is_file()
    (again / "tokenizer.json").write_text('{"theirs": 1}')  # an --overwrite destination keeps its own set whole
    (again / "special_tokens_map.json").write_text("{}")
    (hf / "tokenizer_config.json").unlink()
    convert(hf, again, to="hf", overwrite=True, progress=False)
    assert (again / "tokenizer.json").read_text() == '{"theirs": 1}' and (again / "tokenizer_config.json").is_file()


def test_lone_checkpoint_without_a_config_warns_about_defaults(tiny, tmp_path, caplog):
    """An epoch_N.pt copied out of its run (no params.txt, no embedded config): the fields its shapes cannot
    show come from the defaults, which is said once, with the fix."""
    lone = _openlm_ckpt(tiny, tmp_path / "epoch_1.pt")
    with caplog.at_level("WARNING", logger="openlm_mamba.convert.openlm"):
        load_model(lone)
    assert "no config recorded with it" in caplog.text and "pass --model with the config it was trained" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="openlm_mamba.convert.openlm"):
        load_model(lone)  # a command reading it twice (check, then load) says it once
    assert "no config recorded" not in caplog.text
    os.utime(lone, ns=(1, 1))  # another checkpoint written to the same path: said again
    with caplog.at_level("WARNING", logger="openlm_mamba.convert.openlm"):
        load_model(lone)
    assert "no config recorded" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="openlm_mamba.convert.openlm"):
        load_model(lone, model="mamba_tiny")  # --model given: nothing to say
    assert "no config recorded" not in caplog.text


def test_hf_to_mamba_ssm_to_hf_keeps_token_ids_and_chat_template(tiny, tmp_path):
    """A conversion to mamba_ssm carries generation_config.json and the tokenizer (its chat template too) along;
    converting that back to HF used to write the NeoX ids (0 / 0 / 0) over them, so transformers stopped on the
    wrong token. The chat template was dropped, and it blocked an in-place --overwrite."""
    hf = tmp_path / "hf"
    convert(_openlm_ckpt(tiny, tmp_path / "e.pt"), hf, to="hf", model="mamba_tiny", progress=False)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 7}
    (hf / "generation_config.json").write_text(json.dumps(gen))
    (hf / "chat_template.jinja").write_text("{{ messages }}")
    ssm, back = tmp_path / "ssm", tmp_path / "back"
    convert(hf, ssm, to="mamba_ssm", progress=False)
    assert (ssm / "chat_template.jinja").is_file()
    convert(ssm, back, to="hf", progress=False)
    assert json.loads((back / "generation_config.json").read_text()) == gen
    config = json.loads((back / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (back / "chat_template.jinja").read_text() == "{{ messages }}"
    convert(hf, hf, to="hf", dtype="bfloat16", overwrite=True, progress=False)  # refused before
    assert (hf / "chat_template.jinja").is_file()


def test_float8_weights_convert_to_hf_and_back(tiny, tmp_path):
    """float8 tensors passed the checks and then failed with a raw KeyError writing safetensors."""
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in tiny.state_dict().items()}
    torch.save({"state_dict": sd, "model_config": tiny.cfg.to_dict()}, tmp_path / "fp8.pt")
    convert(tmp_path / "fp8.pt", tmp_path / "hf", to="hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "back.pt", to="openlm", progress=False)
    back = torch.load(tmp_path / "back.pt")["state_dict"]
    for k, v in sd.items():
        assert back[k].dtype == torch.float8_e4m3fn and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)), k


def test_model_cannot_move_a_recorded_vocabulary_size(tiny, tmp_path):
    """A checkpoint that records its unpadded vocabulary (52 tokens in 56 rows): --model with 50 would silently
    stop ids 50-51 from ever being generated."""
    cfg = tiny.cfg.replace(vocab_size=52)
    model = MambaLM(cfg)
    torch.save({"state_dict": model.state_dict(), "model_config": cfg.to_dict()}, tmp_path / "v52.pt")
    with pytest.raises(
        ConversionError, match=r"vocab_size: .*v52.pt.* has 52, --model .* has 50 \(both pad to 56 rows"
    ):
        convert(tmp_path / "v52.pt", tmp_path / "hf", to="hf", model=cfg.replace(vocab_size=50), progress=False)
    convert(tmp_path / "v52.pt", tmp_path / "hf", to="hf", model=cfg, progress=False)  # the same: fine
