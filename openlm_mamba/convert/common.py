"""Shared pieces of the checkpoint converters: canonical key names, lazy tensor sources, shape checks,
streaming safetensors writing and atomic output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MambaConfig


class ConversionError(ValueError):
    """A checkpoint cannot be read, does not match its config, or cannot be written."""


# --------------------------------------------------------------------------------------------------
# Canonical names: mamba_ssm's MambaLMHeadModel keys (``backbone.embedding.weight``, ``lm_head.weight`` ...).
# OpenLM adds a leading ``model.``; HF transformers spells the embedding ``backbone.embeddings``.

_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")

MIXER_TENSORS = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
    "out_proj.bias",
)


def strip_wrappers(key: str) -> str:
    """Drop DDP (``module.``), torch.compile (``_orig_mod.``) and FSDP wrapper segments from a key."""
    previous = None
    while previous != key:
        previous = key
        key = _WRAPPER_SEGMENTS.sub("", key, count=1)
        key = key.lstrip(".")
    return key


def expected_shapes(cfg: MambaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical key -> tensor shape of every tensor a checkpoint of ``cfg`` holds (lm_head only if untied)."""
    d, di, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank_value, cfg.d_conv
    shapes: dict[str, tuple[int, ...]] = {"backbone.embedding.weight": (cfg.padded_vocab_size, d)}
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        shapes[p + "mixer.in_proj.weight"] = (2 * di, d)
        if cfg.bias:
            shapes[p + "mixer.in_proj.bias"] = (2 * di,)
        shapes[p + "mixer.conv1d.weight"] = (di, 1, k)
        if cfg.conv_bias:
            shapes[p + "mixer.conv1d.bias"] = (di,)
        shapes[p + "mixer.x_proj.weight"] = (r + 2 * n, di)
        shapes[p + "mixer.dt_proj.weight"] = (di, r)
        shapes[p + "mixer.dt_proj.bias"] = (di,)
        shapes[p + "mixer.A_log"] = (di, n)
        shapes[p + "mixer.D"] = (di,)
        shapes[p + "mixer.out_proj.weight"] = (d, di)
        if cfg.bias:
            shapes[p + "mixer.out_proj.bias"] = (d,)
        shapes[p + "norm.weight"] = (d,)
        if not cfg.rms_norm:
            shapes[p + "norm.bias"] = (d,)
    shapes["backbone.norm_f.weight"] = (d,)
    if not cfg.rms_norm:
        shapes["backbone.norm_f.bias"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.padded_vocab_size, d)
    return shapes


# --------------------------------------------------------------------------------------------------
@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class TensorSource:
    """Canonical key -> lazily loaded tensor, read from one or more checkpoint files."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.tensors: dict[str, TensorInfo] = {}
        self._closers: list[Callable[[], None]] = []

    def add(self, key: str, info: TensorInfo, origin: str) -> None:
        if key in self.tensors:
            raise ConversionError(f"{origin}: tensor {key!r} appears twice in {self.description}")
        self.tensors[key] = info

    def get(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        try:
            t = info.load()
        except ConversionError:
            raise
        except Exception as e:  # a truncated / corrupted file surfaces here when the bytes are read
            raise ConversionError(f"{self.description}: cannot read tensor {key!r}: {e}") from None
        if tuple(t.shape) != info.shape:
            raise ConversionError(
                f"{self.description}: tensor {key!r} has shape {tuple(t.shape)}, header says {info.shape}"
            )
        return t

    def total_bytes(self, keys: list[str] | None = None) -> int:
        return sum(self.tensors[k].nbytes for k in (keys if keys is not None else self.tensors))

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in self._closers:
            with contextlib.suppress(Exception):
                fn()
        self._closers.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_state_dict(
    source: TensorSource, state_dict: dict[str, Any], origin: str, rename: Callable[[str], str | None]
) -> None:
    """Add the tensors of an in-memory (or mmapped) state dict under canonical names (``rename`` -> None skips)."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = rename(strip_wrappers(key))
        if name is None:
            continue
        source.add(name, TensorInfo(tuple(value.shape), value.dtype, (lambda v=value: v)), origin)


