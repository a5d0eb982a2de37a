"""Checkpoint interop: upstream OpenLM, HF transformers ``MambaForCausalLM`` and mamba_ssm formats.

``convert(src, dst, to=...)`` streams tensor by tensor (safetensors read lazily, ``.pt``/``.bin`` mmapped),
writes to a temporary name beside ``dst`` and moves it into place only when complete.
``load_model(path)`` builds a ``MambaLM`` from any of the three formats.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, MambaConfig
from ..model import LMHead, MambaLM
from .common import (
    ARCH_FIELDS,
    TOKENIZER_FILES,
    BackgroundChecks,
    ConversionError,
    TensorSource,
    atomic_output,
    check_destination,
    check_tensors,
    compare_configs,
    describe_file,
    entries,
    expected_shapes,
    parse_size,
    read_json,
    remove_stale_partials,
)
from .hf import config_from_hf, hf_config, hf_extras, is_hf_dir, read_hf, to_transformers, write_hf, writes_hf_file
from .mamba_ssm import (
    config_from_mamba_ssm,
    is_mamba_ssm_dir,
    mamba_ssm_config,
    read_mamba_ssm,
    write_mamba_ssm,
    writes_mamba_ssm_file,
)
from .openlm import FoundConfig, openlm_checkpoint, openlm_config, read_openlm, write_openlm

FORMATS = ("openlm", "hf", "mamba_ssm")
DEFAULT_SHARD_SIZE = "5GB"

__all__ = [
    "FORMATS",
    "Checkpoint",
    "ConversionError",
    "config_from_hf",
    "config_from_mamba_ssm",
    "convert",
    "detect_format",
    "hf_config",
    "load_model",
    "load_state_dict",
    "mamba_ssm_config",
    "openlm_checkpoint",
    "read_checkpoint",
    "to_transformers",
]


def detect_format(path: str | Path) -> str:
    """ "openlm" (a .pt file or a dir with epoch_N.pt), "hf" or "mamba_ssm" (a dir with config.json)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_file():
        _check_checkpoint_file(path)
        return "openlm"
    if (path / "config.json").is_file():
        read_json(path / "config.json", "config.json")  # unreadable JSON: say so, with line and column
    if is_hf_dir(path):
        return "hf"
    if is_mamba_ssm_dir(path):
        return "mamba_ssm"
    if (path / "config.json").is_file():
        raise ConversionError(
            f"{path / 'config.json'}: neither an HF Mamba config (hidden_size) nor a mamba_ssm config (d_model, n_layer)"
        )
    return "openlm"


def _check_checkpoint_file(path: Path) -> None:
    """Raise a ConversionError saying what ``path`` is when it is a JSON, safetensors, text or empty file, not a
    ``.pt``."""
    kind = describe_file(path)
    folder = path.parent
    what = "HF" if is_hf_dir(folder) else "mamba_ssm" if is_mamba_ssm_dir(folder) else None
    if what is not None and (kind is not None or path.suffix in (".bin", ".safetensors")):
        if path.name.endswith(".index.json"):
            part = "the weight index"
        elif path.name == "config.json":
            part = "the config"
        elif path.suffix in (".bin", ".safetensors"):
            part = "the weights file"
        else:
            part = kind
        raise ConversionError(f"{path}: {part} of the {what} checkpoint {folder}: pass its directory {folder}")
    if kind is None:
        return
    raise ConversionError(
        f"{path}: {kind}, not an OpenLM checkpoint (an HF or mamba_ssm checkpoint is a directory holding "
        "config.json and the weights: pass that directory)"
    )


