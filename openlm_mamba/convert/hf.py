"""HF transformers ``MambaForCausalLM`` directories: config mapping, reading and (sharded) writing."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError, MambaConfig
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

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import MambaForCausalLM

    from ..model import MambaLM

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
    if not isinstance(cfg, MambaConfig):
        raise TypeError(f"hf_config: cfg must be a MambaConfig (MambaConfig.from_dict(...)), got {type(cfg).__name__}")
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
    if cfg.vocab_size != cfg.padded_vocab_size:  # HF's vocab_size counts embedding rows: the tokenizer's size
        out["unpadded_vocab_size"] = cfg.vocab_size  # kept so that the padding rows stay unsampled on the way back
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out["transformers_version"] = importlib.metadata.version("transformers")
    return out


_REQUIRED = object()
_NUMBER = (int, float)

# HF config.json key -> (MambaConfig field, JSON type, HF's default or _REQUIRED)
_HF_FIELDS: dict[str, tuple[str, type | tuple[type, ...], Any]] = {
    "hidden_size": ("d_model", int, _REQUIRED),
    "num_hidden_layers": ("n_layer", int, _REQUIRED),
    "vocab_size": ("vocab_size", int, _REQUIRED),
    "state_size": ("d_state", int, 16),
    "conv_kernel": ("d_conv", int, 4),
    "expand": ("expand", int, 2),
    "time_step_rank": ("dt_rank", (int, str), "auto"),
    "rms_norm": ("rms_norm", bool, True),
    "residual_in_fp32": ("residual_in_fp32", bool, True),
    "fused_add_norm": ("fused_add_norm", bool, True),
    "layer_norm_epsilon": ("norm_epsilon", _NUMBER, 1e-5),
    "tie_word_embeddings": ("tie_embeddings", bool, True),
    "use_conv_bias": ("conv_bias", bool, True),
    "use_bias": ("bias", bool, False),
    "time_step_min": ("dt_min", _NUMBER, 1e-3),
    "time_step_max": ("dt_max", _NUMBER, 1e-1),
    "time_step_floor": ("dt_init_floor", _NUMBER, 1e-4),
    "time_step_scale": ("dt_scale", _NUMBER, 1.0),
    "time_step_init_scheme": ("dt_init", str, "random"),
    "initializer_range": ("initializer_range", _NUMBER, 0.02),
}
_HF_NAMES = {ours: key for key, (ours, _, _) in _HF_FIELDS.items()}


def _hf_value(data: dict[str, Any], key: str, types: type | tuple[type, ...], default: Any, source: str) -> Any:
    """``data[key]`` (or ``default``), type-checked (JSON true is not a number); errors name HF's key."""
    if key not in data and default is _REQUIRED:
        raise ConversionError(f"{source}: missing field {key!r}")
    value = data.get(key, default)
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConversionError(f"{source}: {key} must be {names}, got {value!r}")
    return value


