"""Model configuration: load, validate and derive the sizes of a Mamba-1 language model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "mamba"
# The argument our OpenLM hook adds to OpenLM's args (so to the run's params.txt): the model's full config as JSON.
PARAMS_CONFIG_KEY = "mamba_config"

# Fields every model config file must state (the architecture), with their JSON types.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "d_model": int,
    "n_layer": int,
    "vocab_size": int,
    "seq_len": int,
    "d_state": int,
    "d_conv": int,
    "expand": int,
    "dt_rank": (int, str),
    "rms_norm": bool,
    "residual_in_fp32": bool,
    "fused_add_norm": bool,
    "norm_epsilon": (int, float),
    "pad_vocab_size_multiple": int,
    "tie_embeddings": bool,
}

# Optional fields (initialisation recipe and rarely changed details), with their defaults.
_OPTIONAL: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "conv_bias": (bool, True),
    "bias": (bool, False),
    "dt_min": ((int, float), 1e-3),
    "dt_max": ((int, float), 1e-1),
    "dt_init_floor": ((int, float), 1e-4),
    "dt_scale": ((int, float), 1.0),
    "dt_init": (str, "random"),
    "initializer_range": ((int, float), 0.02),
    "rescale_prenorm_residual": (bool, True),
}

_POSITIVE_INTS = (
    "d_model",
    "n_layer",
    "vocab_size",
    "seq_len",
    "d_state",
    "d_conv",
    "expand",
    "pad_vocab_size_multiple",
)


class ConfigError(ValueError):
    """A model config is unreadable or invalid; the message names the source and the field."""


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(t, t.__name__)


def _is_instance(value: Any, t: type | tuple[type, ...]) -> bool:
    types = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
        return False
    return isinstance(value, types)


def config_dir() -> Path:
    """The directory holding the shipped model configs (inside the wheel, or the source tree)."""
    try:
        from importlib.resources import files

        path = Path(str(files("openlm_mamba.model_configs")))
        if path.is_dir() and any(path.glob("*.json")):
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "model_configs"


def available_configs() -> list[str]:
    """Names of the model configs shipped with the package."""
    return sorted(p.stem for p in config_dir().glob("*.json"))


def is_mamba_config(data: Any) -> bool:
    """True when a loaded JSON object is marked as one of our Mamba configs."""
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


@dataclass(frozen=True)
class MambaConfig:
    """Architecture of a Mamba-1 language model (fields as in the JSON files of `model_configs/`)."""

    d_model: int
    n_layer: int
    vocab_size: int
    seq_len: int = 2048
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    norm_epsilon: float = 1e-5
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    dt_init: str = "random"
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        _validate(dataclasses.asdict(self), source=f"MambaConfig({self.name})", require_all=False)

    # ----------------------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        """dt_rank as an int ("auto" means ceil(d_model / 16))."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def num_parameters(self) -> int:
        """Parameter count of `MambaLM` built from this config (tied weights counted once)."""
        d, di, n, r = self.d_model, self.d_inner, self.d_state, self.dt_rank_value
        per_layer = (
            d * 2 * di * 1
            + (2 * di if self.bias else 0)
            + di * self.d_conv
            + (di if self.conv_bias else 0)
            + di * (r + 2 * n)
            + r * di
            + di
            + di * n
            + di
            + di * d
            + (d if self.bias else 0)
            + d * (1 if self.rms_norm else 2)
        )
        emb = self.padded_vocab_size * d
        head = 0 if self.tie_embeddings else emb
        final_norm = d * (1 if self.rms_norm else 2)
        return self.n_layer * per_layer + emb + head + final_norm

    def flops_per_token(self) -> int:
        """Approximate training FLOPs per token (6 x matmul parameters + scan), for throughput math."""
        d, di, n = self.d_model, self.d_inner, self.d_state
        matmul = self.num_parameters() - self.padded_vocab_size * d * (0 if self.tie_embeddings else 1)
        scan = self.n_layer * di * n * 9  # fwd ~3 mults per state element, bwd ~2x that
        return 6 * matmul + scan

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this config (what `save` writes)."""
        data = {"model_type": MODEL_TYPE}
        data.update({k: v for k, v in dataclasses.asdict(self).items() if k != "name"})
        return data

    def save(self, path: str | Path) -> None:
        """Write this config to ``path`` as a JSON model config (``MambaConfig.load`` reads it back)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> MambaConfig:
        """A copy with the given fields changed (the config is frozen), validated like a new one."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", require_all: bool = True) -> MambaConfig:
        """Validate a JSON-like dict; errors name `source` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        marker = data.pop("model_type", None)
        if marker is not None and marker != MODEL_TYPE:
            raise ConfigError(f'{source}: model_type must be "{MODEL_TYPE}", got {marker!r}')
        _validate(data, source, require_all=require_all)
        name = data.pop("name", None)
        if not isinstance(name, str) or not name:
            name = Path(source).stem if source.endswith(".json") else source
        return cls(**data, name=name)

    @classmethod
    def load(cls, name_or_path: str | Path) -> MambaConfig:
        """Load a config by registered name (e.g. "mamba_7b") or from a path to a JSON file."""
        if isinstance(name_or_path, dict):
            raise ConfigError(
                "MambaConfig.load takes a config name or a JSON path; for a dict of fields use "
                "MambaConfig.from_dict(d) (checked like a JSON file) or MambaConfig(**d)"
            )
        text = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else str(name_or_path)
        path = Path(text)
        if not text.endswith(".json") and not path.is_file():  # a name, even beside a directory called so
            candidate = config_dir() / f"{text}.json"
            if not candidate.exists():
                known = ", ".join(available_configs())
                raise ConfigError(f"unknown model config {text!r}: not a file and not one of: {known}")
            path = candidate
        try:
            raw = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read model config ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"{path}: not a JSON model config (binary data: a checkpoint? `openlm-mamba info` shows a "
                "checkpoint's config)"
            ) from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if isinstance(data, dict) and "model_type" not in data:
            raise ConfigError(f'{path}: missing field "model_type" (expected "{MODEL_TYPE}")')
        return cls.from_dict(data, source=str(path))