def add_safetensors_file(
    source: TensorSource, path: Path, rename: Callable[[str], str | None], only: set[str] | None = None
) -> None:
    """Add the tensors of one ``.safetensors`` file, read lazily with ``safe_open``."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        handle.__enter__()
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except Exception as e:
        raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    source.on_close(lambda: handle.__exit__(None, None, None))
    names = list(handle.keys())  # safe_open handles are not iterable
    for key in names:
        if only is not None and key not in only:
            continue
        name = rename(strip_wrappers(key))
        if name is None:
            continue
        sl = handle.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {sl.get_dtype()}")
        source.add(name, TensorInfo(tuple(sl.get_shape()), dtype, (lambda k=key: handle.get_tensor(k))), str(path))


def torch_load(path: Path) -> Any:
    """``torch.load`` with mmap (falls back to a plain load for legacy files); errors become ConversionError."""
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as first:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise ConversionError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): {first}"
            ) from None


# --------------------------------------------------------------------------------------------------
# Config inference / comparison

ARCH_FIELDS = (
    "d_model",
    "n_layer",
    "padded_vocab_size",
    "d_state",
    "d_conv",
    "expand",
    "dt_rank_value",
    "rms_norm",
    "residual_in_fp32",
    "fused_add_norm",
    "norm_epsilon",
    "tie_embeddings",
    "conv_bias",
    "bias",
)

# fields a bare state dict's shapes determine
SHAPE_FIELDS = (
    "d_model",
    "n_layer",
    "padded_vocab_size",
    "d_state",
    "d_conv",
    "expand",
    "dt_rank_value",
    "rms_norm",
    "tie_embeddings",
    "conv_bias",
    "bias",
)


def infer_config(source: TensorSource, base: MambaConfig | None = None) -> MambaConfig:
    """Architecture from tensor shapes (fields shapes cannot tell come from ``base`` or the defaults)."""
    t = source.tensors
    if "backbone.embedding.weight" not in t:
        raise ConversionError(
            f"{source.description}: no embedding tensor (backbone.embedding.weight); is this a Mamba LM checkpoint?"
        )
    vocab, d = t["backbone.embedding.weight"].shape
    layers = {int(m.group(1)) for k in t if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
    if not layers:
        raise ConversionError(f"{source.description}: no backbone.layers.* tensors found")
    p = "backbone.layers.0.mixer."
    try:
        di, n = t[p + "A_log"].shape
        k = t[p + "conv1d.weight"].shape[-1]
        r = t[p + "dt_proj.weight"].shape[1]
    except KeyError as e:
        raise ConversionError(f"{source.description}: missing tensor {e.args[0]!r}") from None
    if di % d:
        raise ConversionError(f"{source.description}: d_inner {di} is not a multiple of d_model {d}")
    fields: dict[str, Any] = dict(
        d_model=d,
        n_layer=max(layers) + 1,
        vocab_size=vocab,
        d_state=n,
        d_conv=k,
        expand=di // d,
        dt_rank=r,
        rms_norm="backbone.norm_f.bias" not in t,
        tie_embeddings=_head_is_tied(source),
        conv_bias=p + "conv1d.bias" in t,
        bias=p + "in_proj.bias" in t,
        pad_vocab_size_multiple=1,
    )
    if base is not None:
        keep = {f: getattr(base, f) for f in ("seq_len", "residual_in_fp32", "fused_add_norm", "norm_epsilon")}
        if base.padded_vocab_size == vocab:
            keep.update(vocab_size=base.vocab_size, pad_vocab_size_multiple=base.pad_vocab_size_multiple)
            fields.pop("vocab_size")
            fields.pop("pad_vocab_size_multiple")
        init = (
            "dt_min",
            "dt_max",
            "dt_init_floor",
            "dt_scale",
            "dt_init",
            "initializer_range",
            "rescale_prenorm_residual",
        )
        keep.update({f: getattr(base, f) for f in init})
        fields.update(keep)
        return MambaConfig(**fields, name=base.name)
    if vocab % 8 == 0:
        fields["pad_vocab_size_multiple"] = 8
    return MambaConfig(**fields, name="inferred")


def _head_is_tied(source: TensorSource) -> bool:
    """No lm_head tensor, or one that is (or equals) the embedding."""
    if "lm_head.weight" not in source.tensors:
        return True
    head, emb = source.get("lm_head.weight"), source.get("backbone.embedding.weight")
    if head.shape != emb.shape or head.dtype != emb.dtype:
        return False
    return head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)


def compare_configs(
    found: MambaConfig, wanted: MambaConfig, found_name: str, wanted_name: str, fields: tuple[str, ...] = ARCH_FIELDS
) -> None:
    """Raise a ConversionError listing every architecture field on which the two configs differ."""
    diffs = []
    for f in fields:
        a, b = getattr(found, f), getattr(wanted, f)
        if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-12 * max(abs(a), abs(b))):
            label = {"padded_vocab_size": "vocab_size (padded)", "dt_rank_value": "dt_rank"}.get(f, f)
            diffs.append(f"  {label}: {found_name} has {a!r}, {wanted_name} has {b!r}")
    if diffs:
        raise ConversionError(f"architecture mismatch between {found_name} and {wanted_name}:\n" + "\n".join(diffs))


def check_tensors(source: TensorSource, cfg: MambaConfig) -> None:
    """Every tensor ``cfg`` needs is present with the right shape, and nothing else is (tied heads allowed)."""
    want = expected_shapes(cfg)
    have = dict(source.tensors)
    if cfg.tie_embeddings:
        have.pop("lm_head.weight", None)  # a tied head stored explicitly: we keep the embedding
    problems = []
    missing = [k for k in want if k not in have]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        problems.append(f"missing tensors: {', '.join(missing[:5])}{more}")
    unexpected = [k for k in have if k not in want]
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}{more}")
    for k, shape in want.items():
        if k in have and have[k].shape != shape:
            problems.append(f"{k}: expected shape {shape}, got {have[k].shape}")
    for k, info in have.items():
        if k in want and not info.dtype.is_floating_point:
            problems.append(f"{k}: expected a floating-point tensor, got {info.dtype}")
    if problems:
        shown = problems[:8] + ([f"... {len(problems) - 8} more problems"] if len(problems) > 8 else [])
        raise ConversionError(f"{source.description} does not match the config ({cfg.name}):\n  " + "\n  ".join(shown))
    if cfg.tie_embeddings:
        source.tensors.pop("lm_head.weight", None)


# --------------------------------------------------------------------------------------------------
# safetensors writing, tensor by tensor (the format: 8-byte little-endian header size, JSON header, raw data)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: Path,
    items: list[tuple[str, TensorInfo]],
    fetch: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Write ``items`` (name, info) to ``path``; each tensor is fetched, written and dropped in turn."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, info in items:
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, info in items:
            t = fetch(name)
            if t.dtype != info.dtype or tuple(t.shape) != info.shape:
                raise ConversionError(
                    f"internal: tensor {name!r} is {t.dtype}{tuple(t.shape)}, planned {info.dtype}{info.shape}"
                )
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            if on_tensor is not None:
                on_tensor(info.nbytes)
            del t, data


# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success move it to ``dst``, on any failure remove it."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
    parent = dst.parent if str(dst.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{dst.name}.partial-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise ConversionError(f"internal: nothing was written for {dst}")
        if dst.exists():
            old = parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def dir_config(path: Path) -> dict[str, Any] | None:
    """``path/config.json`` as a dict, or None when it is absent or not a JSON object (format probing)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"10KiB"`` or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"shard size must look like 5GB, 500MB or a number of bytes, got {text!r}")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)
