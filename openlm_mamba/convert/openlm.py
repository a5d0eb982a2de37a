"""Upstream OpenLM checkpoints: ``epoch_N.pt`` dicts with ``state_dict`` (or bare state dicts), keys ``model.*``."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import PARAMS_CONFIG_KEY, ConfigError, MambaConfig
from .common import (
    ARCH_FIELDS,
    SHAPE_FIELDS,
    ConversionError,
    TensorSource,
    add_state_dict,
    config_differences,
    infer_config,
    torch_load,
)

_log = logging.getLogger(__name__)


def from_openlm_key(key: str) -> str | None:
    """``model.backbone...`` -> ``backbone...``; other keys (a mamba_ssm-style dict, or junk) pass unchanged."""
    return key[len("model.") :] if key.startswith("model.") else key


def to_openlm_key(key: str) -> str:
    return "model." + key


def find_checkpoint_file(path: Path) -> Path:
    """``path`` itself, or the latest ``epoch_N.pt`` in ``path`` or ``path/checkpoints``."""
    if path.is_file():
        m = re.fullmatch(r"(optimizer|stats)_(\d+)\.pt", path.name)
        if m:
            what = "optimizer state" if m.group(1) == "optimizer" else "training statistics"
            raise ConversionError(
                f"{path}: OpenLM's {what} file, not model weights: pass epoch_{m.group(2)}.pt from the same folder"
            )
        return path
    for folder in (path, path / "checkpoints"):
        found = [
            (int(m.group(1)), p) for p in folder.glob("epoch_*.pt") if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))
        ]
        if found:
            return max(found)[1]
        if (folder / "epoch_latest.pt").is_file():
            return folder / "epoch_latest.pt"
    weights = sorted(
        p.name for p in path.glob("*") if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
    )
    if weights and not (path / "config.json").exists():
        raise ConversionError(
            f"{path}: holds {', '.join(weights[:3])}{' ...' if len(weights) > 3 else ''} but no config.json: an HF or "
            "mamba_ssm checkpoint directory needs its config.json next to the weights"
        )
    raise ConversionError(
        f"{path}: no OpenLM checkpoint found (expected a .pt file, or epoch_N.pt in it or in checkpoints/)"
    )


@dataclass(frozen=True)
class FoundConfig:
    """The config found with an OpenLM checkpoint: ``exact`` when every field was recorded (the ``model_config``
    our converter embeds, the ``mamba_config`` line our hook adds to params.txt), else a hint (the config
    params.txt's ``model:`` line names: a custom JSON may have shared its name, so only shapes can confirm it).
    ``origin`` names where it came from, for messages."""

    config: MambaConfig
    exact: bool
    origin: str


def _config_from_params(file: Path) -> FoundConfig | None:
    """The model config of the OpenLM run that wrote ``file``, from its params.txt (``logs/NAME/params.txt``):
    the full config our hook records there (``mamba_config: {...}``), else the config its ``model:`` line names."""
    for params in (file.parent / "params.txt", file.parent.parent / "params.txt"):
        if not params.is_file():
            continue
        text = params.read_text(errors="replace")
        m = re.search(rf"^{PARAMS_CONFIG_KEY}: (.+)$", text, re.MULTILINE)
        if m:
            origin = f"{params} ({PARAMS_CONFIG_KEY})"
            try:
                return FoundConfig(MambaConfig.from_dict(json.loads(m.group(1)), source=origin), True, origin)
            except (ValueError, ConfigError):  # a damaged line: fall back to the model name
                pass
        m = re.search(r"^model: (.+)$", text, re.MULTILINE)
        if m:
            name = m.group(1).strip()
            try:
                return FoundConfig(MambaConfig.load(name), False, f"{params} names {name}")
            except ConfigError:
                return None
    return None


_WARNED_UNRECORDED: set[tuple] = set()


def _file_identity(file: Path) -> tuple:
    """The file and its version: a checkpoint rewritten at the same path is another one."""
    try:
        st = file.stat()
    except OSError:
        return (str(file),)
    return (str(file.resolve()), st.st_mtime_ns, st.st_size)


def openlm_config(
    found: FoundConfig | None, source: TensorSource, file: Path, wanted: MambaConfig | None
) -> tuple[MambaConfig, str, tuple[str, ...]]:
    """The config of OpenLM checkpoint ``file``, the name to give it in a mismatch error and the fields a
    ``wanted`` (``--model``) config must match (then ``wanted`` supplies the others).

    An exact config is used as is, all architecture fields compared. Otherwise the tensors' shapes decide: a
    ``wanted`` config is compared on the fields shapes show; without one, the params.txt hint is used when its
    shapes fit, else the shapes are (with a warning: the fields they cannot tell are then the hint's)."""
    if found is not None and found.exact:
        return found.config, found.origin, ARCH_FIELDS
    shapes = f"{file} (its tensor shapes{'; ' + found.origin if found else ''})"
    seen = _file_identity(file)
    if found is None and wanted is None and seen not in _WARNED_UNRECORDED:
        _WARNED_UNRECORDED.add(seen)  # once per file version (a command may read a checkpoint twice)
        _log.warning(
            "%s: no config recorded with it (no embedded model_config, no usable params.txt beside its run): the "
            "architecture comes from its tensor shapes, and the fields shapes cannot show (norm_epsilon, "
            "residual_in_fp32, ...) take MambaConfig's defaults: pass --model with the config it was trained with "
            "if it used others",
            file,
        )
    if found is None or wanted is not None:
        return infer_config(source, base=wanted), shapes, SHAPE_FIELDS
    inferred = infer_config(source, base=found.config)
    diffs = config_differences(found.config, inferred, SHAPE_FIELDS)
    if not diffs:
        return found.config, found.origin, SHAPE_FIELDS
    _log.warning(
        "%s: its run's params.txt names model %r, whose %s differ from the checkpoint's tensors "
        "(a custom JSON with a shipped config's name?); using the architecture the tensors show, with the fields "
        "shapes cannot tell (norm_epsilon, residual_in_fp32) from %r: pass --model with the run's config to set them",
        file,
        found.config.name,
        ", ".join(f"{label} ({a} vs {b})" for label, a, b in diffs),
        found.config.name,
    )
    return inferred, shapes, SHAPE_FIELDS


def read_openlm(path: Path) -> tuple[FoundConfig | None, TensorSource, Path]:
    """The config found with the OpenLM checkpoint at ``path`` (embedded by our converter or from its run's
    params.txt; None if neither), its tensors and the file read (``path``, or a directory's latest epoch_N.pt).
    ``path`` may also be an ``--averagers`` file (``ema_0.99_N.pt``, ``poly_*.pt``): its averaged weights."""
    file = find_checkpoint_file(path)
    obj, check = torch_load(file)
    found = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        embedded = obj.get("model_config")
        if isinstance(embedded, dict):
            origin = f"{file} (model_config)"
            try:
                found = FoundConfig(MambaConfig.from_dict(embedded, source=origin), True, origin)
            except ConfigError as e:
                raise ConversionError(str(e)) from None
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    elif isinstance(obj, dict) and isinstance(obj.get("av_model_sd"), dict):  # an --averagers file (ema_*.pt)
        sd = obj["av_model_sd"]
    else:
        what = f"a dict with keys {sorted(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(
            f"{file}: expected an OpenLM checkpoint (a dict with 'state_dict') or a state dict, got {what}"
        )
    source = TensorSource(f"OpenLM checkpoint {file}")
    add_state_dict(source, sd, file, from_openlm_key, check)
    return found or _config_from_params(file), source, file


def openlm_checkpoint(
    state_dict: dict[str, torch.Tensor], cfg: MambaConfig, epoch: int = 0, step: int = 0
) -> dict[str, Any]:
    """An epoch-style checkpoint dict that ``open_lm.main --pretrained`` and ``--resume`` accept.

    ``state_dict`` has canonical keys; a tied lm_head must be the embedding tensor itself.
    """
    return {
        "epoch": epoch,
        "step": step,
        "name": f"converted-{cfg.name}",
        "state_dict": {to_openlm_key(k): v for k, v in state_dict.items()},
        "model_config": cfg.to_dict(),
    }


def write_openlm(state_dict: dict[str, torch.Tensor], cfg: MambaConfig, out: Path) -> None:
    torch.save(openlm_checkpoint(state_dict, cfg), out)