@dataclass
class Checkpoint:
    """A checkpoint opened for reading: its format, resolved config and lazy tensors (canonical keys), and
    ``path``, what was read (the ``.pt`` file of an OpenLM checkpoint, the directory of the others).
    ``found``: for an OpenLM checkpoint, the config found with it (embedded, or from its run's params.txt)."""

    format: str
    config: MambaConfig
    source: TensorSource
    path: Path
    found: FoundConfig | None = None

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_path(value: object, name: str, caller: str) -> None:
    """TypeError naming argument ``name`` of ``caller`` unless ``value`` is a path (str or os.PathLike)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{caller}: {name} must be a checkpoint path (str or os.PathLike: an OpenLM .pt or run directory, an HF "
            f"or mamba_ssm directory), got {type(value).__name__}"
        )


def _load_config(model: MambaConfig | str | Path | None) -> MambaConfig | None:
    if model is None or isinstance(model, MambaConfig):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a MambaConfig, a shipped config name or a JSON config path (or None), "
            f"got {type(model).__name__}"
        )
    try:
        return MambaConfig.load(model)
    except ConfigError as e:
        raise ConversionError(f"--model: {e}") from None


def read_checkpoint(
    path: str | Path, model: MambaConfig | str | Path | None = None, seq_len: int | None = None
) -> Checkpoint:
    """Open a checkpoint of any supported format and check it against its config (and ``model``, if given).

    The architecture comes from the source's own config; for a bare OpenLM state dict without one it is
    inferred from tensor shapes. A ``model`` config that disagrees raises a field-by-field error (for an OpenLM
    run whose params.txt only names a config, on the fields tensor shapes show; ``model`` then wins).
    """
    path = Path(path)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise ConversionError(f"seq_len (--seq-len) must be a positive int, got {seq_len!r}")
    fmt = detect_format(path)
    wanted = _load_config(model)
    length = seq_len or (wanted.seq_len if wanted else 2048)
    fields, found_name, location, found = ARCH_FIELDS, str(path), path, None
    if fmt == "hf":
        cfg, source = read_hf(path, length)
    elif fmt == "mamba_ssm":
        cfg, source = read_mamba_ssm(path, length)
    else:
        found, source, location = read_openlm(path)
        try:
            cfg, found_name, fields = openlm_config(found, source, location, wanted)
        except BaseException:
            source.close()
            raise
    try:
        if wanted is not None:
            label = f"--model {model}" if isinstance(model, (str, Path)) else f"--model {wanted.name}"
            compare_configs(cfg, wanted, found_name, label, fields)
            if cfg.vocab_size < cfg.padded_vocab_size and wanted.vocab_size != cfg.vocab_size:
                # the source records which of its rows are padding: --model must not move that line silently
                raise ConversionError(
                    f"architecture mismatch between {found_name} and {label}:\n  vocab_size: {found_name} has "
                    f"{cfg.vocab_size!r}, {label} has {wanted.vocab_size!r} (both pad to {cfg.padded_vocab_size} "
                    "rows; the rows past vocab_size are never generated)"
                )
            if wanted.padded_vocab_size == cfg.padded_vocab_size:
                cfg = wanted
        if seq_len is not None and cfg.seq_len != seq_len:
            cfg = cfg.replace(seq_len=seq_len)
        check_tensors(source, cfg)
    except BaseException:
        source.close()
        raise
    return Checkpoint(fmt, cfg, source, location, found)


def _progress(total: int, desc: str, enabled: bool):
    """A byte progress bar on stderr: cleared at the end on a terminal, else left showing its final state."""
    from tqdm.auto import tqdm

    try:
        interactive = sys.stderr.isatty()
    except (AttributeError, ValueError):
        interactive = False
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=not interactive,
        mininterval=0.1 if interactive else 10.0,  # a log file gets few updates
    )


def _caster(source: TensorSource, dtype: torch.dtype | None):
    def dtype_of(key: str) -> torch.dtype:
        d = source.tensors[key].dtype
        return dtype if dtype is not None and d.is_floating_point else d

    def fetch(key: str) -> torch.Tensor:  # integrity checked by the caller once the bytes are written
        t = source.get(key, check=False)
        want = dtype_of(key)
        if t.dtype == want:
            return t
        out = t.to(want)
        if want.is_floating_point and torch.finfo(want).max < torch.finfo(t.dtype).max:
            lost = torch.isinf(out) & torch.isfinite(t)  # finite weights past the new dtype's range
            if bool(lost.any()):
                big = float(t[lost].abs().max())
                raise ConversionError(
                    f"{key}: holds values up to {big:.4g}, beyond {str(want).replace('torch.', '')}'s range "
                    f"(max {torch.finfo(want).max:.4g}); they would become inf: convert to bfloat16 or float32"
                )
        return out

    return fetch, dtype_of


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype=`` checked: None, one of the names in ``_DTYPES`` or the torch.dtype one of them names."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConversionError(
        f"dtype must be one of {', '.join(_DTYPES)} or the torch dtype one of them names, got {dtype!r}"
    )


# per output format: what the output is made of (a file: None; a directory: which file names it holds), and
# the config.json writer, which raises a ConversionError for a model the format cannot represent
_OUTPUTS = {
    "openlm": (None, None),
    "hf": (writes_hf_file, hf_config),
    "mamba_ssm": (writes_mamba_ssm_file, mamba_ssm_config),
}


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    model: MambaConfig | str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    seq_len: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the checkpoint at ``src`` to format ``to`` ("openlm", "hf", "mamba_ssm") at ``dst``.

    ``dst`` is a directory for "hf" / "mamba_ssm" and a ``.pt`` file for "openlm". ``dtype`` casts floating
    tensors; HF outputs above ``shard_size`` are sharded with an index. Nothing is left at ``dst`` if anything fails.
    ``overwrite`` replaces an existing ``dst`` holding only what such a conversion writes (its tokenizer files are
    carried over); a ``dst`` that is or holds a file the conversion reads is refused (except the source itself).
    """
    _check_path(src, "src", "convert")
    if not isinstance(dst, (str, os.PathLike)):
        raise TypeError(f"convert: dst must be the output path (str or os.PathLike), got {type(dst).__name__}")
    if to not in FORMATS:
        raise ConversionError(f"unknown target format {to!r} (to= / --to): expected one of {', '.join(FORMATS)}")
    dst = Path(dst)
    if to == "openlm" and dst.suffix not in (".pt", ".pth"):
        raise ConversionError(
            f"{dst}: an OpenLM checkpoint is a file; give a path ending in .pt (e.g. {dst / 'epoch_0.pt'})"
        )
    cast = _dtype(dtype)
    limit = parse_size(shard_size)
    if limit <= 0:
        raise ConversionError(f"shard size must be positive, got {shard_size!r}")
    writes, output_config = _OUTPUTS[to]
    # a killed --overwrite's old output goes back first, to be checked as the rest: before the source is read, which
    # may be that very output (in place: convert hf_dir hf_dir --overwrite), or an earlier such conversion's
    remove_stale_partials(dst)
    if not os.path.lexists(src):
        remove_stale_partials(Path(src))
    with read_checkpoint(src, model, seq_len) as ckpt:
        source, cfg = ckpt.source, ckpt.config
        if output_config is not None:
            output_config(cfg)  # a model the format cannot represent: refused before anything is written
        before = entries(dst)  # what --overwrite may replace: anything that appears after this is kept
        carry = check_destination(
            dst, to=to, writes=writes, source=ckpt.path, source_files=source.files, overwrite=overwrite
        )
        order = [k for k in expected_shapes(cfg) if k in source.tensors]
        source.tensors = {k: source.tensors[k] for k in order}
        fetch, dtype_of = _caster(source, cast)
        total = sum(math.prod(source.tensors[k].shape) * dtype_of(k).itemsize for k in order)  # bytes out
        with (
            atomic_output(dst, overwrite, carry, before) as tmp,
            _progress(total, f"convert -> {to}", progress) as bar,
            BackgroundChecks(source) as checks,
        ):
            # Each tensor's stored bytes are checked (CRC32 for .pt sources) after it is written and before the
            # output is moved into place: checking an mmapped tensor before writing it made writing several times
            # slower (3 GB to HF: 1.7 s -> 7 s); on a worker thread the check overlaps the writing instead.
            if to == "hf":

                def written(key: str, nbytes: int) -> None:
                    checks.submit(key)
                    bar.update(nbytes)

                carried = hf_extras(Path(ckpt.path), ckpt.format == "hf") if Path(ckpt.path).is_dir() else None
                write_hf(source, cfg, tmp, limit, fetch, dtype_of, written, carried)
                checks.wait()
            else:
                state = {key: fetch(key) for key in order}
                if cfg.tie_embeddings:
                    state["lm_head.weight"] = state["backbone.embedding.weight"]
                if to == "openlm":
                    write_openlm(state, cfg, tmp)
                else:
                    write_mamba_ssm(state, cfg, tmp)
                bar.update(total)  # one torch.save writes every byte: the bar moves once it has
                del state
                for key in order:
                    source.check(key)
            if writes is not None and Path(ckpt.path).is_dir() and not set(carry) & _OWN_TOKENIZER:
                # directory to directory: the tokenizer goes along (an --overwrite destination's own, carried as a
                # whole instead, wins: never a mix of two tokenizers' files)
                for name in sorted(TOKENIZER_FILES):
                    if (Path(ckpt.path) / name).is_file() and not (tmp / name).exists():
                        shutil.copy2(Path(ckpt.path) / name, tmp / name)
    return dst


