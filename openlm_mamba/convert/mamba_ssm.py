"""mamba_ssm ``MambaLMHeadModel`` directories: ``config.json`` (d_model / n_layer / ssm_cfg) + ``pytorch_model.bin``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..config import MambaConfig
from .common import ConversionError, TensorSource, add_state_dict, dir_config, read_json, torch_load

# ssm_cfg keys of mamba_ssm's Mamba (Mamba-1) layer -> our MambaConfig fields
_SSM_KEYS = {
    "d_state": "d_state",
    "d_conv": "d_conv",
    "expand": "expand",
    "dt_rank": "dt_rank",
    "dt_min": "dt_min",
    "dt_max": "dt_max",
    "dt_init": "dt_init",
    "dt_scale": "dt_scale",
    "dt_init_floor": "dt_init_floor",
    "conv_bias": "conv_bias",
    "bias": "bias",
}


# mamba_ssm's MambaLMHeadModel builds its norms with MixerModel's default epsilon; its config has no field for it
NORM_EPSILON = 1e-5

# the files a mamba_ssm directory (as written here) consists of
OUTPUT_FILES = frozenset({"config.json", "pytorch_model.bin"})


def writes_mamba_ssm_file(name: str) -> bool:
    """Whether a conversion to mamba_ssm writes a file called ``name`` into its output directory."""
    return name in OUTPUT_FILES


def mamba_ssm_config(cfg: MambaConfig) -> dict[str, Any]:
    """mamba_ssm's config.json for ``cfg`` (fields understood by mamba_ssm 1.x and 2.x).

    Raises ConversionError for a model mamba_ssm would run differently: one whose ``norm_epsilon`` is not the
    1e-5 its MambaLMHeadModel always uses. (The other fields mamba_ssm lacks, ``seq_len`` and the initialisation
    recipe, do not change what a loaded model computes.)"""
    if not math.isclose(cfg.norm_epsilon, NORM_EPSILON, rel_tol=1e-9, abs_tol=0.0):
        raise ConversionError(
            f"{cfg.name}: mamba_ssm cannot represent norm_epsilon {cfg.norm_epsilon} (its MambaLMHeadModel always "
            f"uses {NORM_EPSILON} and its config has no field for it); use --to hf or --to openlm"
        )
    ssm_cfg = {ours_key: getattr(cfg, ours) for ours_key, ours in _SSM_KEYS.items()}
    return {
        "d_model": cfg.d_model,
        "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": ssm_cfg,
        "rms_norm": cfg.rms_norm,
        "residual_in_fp32": cfg.residual_in_fp32,
        "fused_add_norm": cfg.fused_add_norm,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
        "tie_embeddings": cfg.tie_embeddings,
    }


def config_from_mamba_ssm(
    data: dict[str, Any], source: str, seq_len: int = 2048, norm_epsilon: float = NORM_EPSILON
) -> MambaConfig:
    """A MambaConfig from mamba_ssm's config.json (mamba_ssm defaults for absent fields)."""
    for key in ("d_model", "n_layer", "vocab_size"):
        if key not in data:
            raise ConversionError(f"{source}: missing field {key!r}")
    ssm = data.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise ConversionError(f"{source}: ssm_cfg must be an object, got {ssm!r}")
    layer = ssm.get("layer", "Mamba1")
    if layer != "Mamba1":
        raise ConversionError(f'{source}: ssm_cfg.layer must be "Mamba1" (only Mamba-1 is supported), got {layer!r}')
    if data.get("attn_layer_idx"):
        raise ConversionError(
            f"{source}: attn_layer_idx must be empty (hybrid attention layers are not supported), got {data['attn_layer_idx']!r}"
        )
    if data.get("d_intermediate", 0):
        raise ConversionError(
            f"{source}: d_intermediate must be 0 (MLP layers are not supported), got {data['d_intermediate']!r}"
        )
    unknown = sorted(set(ssm) - set(_SSM_KEYS) - {"layer", "use_fast_path"})
    if unknown:
        raise ConversionError(f"{source}: unknown ssm_cfg field {unknown[0]!r} (known: {', '.join(_SSM_KEYS)})")
    fields: dict[str, Any] = dict(
        d_model=data["d_model"],
        n_layer=data["n_layer"],
        vocab_size=data["vocab_size"],
        seq_len=seq_len,
        rms_norm=data.get("rms_norm", True),
        residual_in_fp32=data.get("residual_in_fp32", True),
        fused_add_norm=data.get("fused_add_norm", True),
        norm_epsilon=norm_epsilon,
        pad_vocab_size_multiple=data.get("pad_vocab_size_multiple", 8),
        tie_embeddings=data.get("tie_embeddings", True),
    )
    fields.update({ours: ssm[key] for key, ours in _SSM_KEYS.items() if key in ssm})
    try:
        return MambaConfig(**fields, name=Path(source).parent.name or "mamba_ssm")
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def is_mamba_ssm_dir(path: Path) -> bool:
    data = dir_config(path)
    return data is not None and "d_model" in data and "n_layer" in data and "hidden_size" not in data


def read_mamba_ssm(path: Path, seq_len: int = 2048) -> tuple[MambaConfig, TensorSource]:
    """Config and (mmapped) tensors of a mamba_ssm directory."""
    cfg = config_from_mamba_ssm(read_json(path / "config.json", "config.json"), str(path / "config.json"), seq_len)
    weights = path / "pytorch_model.bin"
    if not weights.is_file():
        raise ConversionError(f"{path}: pytorch_model.bin not found (mamba_ssm format)")
    sd, check = torch_load(weights)
    if not isinstance(sd, dict):
        raise ConversionError(f"{weights}: expected a state dict, got {type(sd).__name__}")
    source = TensorSource(f"mamba_ssm checkpoint {path}")
    add_state_dict(source, sd, weights, lambda k: k, check)
    return cfg, source


def write_mamba_ssm(state_dict: dict[str, torch.Tensor], cfg: MambaConfig, out: Path) -> None:
    """Write a mamba_ssm directory; ``state_dict`` has canonical keys (a tied lm_head shares the embedding)."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(mamba_ssm_config(cfg), indent=2) + "\n")
    torch.save(state_dict, out / "pytorch_model.bin")
