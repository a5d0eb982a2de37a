"""MambaConfig: shipped configs, derived sizes and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from openlm_mamba import ConfigError, MambaConfig, available_configs
from openlm_mamba.config import config_dir

EXPECTED_SIZES = {
    "mamba_130m": (768, 24),
    "mamba_370m": (1024, 48),
    "mamba_790m": (1536, 48),
    "mamba_1.4b": (2048, 48),
    "mamba_2.8b": (2560, 64),
    "mamba_7b": (4096, 64),
    "mamba_1b": (2048, 36),  # the sizes of OpenLM's own four-field mamba_1b entry, which ours replaces
}


def test_shipped_configs_are_complete_and_valid():
    names = available_configs()
    assert set(EXPECTED_SIZES) | {"mamba_tiny"} <= set(names)
    for name in names:
        cfg = MambaConfig.load(name)
        assert cfg.name == name
        raw = json.loads((config_dir() / f"{name}.json").read_text())
        # every architecture field is stated explicitly in the file
        for key in ("model_type", "d_model", "n_layer", "vocab_size", "seq_len", "d_state", "d_conv", "expand"):
            assert key in raw, (name, key)
        for key in ("dt_rank", "rms_norm", "residual_in_fp32", "fused_add_norm", "norm_epsilon"):
            assert key in raw, (name, key)
        assert "pad_vocab_size_multiple" in raw and "tie_embeddings" in raw
        if name in EXPECTED_SIZES:
            assert (cfg.d_model, cfg.n_layer) == EXPECTED_SIZES[name]


def test_mamba_7b_matches_the_model_card():
    cfg = MambaConfig.load("mamba_7b")
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.seq_len) == (4096, 64, 50432, 2048)
    assert (cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank_value) == (16, 4, 2, 256)
    assert cfg.rms_norm and cfg.residual_in_fp32 and cfg.tie_embeddings
    assert cfg.d_inner == 8192 and cfg.padded_vocab_size == 50432
    assert abs(cfg.num_parameters() - 6.95e9) / 6.95e9 < 0.01


def test_derived_sizes():
    cfg = MambaConfig(d_model=100, n_layer=1, vocab_size=50277)
    assert cfg.dt_rank_value == 7  # ceil(100 / 16)
    assert cfg.padded_vocab_size == 50280
    assert cfg.d_inner == 200


def test_roundtrip_to_json(tmp_path):
    cfg = MambaConfig.load("mamba_tiny")
    path = tmp_path / "copy.json"
    cfg.save(path)
    assert MambaConfig.load(path) == cfg
    assert MambaConfig.save.__doc__ and MambaConfig.replace.__doc__


def _write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _tiny(**changes):
    data = MambaConfig.load("mamba_tiny").to_dict()
    data.update(changes)
    return data


BAD_CONFIGS = [
    ("wrong type", _tiny(d_state="16"), r"bad\.json: d_state must be int, got \'16\'"),
    ("zero size", _tiny(d_model=0), r"bad\.json: d_model must be a positive int, got 0"),
    ("negative size", _tiny(n_layer=-2), r"bad\.json: n_layer must be a positive int, got -2"),
    ("bool as int", _tiny(expand=True), r"bad\.json: expand must be int, got True"),
    ("unknown field", _tiny(d_sate=16), r"bad\.json: unknown field 'd_sate'"),
    (
        "missing field",
        {k: v for k, v in _tiny().items() if k != "vocab_size"},
        r"bad\.json: missing field 'vocab_size'",
    ),
    ("bad dt_rank", _tiny(dt_rank="big"), r"bad\.json: dt_rank must be a positive int or \"auto\""),
    ("bad eps", _tiny(norm_epsilon=0), r"bad\.json: norm_epsilon must be a finite number > 0, got 0"),
    ("infinite eps", _tiny(norm_epsilon=float("inf")), r"bad\.json: norm_epsilon must be a finite number > 0, got inf"),
    ("negative init std", _tiny(initializer_range=-0.02), r"bad\.json: initializer_range must be a finite number >= 0"),
    ("negative dt_scale", _tiny(dt_scale=-1.0), r"bad\.json: dt_scale must be a finite number >= 0, got -1\.0"),
    ("negative dt floor", _tiny(dt_init_floor=-1), r"bad\.json: dt_init_floor must be a finite number >= 0"),
    ("infinite dt_max", _tiny(dt_max=float("inf")), r"bad\.json: dt_min/dt_max must satisfy"),
    ("bad d_conv", _tiny(d_conv=9), r"bad\.json: d_conv must be 2, 3 or 4, got 9"),
    ("wrong marker", _tiny(model_type="llama"), r"bad\.json: model_type must be \"mamba\", got 'llama'"),
    ("no marker", {k: v for k, v in _tiny().items() if k != "model_type"}, r'bad\.json: missing field "model_type"'),
    ("not an object", [1, 2], r"bad\.json: expected a JSON object, got list"),
    ("bad dt range", _tiny(dt_min=0.5, dt_max=0.1), r"bad\.json: dt_min/dt_max must satisfy"),
]


@pytest.mark.parametrize("data,pattern", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_name_file_and_field(tmp_path, data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MambaConfig.load(_write(tmp_path, data))


def test_invalid_json_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 2 column"):
        MambaConfig.load(_write(tmp_path, '{"d_model": 64,\n oops}'))


def test_unreadable_and_unknown(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read model config"):
        MambaConfig.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"unknown model config 'mamba_99b'.*mamba_7b"):
        MambaConfig.load("mamba_99b")


def test_constructor_validates_too():
    with pytest.raises(ConfigError, match=r"d_state must be a positive int, got 0"):
        MambaConfig(d_model=64, n_layer=2, vocab_size=100, d_state=0)