_OWN_TOKENIZER = frozenset({"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"})


def check_checkpoint(path: str | Path, model: MambaConfig | str | Path | None = None) -> None:
    """Raise ConversionError unless ``path`` is a readable checkpoint (matching ``model``, if given). Cheap: the
    tensors are memory-mapped or read as headers, not loaded."""
    _check_path(path, "path", "check_checkpoint")
    with read_checkpoint(path, model):
        pass


def load_state_dict(
    path: str | Path, model: MambaConfig | str | Path | None = None
) -> tuple[MambaConfig, dict[str, torch.Tensor]]:
    """Config and ``MambaLM`` state dict (keys ``model.*``, tied head included) of any supported checkpoint."""
    _check_path(path, "path", "load_state_dict")
    with read_checkpoint(path, model) as ckpt:
        sd = {"model." + k: ckpt.source.get(k) for k in ckpt.source.tensors}
        if ckpt.config.tie_embeddings:
            sd["model.lm_head.weight"] = sd["model.backbone.embedding.weight"]
        return ckpt.config, sd


def load_model(
    path_or_dir: str | Path,
    model: MambaConfig | str | Path | None = None,
    backend: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> MambaLM:
    """A ``MambaLM`` (eval mode) with the weights of an OpenLM checkpoint, HF directory or mamba_ssm directory.

    ``dtype`` is the model's: float32 by default whatever the checkpoint holds (pass ``torch.bfloat16`` to keep
    a bf16 checkpoint in bf16, as transformers' ``from_pretrained(torch_dtype="auto")`` would)."""
    _check_path(path_or_dir, "path_or_dir", "load_model")
    cast = _dtype(dtype)
    cfg, sd = load_state_dict(path_or_dir, model)
    with torch.device("meta"):
        lm = MambaLM(cfg, backend=backend, dtype=cast)
    lm = lm.to_empty(device=device)
    for module in lm.modules():
        if isinstance(module, LMHead):
            module.reset_parameters()  # re-tie the head to the materialised embedding
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConversionError(
            f"{path_or_dir}: state dict does not fit MambaLM (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return lm.eval()
