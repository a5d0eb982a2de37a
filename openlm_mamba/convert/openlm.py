"""Upstream OpenLM checkpoints: ``epoch_N.pt`` dicts with ``state_dict`` (or bare state dicts), keys ``model.*``."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..config import PARAMS_CONFIG_KEY, ConfigError, MambaConfig
from .common import SHAPE_FIELDS, ConversionError, TensorSource, add_state_dict, infer_config, torch_load

_log = logging.getLogger(__name__)


def from_openlm_key(key: str) -> str | None:
    """``model.backbone...`` -> ``backbone...``; other keys (a mamba_ssm-style dict, or junk) pass unchanged."""
    return key[len("model.") :] if key.startswith("model.") else key


def to_openlm_key(key: str) -> str:
    return "model." + key


def find_checkpoint_file(path: Path) -> Path:
    """``path`` itself, or the latest ``epoch_N.pt`` in ``path`` or ``path/checkpoints``."""
    if path.is_file():
        return path
    for folder in (path, path / "checkpoints"):
        found = [
            (int(m.group(1)), p) for p in folder.glob("epoch_*.pt") if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))
        ]
        if found:
            return max(found)[1]
        if (folder / "epoch_latest.pt").is_file():
            return folder / "epoch_latest.pt"
    raise ConversionError(
        f"{path}: no OpenLM checkpoint found (expected a .pt file, or epoch_N.pt in it or in checkpoints/)"
    )


def _config_from_params(file: Path) -> tuple[MambaConfig | None, bool]:
    """The model config of the OpenLM run that wrote ``file``, from its params.txt (``logs/NAME/params.txt``):
    the full config our hook records there (``mamba_config: {...}``), else the config its ``model:`` line names.
    Returns (config or None, whether it is the recorded full config)."""
    for params in (file.parent / "params.txt", file.parent.parent / "params.txt"):
        if not params.is_file():
            continue
        text = params.read_text(errors="replace")
        m = re.search(rf"^{PARAMS_CONFIG_KEY}: (.+)$", text, re.MULTILINE)
        if m:
            try:
                return MambaConfig.from_dict(json.loads(m.group(1)), source=f"{params} ({PARAMS_CONFIG_KEY})"), True
            except (ValueError, ConfigError):  # a damaged line: fall back to the model name
                pass
        m = re.search(r"^model: (.+)$", text, re.MULTILINE)
        if m:
            try:
                return MambaConfig.load(m.group(1).strip()), False
            except ConfigError:
                return None, False
    return None, False


def _config_for(source: TensorSource, file: Path) -> MambaConfig | None:
    """The config params.txt gives for ``file``, checked against its tensors. A run of a custom JSON that shares
    a shipped config's name (OpenLM records only the name) gets the architecture from the tensor shapes."""
    cfg, recorded = _config_from_params(file)
    if cfg is None or recorded:
        return cfg
    inferred = infer_config(source, base=cfg)
    diffs = [f for f in SHAPE_FIELDS if getattr(inferred, f) != getattr(cfg, f)]
    if diffs:
        _log.warning(
            "%s: its run's params.txt names model %r, whose %s differ from the checkpoint's tensors "
            "(a custom JSON with a shipped config's name?); using the architecture the tensors show",
            file,
            cfg.name,
            ", ".join(f"{f} ({getattr(cfg, f)} vs {getattr(inferred, f)})" for f in diffs),
        )
        return inferred
    return cfg


def read_openlm(path: Path) -> tuple[MambaConfig | None, TensorSource, Path]:
    """Config (embedded by our converter or named in params.txt; None if neither), tensors and the file read."""
    file = find_checkpoint_file(path)
    obj, check = torch_load(file)
    cfg = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        embedded = obj.get("model_config")
        if isinstance(embedded, dict):
            try:
                cfg = MambaConfig.from_dict(embedded, source=f"{file} (model_config)")
            except ConfigError as e:
                raise ConversionError(str(e)) from None
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        what = f"a dict with keys {sorted(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(
            f"{file}: expected an OpenLM checkpoint (a dict with 'state_dict') or a state dict, got {what}"
        )
    source = TensorSource(f"OpenLM checkpoint {file}")
    add_state_dict(source, sd, str(file), from_openlm_key, check)
    if cfg is None:
        try:
            cfg = _config_for(source, file)
        except BaseException:
            source.close()
            raise
    return cfg, source, file


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