def _validate(data: dict[str, Any], source: str, require_all: bool) -> None:
    known = set(_REQUIRED) | set(_OPTIONAL) | {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field {unknown[0]!r} (known fields: {', '.join(sorted(known - {'name'}))})"
        )
    if require_all:
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing field {missing[0]!r} (expected {_type_name(_REQUIRED[missing[0]])})")
    types = dict(_REQUIRED)
    types.update({k: t for k, (t, _) in _OPTIONAL.items()})
    for key, value in data.items():
        if key == "name":
            continue
        if not _is_instance(value, types[key]):
            raise ConfigError(f"{source}: {key} must be {_type_name(types[key])}, got {value!r}")
    for key in _POSITIVE_INTS:
        if key in data and data[key] <= 0:
            raise ConfigError(f"{source}: {key} must be a positive int, got {data[key]!r}")
    rank = data.get("dt_rank", "auto")
    if isinstance(rank, str) and rank != "auto":
        raise ConfigError(f'{source}: dt_rank must be a positive int or "auto", got {rank!r}')
    if isinstance(rank, int) and rank <= 0:
        raise ConfigError(f'{source}: dt_rank must be a positive int or "auto", got {rank!r}')
    if "norm_epsilon" in data and not 0 < data["norm_epsilon"] < math.inf:
        raise ConfigError(f"{source}: norm_epsilon must be a finite number > 0, got {data['norm_epsilon']!r}")
    for key in ("initializer_range", "dt_scale", "dt_init_floor"):
        if key in data and not 0 <= data[key] < math.inf:
            raise ConfigError(f"{source}: {key} must be a finite number >= 0, got {data[key]!r}")
    if "d_conv" in data and not 2 <= data["d_conv"] <= 4:
        raise ConfigError(f"{source}: d_conv must be 2, 3 or 4, got {data['d_conv']!r}")
    if data.get("dt_init", "random") not in ("random", "constant"):
        raise ConfigError(f'{source}: dt_init must be "random" or "constant", got {data["dt_init"]!r}')
    dt_min, dt_max = data.get("dt_min", 1e-3), data.get("dt_max", 1e-1)
    if not 0 < dt_min <= dt_max < math.inf:
        raise ConfigError(f"{source}: dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min!r}, {dt_max!r}")
