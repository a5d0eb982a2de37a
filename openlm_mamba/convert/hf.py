"""HF transformers ``MambaForCausalLM`` directories: config mapping, reading and (sharded) writing."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import MambaConfig
from .common import (
    ConversionError,
    TensorInfo,
    TensorSource,
    add_safetensors_file,
    add_state_dict,
    dir_config,
    read_json,
    torch_load,
    write_safetensors,
)

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}

# GPT-NeoX-20B tokenizer (the one Mamba-7B uses): <|endoftext|> is id 0 and serves as bos, eos and pad.
NEOX_SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def hf_config(cfg: MambaConfig, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
    """The HF ``MambaForCausalLM`` config.json (a dict) describing a model of ``cfg``."""
    dtype_name = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    if not cfg.rms_norm:
        raise ConversionError(f"{cfg.name}: HF MambaForCausalLM only has RMSNorm; rms_norm=False cannot be exported")
    out: dict[str, Any] = {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_inner,
        "num_hidden_layers": cfg.n_layer,
        "state_size": cfg.d_state,
        "conv_kernel": cfg.d_conv,
        "expand": cfg.expand,
        "time_step_rank": cfg.dt_rank_value,
        "vocab_size": cfg.padded_vocab_size,
        "rms_norm": cfg.rms_norm,
        "residual_in_fp32": cfg.residual_in_fp32,
        "fused_add_norm": cfg.fused_add_norm,
        "use_bias": cfg.bias,
        "use_conv_bias": cfg.conv_bias,
        "layer_norm_epsilon": cfg.norm_epsilon,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
        "hidden_act": "silu",
        "initializer_range": cfg.initializer_range,
        # False whatever cfg says: transformers applies this init rescale (out_proj / sqrt(n_layer)) to
        # *loaded* weights in from_pretrained, which would silently change the model.
        "rescale_prenorm_residual": False,
        "time_step_init_scheme": cfg.dt_init,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "time_step_scale": cfg.dt_scale,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        **NEOX_SPECIAL_IDS,
        "torch_dtype": dtype_name,
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out["transformers_version"] = importlib.metadata.version("transformers")
    return out


def config_from_hf(data: dict[str, Any], source: str, seq_len: int = 2048) -> MambaConfig:
    """A MambaConfig from an HF ``MambaForCausalLM`` config.json dict (HF defaults for absent fields)."""
    if data.get("model_type", "mamba") != "mamba":
        raise ConversionError(f'{source}: model_type must be "mamba" (Mamba-1), got {data.get("model_type")!r}')
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key not in data:
            raise ConversionError(f"{source}: missing field {key!r}")
    d = data["hidden_size"]
    expand = data.get("expand", 2)
    inter = data.get("intermediate_size")
    if inter is not None and inter != expand * d:
        raise ConversionError(f"{source}: intermediate_size {inter} != expand {expand} x hidden_size {d}")
    if data.get("hidden_act", "silu") != "silu":
        raise ConversionError(f'{source}: hidden_act must be "silu", got {data["hidden_act"]!r}')
    vocab = data["vocab_size"]
    pad = data.get("pad_vocab_size_multiple", 8)
    if not isinstance(pad, int) or pad <= 0 or vocab % pad:
        pad = 1  # HF's vocab_size is the embedding's row count: keep it exactly
    rank = data.get("time_step_rank", "auto")
    fields = dict(
        d_model=d,
        n_layer=data["num_hidden_layers"],
        vocab_size=vocab,
        seq_len=seq_len,
        d_state=data.get("state_size", 16),
        d_conv=data.get("conv_kernel", 4),
        expand=expand,
        dt_rank=rank,
        rms_norm=data.get("rms_norm", True),
        residual_in_fp32=data.get("residual_in_fp32", True),
        fused_add_norm=data.get("fused_add_norm", True),
        norm_epsilon=data.get("layer_norm_epsilon", 1e-5),
        pad_vocab_size_multiple=pad,
        tie_embeddings=data.get("tie_word_embeddings", True),
        conv_bias=data.get("use_conv_bias", True),
        bias=data.get("use_bias", False),
        dt_min=data.get("time_step_min", 1e-3),
        dt_max=data.get("time_step_max", 1e-1),
        dt_init_floor=data.get("time_step_floor", 1e-4),
        dt_scale=data.get("time_step_scale", 1.0),
        dt_init=data.get("time_step_init_scheme", "random"),
        initializer_range=data.get("initializer_range", 0.02),
        # init-only flag; HF configs must hold False (see hf_config), so it says nothing about training
    )
    try:
        return MambaConfig(**fields, name=Path(source).parent.name or "hf")
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def from_hf_key(key: str) -> str | None:
    if key.startswith("backbone.embeddings."):
        return "backbone.embedding." + key[len("backbone.embeddings.") :]
    return key


def to_hf_key(key: str) -> str:
    if key.startswith("backbone.embedding."):
        return "backbone.embeddings." + key[len("backbone.embedding.") :]
    return key


def is_hf_dir(path: Path) -> bool:
    data = dir_config(path)
    return data is not None and "hidden_size" in data


def read_hf(path: Path, seq_len: int = 2048) -> tuple[MambaConfig, TensorSource]:
    """Config and lazy tensors of an HF directory (safetensors or pytorch_model*.bin, sharded or not)."""
    cfg = config_from_hf(read_json(path / "config.json", "config.json"), str(path / "config.json"), seq_len)
    source = TensorSource(f"HF checkpoint {path}")
    try:
        _add_weights(source, path, from_hf_key)
    except BaseException:
        source.close()
        raise
    return cfg, source


def _add_weights(source: TensorSource, path: Path, rename: Callable[[str], str | None]) -> None:
    for index_name, single, loader in (
        ("model.safetensors.index.json", "model.safetensors", "safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "torch"),
    ):
        index = path / index_name
        if index.is_file():
            weight_map = read_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: missing or empty 'weight_map'")
            files: dict[str, set[str]] = {}
            for key, fname in weight_map.items():
                files.setdefault(fname, set()).add(key)
            for fname, keys in sorted(files.items()):
                shard = path / fname
                if not shard.is_file():
                    raise ConversionError(f"{index}: lists shard {fname!r}, which does not exist in {path}")
                _add_file(source, shard, loader, rename, keys)
                missing = [k for k in keys if rename(k) not in source.tensors and rename(k) is not None]
                if missing:
                    raise ConversionError(f"{shard}: index lists {missing[0]!r} but the shard does not contain it")
            return
        if (path / single).is_file():
            _add_file(source, path / single, loader, rename, None)
            return
    shards = sorted(path.glob("model-*-of-*.safetensors")) or sorted(path.glob("pytorch_model-*-of-*.bin"))
    if shards:
        for shard in shards:
            _add_file(source, shard, "safetensors" if shard.suffix == ".safetensors" else "torch", rename, None)
        return
    raise ConversionError(
        f"{path}: no weights found (looked for model.safetensors[.index.json], pytorch_model.bin[.index.json] and shards)"
    )


def _add_file(
    source: TensorSource, file: Path, loader: str, rename: Callable[[str], str | None], only: set[str] | None
) -> None:
    if loader == "safetensors":
        add_safetensors_file(source, file, rename, only)
        return
    sd, check = torch_load(file)
    if not isinstance(sd, dict):
        raise ConversionError(f"{file}: expected a state dict, got {type(sd).__name__}")
    if only is not None:
        sd = {k: v for k, v in sd.items() if k in only}
    add_state_dict(source, sd, str(file), rename, check)


def write_hf(
    source: TensorSource,
    cfg: MambaConfig,
    out: Path,
    shard_size: int,
    fetch: Callable[[str], torch.Tensor],
    dtype_of: Callable[[str], torch.dtype],
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Write an HF directory: config.json, generation_config.json, model.safetensors or shards + index.

    ``on_tensor(key, nbytes)`` is called with the canonical key after each tensor is written."""
    out.mkdir(parents=True)
    keys = list(source.tensors)
    items = [(k, TensorInfo(source.tensors[k].shape, dtype_of(k), source.tensors[k].load)) for k in keys]
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for key, info in items:
        if shards[-1] and size + info.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((to_hf_key(key), info))
        size += info.nbytes
    by_hf = {to_hf_key(k): k for k in keys}
    written = None if on_tensor is None else (lambda name, nbytes: on_tensor(by_hf[name], nbytes))
    emb_dtype = dtype_of("backbone.embedding.weight")
    (out / "config.json").write_text(json.dumps(hf_config(cfg, emb_dtype), indent=2) + "\n")
    gen = {**NEOX_SPECIAL_IDS}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], lambda k: fetch(by_hf[k]), meta, written)
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(out / name, shard, lambda k: fetch(by_hf[k]), meta, written)
        weight_map.update({k: name for k, _ in shard})
    index = {"metadata": {"total_size": sum(info.nbytes for _, info in items)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def to_transformers(model: torch.nn.Module):
    """An in-memory transformers ``MambaForCausalLM`` holding ``model``'s weights (same device and dtype)."""
    import warnings

    from transformers import MambaConfig as HFConfig
    from transformers import MambaForCausalLM

    config = {k: v for k, v in hf_config(model.cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' "falling back to the PyTorch path" notices
        hf = MambaForCausalLM(HFConfig(**config))
    state = {to_hf_key(k.removeprefix("model.")): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ConversionError(f"to_transformers: missing keys {missing}, unexpected keys {unexpected}")
    p = next(model.parameters())
    return hf.to(p.device, p.dtype).eval()