def config_from_hf(data: dict[str, Any], source: str, seq_len: int = 2048) -> MambaConfig:
    """A MambaConfig from an HF ``MambaForCausalLM`` config.json dict (HF defaults for absent fields).

    Fields are type-checked before use; errors name HF's keys (``state_size``, not ``d_state``)."""
    if data.get("model_type", "mamba") != "mamba":
        raise ConversionError(f'{source}: model_type must be "mamba" (Mamba-1), got {data.get("model_type")!r}')
    fields = {ours: _hf_value(data, key, types, default, source) for key, (ours, types, default) in _HF_FIELDS.items()}
    d, expand = fields["d_model"], fields["expand"]
    inter = _hf_value(data, "intermediate_size", (int, type(None)), None, source)
    if inter is not None and inter != expand * d:
        raise ConversionError(f"{source}: intermediate_size {inter} != expand {expand} x hidden_size {d}")
    if _hf_value(data, "hidden_act", str, "silu", source) != "silu":
        raise ConversionError(f'{source}: hidden_act must be "silu", got {data["hidden_act"]!r}')
    pad = data.get("pad_vocab_size_multiple", 8)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0 or fields["vocab_size"] % pad:
        pad = 1  # HF's vocab_size is the embedding's row count: keep it exactly
    real = data.get("unpadded_vocab_size")  # written by hf_config when padding added rows
    if real is not None:
        rows = fields["vocab_size"]
        if not isinstance(real, int) or isinstance(real, bool) or not 0 < real <= rows or -(-real // pad) * pad != rows:
            # e.g. left behind by transformers' resize_token_embeddings, which does not know the key: the rows win
            _log.warning(
                "%s: unpadded_vocab_size %r does not pad (multiple %d) to vocab_size %d; ignored, the vocabulary "
                "is the %d rows",
                source,
                real,
                pad,
                rows,
                rows,
            )
        else:
            fields["vocab_size"] = real
    fields.update(seq_len=seq_len, pad_vocab_size_multiple=pad, name=Path(source).parent.name or "hf")
    # rescale_prenorm_residual: an init-only flag HF configs must hold False (see hf_config): says nothing here
    try:
        return MambaConfig.from_dict(fields, source=source, require_all=False)
    except ConfigError as e:  # "<source>: d_state must be ..." -> "<source>: state_size must be ..."
        detail = str(e).removeprefix(f"{source}: ")
        detail = re.sub(r"^[\w/]+", lambda m: "/".join(_HF_NAMES.get(f, f) for f in m.group().split("/")), detail)
        raise ConversionError(f"{source}: {detail}") from None


def from_hf_key(key: str) -> str | None:
    if key.startswith("backbone.embeddings."):
        return "backbone.embedding." + key[len("backbone.embeddings.") :]
    return key


def to_hf_key(key: str) -> str:
    if key.startswith("backbone.embedding."):
        return "backbone.embeddings." + key[len("backbone.embedding.") :]
    return key


_OUTPUT_NAMES = re.compile(
    r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors"
)


def writes_hf_file(name: str) -> bool:
    """Whether ``name`` is one of the files a conversion to HF writes into its output directory (the configs,
    ``model.safetensors``, or the shards and their index of a sharded output)."""
    return _OUTPUT_NAMES.fullmatch(name) is not None


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


# transformers' from_pretrained order: the first of these present is what it loads (the others are ignored)
_WEIGHT_FILES = (
    ("model.safetensors", "safetensors", False),
    ("model.safetensors.index.json", "safetensors", True),
    ("pytorch_model.bin", "torch", False),
    ("pytorch_model.bin.index.json", "torch", True),
)
# shards without an index (transformers would refuse them; we read them when every shard is there)
_SHARD_NAMES = (
    (re.compile(r"(model-)(\d+)(-of-)(\d+)(\.safetensors)"), "safetensors"),
    (re.compile(r"(pytorch_model-)(\d+)(-of-)(\d+)(\.bin)"), "torch"),
)


def _add_weights(source: TensorSource, path: Path, rename: Callable[[str], str | None]) -> None:
    for name, loader, indexed in _WEIGHT_FILES:
        file = path / name
        if file.is_symlink() and not file.exists():
            raise ConversionError(f"{file}: a symlink to {os.readlink(file)}, which does not exist")
        if not file.is_file():
            continue
        if indexed:
            _add_indexed(source, file, loader, rename)
        else:
            _add_file(source, file, loader, rename, None)
        return
    for pattern, loader in _SHARD_NAMES:
        shards = _unindexed_shards(path, pattern)
        if shards:
            for shard in shards:
                _add_file(source, shard, loader, rename, None)
            return
    raise ConversionError(
        f"{path}: no weights found (looked for model.safetensors[.index.json], pytorch_model.bin[.index.json] and shards)"
    )


def _add_indexed(source: TensorSource, index: Path, loader: str, rename: Callable[[str], str | None]) -> None:
    """Add the shards an index json lists, each with only the tensors the index maps to it."""
    weight_map = read_json(index, "weight index").get("weight_map")
    if weight_map is not None and not isinstance(weight_map, dict):
        raise ConversionError(
            f"{index}: 'weight_map' must be an object of tensor name -> shard file, got {type(weight_map).__name__}"
        )
    if not weight_map:
        raise ConversionError(f"{index}: missing or empty 'weight_map'")
    source.files.append(index)
    files: dict[str, set[str]] = {}
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or Path(fname).name != fname:
            raise ConversionError(
                f"{index}: weight_map value for {key!r} must be a shard file name in {index.parent}, got {fname!r}"
            )
        files.setdefault(fname, set()).add(key)
    for fname, keys in sorted(files.items()):
        shard = index.parent / fname
        if not shard.is_file():
            raise ConversionError(f"{index}: lists shard {fname!r}, which does not exist in {index.parent}")
        _add_file(source, shard, loader, rename, keys)
        missing = [k for k in keys if rename(k) not in source.tensors and rename(k) is not None]
        if missing:
            raise ConversionError(f"{shard}: index lists {missing[0]!r} but the shard does not contain it")


def _unindexed_shards(path: Path, pattern: re.Pattern[str]) -> list[Path]:
    """The shards ``NAME-i-of-n`` in ``path`` matching ``pattern``, sorted; ConversionError when one is missing."""
    matches = [m for p in path.iterdir() if (m := pattern.fullmatch(p.name))]
    if not matches:
        return []
    totals = sorted({m.group(4) for m in matches})
    if len(totals) > 1:
        raise ConversionError(
            f"{path}: shards of {' and '.join(totals)} files mixed, and no index to tell which to use"
        )
    found = {int(m.group(2)): m for m in matches}
    sample = matches[0]
    n = int(totals[0])
    for i in range(1, n + 1):
        if i not in found:
            name = f"{sample.group(1)}{i:0{len(sample.group(2))}d}{sample.group(3)}{totals[0]}{sample.group(5)}"
            raise ConversionError(f"{path}: shard {i} of {n} ({name}) is missing")
    if max(found) > n:
        raise ConversionError(f"{path}: {found[max(found)].group()} numbers a shard beyond its {n}")
    return [path / found[i].group() for i in range(1, n + 1)]


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
    add_state_dict(source, sd, file, rename, check)


def write_hf(
    source: TensorSource,
    cfg: MambaConfig,
    out: Path,
    shard_size: int,
    fetch: Callable[[str], torch.Tensor],
    dtype_of: Callable[[str], torch.dtype],
    on_tensor: Callable[[str, int], None] | None = None,
    carried: dict[str, Any] | None = None,
) -> None:
    """Write an HF directory: config.json, generation_config.json, model.safetensors or shards + index.

    ``on_tensor(key, nbytes)`` is called with the canonical key after each tensor is written. ``carried``: what an
    HF source holds that a MambaConfig does not (see :func:`hf_extras`), kept instead of the NeoX defaults."""
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
    carried = carried or {}
    config = {**hf_config(cfg, emb_dtype), **carried.get("special_ids", {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = carried.get("generation_config") or {**NEOX_SPECIAL_IDS, **carried.get("special_ids", {})}
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


def hf_extras(path: Path, hf_config_ids: bool = True) -> dict[str, Any]:
    """What a checkpoint directory holds beyond its model config, for a conversion to HF to keep: its special
    token ids (an HF config.json's bos / eos / pad_token_id, when ``hf_config_ids``; else, or where it has none,
    those of its generation_config.json) and its generation_config.json (which a conversion to mamba_ssm carries
    along, so HF -> mamba_ssm -> HF keeps both)."""
    out: dict[str, Any] = {}

    def valid(key: str, value: Any) -> bool:  # an int id (eos may be a list of them), as transformers loads them
        if isinstance(value, list) and key == "eos_token_id":
            return bool(value) and all(valid(key, v) for v in value)
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def ids_of(data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            return {}
        return {k: data[k] for k in NEOX_SPECIAL_IDS if k in data and (data[k] is None or valid(k, data[k]))}

    ids = ids_of(read_json(path / "config.json", "config.json")) if hf_config_ids else {}
    if (path / "generation_config.json").is_file():
        gen = read_json(path / "generation_config.json", "generation_config.json")
        if isinstance(gen, dict):
            out["generation_config"] = gen
            ids = ids or ids_of(gen)
    if ids:
        out["special_ids"] = ids
    return out


def to_transformers(model: MambaLM) -> MambaForCausalLM:
    """An in-memory transformers ``MambaForCausalLM`` holding ``model``'s weights (same device and dtype)."""
    import warnings

    from transformers import MambaConfig as HFConfig
    from transformers import MambaForCausalLM

    from ..model import MambaLM

    if not isinstance(model, MambaLM):
        raise TypeError(f"to_transformers: model must be a MambaLM, got {type(model).__name__}")
    config = {k: v for k, v in hf_config(model.cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' "falling back to the PyTorch path" notices
        hf = MambaForCausalLM(HFConfig(**config))
    p = next(model.parameters())
    hf = hf.to(p.dtype)  # before loading: float64 weights must not pass through float32
    state = {to_hf_key(k.removeprefix("model.")): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ConversionError(f"to_transformers: missing keys {missing}, unexpected keys {unexpected}")
    return hf.to(p.device).eval()
