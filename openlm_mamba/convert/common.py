"""Shared pieces of the checkpoint converters: canonical key names, lazy tensor sources, integrity and
shape checks, streaming safetensors writing and atomic output."""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MambaConfig

_log = logging.getLogger(__name__)


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
    check: Callable[[], None] | None = None  # raises ConversionError when the stored bytes are corrupted

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
        self.files: list[Path] = []  # every file read (weights and index), for the destination checks
        self._closers: list[Callable[[], None]] = []

    def add(self, key: str, info: TensorInfo, origin: str) -> None:
        if key in self.tensors:
            raise ConversionError(f"{origin}: tensor {key!r} appears twice in {self.description}")
        self.tensors[key] = info

    def get(self, key: str, check: bool = True) -> torch.Tensor:
        """Tensor ``key``, its stored bytes verified unless ``check=False`` (then call ``check(key)`` later)."""
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
        if check:
            self.check(key)
        return t

    def check(self, key: str) -> None:
        """Raise ConversionError if tensor ``key``'s stored bytes fail their file's checksum (if it has one)."""
        info = self.tensors[key]
        if info.check is None:
            return
        try:
            info.check()
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{self.description}: cannot check tensor {key!r}: {e}") from None

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


class BackgroundChecks:
    """``TensorSource.check`` of tensors already used, run on a worker thread so that it overlaps the writing.

    ``submit(key)`` queues a check (and raises the failure of any finished one); ``wait()`` raises the first
    failure of all. Used as a context manager, pending checks are dropped when the block fails.
    """

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="openlm-mamba-check")
        self.pending: collections.deque[Future[None]] = collections.deque()

    def submit(self, key: str) -> None:
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self.source.check, key))

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def __enter__(self) -> BackgroundChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


TensorCheck = Callable[[str, torch.Tensor], None]


def add_state_dict(
    source: TensorSource,
    state_dict: dict[str, Any],
    origin: Path,
    rename: Callable[[str], str | None],
    check: TensorCheck | None = None,
) -> None:
    """Add the tensors of an in-memory (or mmapped) state dict loaded from file ``origin`` under canonical
    names (``rename`` -> None skips).

    ``check(key, tensor)`` (from ``torch_load``) becomes the tensors' integrity check (``TensorSource.check``).
    """
    source.files.append(origin)
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = rename(strip_wrappers(key))
        if name is None:
            continue
        bound = None if check is None else (lambda k=key, v=value: check(k, v))
        source.add(name, TensorInfo(tuple(value.shape), value.dtype, (lambda v=value: v), bound), str(origin))


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
    source.files.append(path)
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


def torch_load(path: Path) -> tuple[Any, TensorCheck]:
    """``torch.load`` with mmap (falls back to a plain load for legacy files) and a check of the tensors' bytes.

    Returns the loaded object and ``check(key, tensor)``, which raises ConversionError when the zip record
    holding ``tensor`` fails its CRC32 (``torch.load`` does not verify the data records). Errors become
    ConversionError, saying what the file is when it is not a PyTorch checkpoint.
    """
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    failures: list[Exception] = []
    for mmapped in (True, False):
        try:
            obj = torch.load(str(path), map_location="cpu", mmap=mmapped, weights_only=True)
        except Exception as e:
            refused = _refused_global(e)
            if refused is not None:
                raise _unsafe_objects_error(path, refused) from None
            failures.append(e)
            continue
        return obj, _integrity_check(path, obj, mmapped)
    kind = describe_file(path)
    if kind is not None:
        raise ConversionError(f"{path}: {kind}, not a PyTorch checkpoint")
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): {failures[0]}")


def _refused_global(error: Exception) -> str | None:
    """The class or function ``torch.load(weights_only=True)`` refused to unpickle, if that is the failure."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return m.group(1) if m else None


def _unsafe_objects_error(path: Path, refused: str) -> ConversionError:
    """The error for a readable checkpoint holding non-tensor Python objects (after checking its records)."""
    found = _zip_records(path)
    if found and _checksummed(found[0]):
        records, _, structure = found
        _verify_records(path, [*([structure] if structure else []), *records])  # "intact" below is checked
    return ConversionError(
        f"{path}: the file is intact but holds Python objects other than tensors ({refused}), which safe loading "
        "(torch.load(weights_only=True)) refuses to unpickle. If you trust the file, load it with weights_only=False "
        "and save only its weights: torch.save({'state_dict': ckpt['state_dict']}, 'clean.pt')"
    )


def describe_file(path: Path) -> str | None:
    """What a file that is not a ``torch.save`` checkpoint is, from its first bytes ("a safetensors weights
    file", "a JSON file"); None when it looks like neither."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if len(head) > 8:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "a safetensors weights file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if not head:
        return "an empty file"
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither a zip (torch.save) nor a pickle (legacy torch.save)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not a multi-byte character cut at the end of the 4 KB read
                return None
        return "a text file"
    return None


# --------------------------------------------------------------------------------------------------
# Integrity of torch.save (zip) files. torch.load does not check the CRC32 of the data records (with or
# without mmap), so a corrupted file loads as garbage. With mmap, every storage is a slice of one mapping of
# the whole file, so a storage's address minus the mapping's base is its record's offset: the records of
# the tensors actually used are then checked, each once, by TensorSource.check, over the mmapped bytes (no
# copy in memory). When that mapping cannot be established, every data record is checked up front,
# streaming through the file.

_CHUNK = 16 << 20
_DATA_RECORD = re.compile(r"[^/]+/data/[^/]+")


@dataclass(frozen=True)
class _Record:
    name: str
    offset: int  # where the record's bytes start in the file
    size: int
    crc: int


def _zip_records(path: Path) -> tuple[list[_Record], str | None, _Record | None] | None:
    """The ``<archive>/data/<key>`` records, the byteorder and the ``<archive>/data.pkl`` record (the pickled
    structure: keys, shapes, strides, which storage each tensor reads) of a torch.save zip file; None if legacy."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
            records, byteorder, structure = [], None, None
            with zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    is_order = info.filename.endswith("/byteorder") and info.file_size < 16
                    is_structure = info.filename.endswith("/data.pkl")
                    if not (is_order or is_structure or _DATA_RECORD.fullmatch(info.filename)):
                        continue
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise ConversionError(f"{path}: record {info.filename} is compressed (not a torch.save file?)")
                    f.seek(info.header_offset)
                    head = f.read(30)
                    if len(head) < 30 or head[:4] != b"PK\x03\x04":
                        raise ConversionError(f"{path}: the zip header of record {info.filename} is corrupted")
                    name_len, extra_len = struct.unpack("<HH", head[26:30])
                    offset = info.header_offset + 30 + name_len + extra_len
                    if is_order:  # read raw: a file saved without checksums (CRC 0) is still a valid file
                        f.seek(offset)
                        byteorder = f.read(info.file_size).decode(errors="replace")
                    elif is_structure:
                        structure = _Record(info.filename, offset, info.file_size, info.CRC)
                    else:
                        records.append(_Record(info.filename, offset, info.file_size, info.CRC))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as e:
        raise ConversionError(f"{path}: zip directory is unreadable (truncated or corrupted?): {e}") from None
    return records, byteorder, structure


def _checksummed(records: list[_Record]) -> bool:
    """Whether a torch.save file's tensor records carry CRC32s: torch can skip them (every CRC then 0)."""
    return any(r.crc for r in records if r.size)


def _storages(obj: Any) -> dict[int, int]:
    """Address -> size in bytes of every non-empty tensor storage in a loaded checkpoint object."""
    found: dict[int, int] = {}
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
        elif isinstance(item, torch.TypedStorage):
            storage = item.untyped()
        elif isinstance(item, torch.UntypedStorage):
            storage = item
        else:
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple, set, frozenset)):
                stack.extend(item)
            continue
        if storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _map_storages(storages: dict[int, int], records: list[_Record]) -> dict[int, _Record] | None:
    """Storage address -> its record, for storages mmapped from the file; None if they do not line up."""
    present = sorted((r for r in records if r.size), key=lambda r: r.offset)
    if not storages or len(storages) != len(present):
        return None
    base = min(storages) - present[0].offset
    by_offset = {r.offset: r for r in present}
    mapping = {}
    for ptr, nbytes in storages.items():
        record = by_offset.get(ptr - base)
        if record is None or record.size != nbytes:
            return None
        mapping[ptr] = record
    return mapping


def _crc_error(path: Path, record: _Record, got: int, tensor: str | None = None) -> ConversionError:
    what = f"tensor {tensor!r} (record {record.name})" if tensor else f"record {record.name}"
    if record.name.endswith("/data.pkl"):
        what = "the pickled structure (data.pkl record)"
    return ConversionError(
        f"{path}: {what} is corrupted: CRC32 of its {record.size} bytes is {got:08x}, expected {record.crc:08x}"
    )


def _verify_records(path: Path, records: list[_Record]) -> None:
    """Stream each record's bytes from the file and compare their CRC32 with the zip directory's."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        for record in records:
            f.seek(record.offset)
            crc, left = 0, record.size
            while left:
                n = f.readinto(view[: min(left, _CHUNK)])
                if not n:
                    raise ConversionError(f"{path}: record {record.name} is truncated")
                crc = zlib.crc32(view[:n], crc)
                left -= n
            if crc != record.crc:
                raise _crc_error(path, record, crc)


class _MmapCheck:
    """Checks the record holding a tensor (CRC32 of its mmapped bytes), once per record."""

    def __init__(self, path: Path, mapping: dict[int, _Record]) -> None:
        self.path = path
        self.mapping = mapping
        self.verified: set[str] = set()

    def __call__(self, key: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if not storage.nbytes():
            return
        record = self.mapping.get(storage.data_ptr())
        if record is None:  # not a storage of the loaded object: cannot happen, but never skip the check
            _verify_records(self.path, list(self.mapping.values()))
            self.verified.update(r.name for r in self.mapping.values())
            return
        if record.name in self.verified:
            return
        data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        crc = zlib.crc32(data)
        if crc != record.crc:
            raise _crc_error(self.path, record, crc, key)
        self.verified.add(record.name)


def _no_check(key: str, tensor: torch.Tensor) -> None:
    return None


def _integrity_check(path: Path, obj: Any, mmapped: bool) -> TensorCheck:
    found = _zip_records(path)
    if not found or not _checksummed(found[0]):
        return _no_check  # legacy format, saved without checksums, or no tensor data
    records, byteorder, structure = found
    if structure is not None:  # small, and as able as the tensor data to load wrong weights when damaged
        _verify_records(path, [structure])
    # the mmapped bytes are the file's unless torch byteswapped them (big-endian data or machine)
    native = sys.byteorder == "little" and byteorder in (None, "little")
    mapping = _map_storages(_storages(obj), records) if mmapped and native else None
    if mapping is None:
        _verify_records(path, records)
        return _no_check
    return _MmapCheck(path, mapping)


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
    emb = source.get("backbone.embedding.weight")  # first: a damaged shared record is reported as the embedding's
    head = source.get("lm_head.weight")
    if head.shape != emb.shape or head.dtype != emb.dtype:
        return False
    return head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)


def config_differences(
    a: MambaConfig, b: MambaConfig, fields: tuple[str, ...] = ARCH_FIELDS
) -> list[tuple[str, Any, Any]]:
    """(field label, a's value, b's value) for each of ``fields`` on which the configs differ (floats within
    1e-12 relative count as equal)."""
    diffs = []
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if x != y and not (isinstance(x, float) and isinstance(y, float) and abs(x - y) <= 1e-12 * max(abs(x), abs(y))):
            diffs.append(({"padded_vocab_size": "vocab_size (padded)", "dt_rank_value": "dt_rank"}.get(f, f), x, y))
    return diffs


def compare_configs(
    found: MambaConfig, wanted: MambaConfig, found_name: str, wanted_name: str, fields: tuple[str, ...] = ARCH_FIELDS
) -> None:
    """Raise a ConversionError listing every architecture field on which the two configs differ."""
    diffs = [
        f"  {label}: {found_name} has {a!r}, {wanted_name} has {b!r}"
        for label, a, b in config_differences(found, wanted, fields)
    ]
    if diffs:
        raise ConversionError(f"architecture mismatch between {found_name} and {wanted_name}:\n" + "\n".join(diffs))


def check_tensors(source: TensorSource, cfg: MambaConfig) -> None:
    """Every tensor ``cfg`` needs is present with the right shape, and nothing else is (tied heads allowed)."""
    want = expected_shapes(cfg)
    have = dict(source.tensors)
    problems = []
    if cfg.tie_embeddings and "lm_head.weight" in have:  # a tied head stored explicitly: we keep the embedding
        head, emb_shape = have.pop("lm_head.weight"), want["backbone.embedding.weight"]
        if head.shape != emb_shape:
            problems.append(f"lm_head.weight: expected shape {emb_shape} (tied to the embedding), got {head.shape}")
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
    if cfg.tie_embeddings and "lm_head.weight" in source.tensors:
        if not _head_is_tied(source):  # same storage, or equal values: fine
            raise ConversionError(
                f"{source.description}: lm_head.weight differs from the embedding, but the config ties them "
                "(tie_embeddings / tie_word_embeddings true, or absent: true is the default); dropping the stored "
                "head would change the model. If it is a separate output layer, set tie_word_embeddings (HF) or "
                "tie_embeddings (mamba_ssm, OpenLM) to false in the config"
            )
        source.tensors.pop("lm_head.weight")


# --------------------------------------------------------------------------------------------------
# safetensors writing, tensor by tensor (the format: 8-byte little-endian header size, JSON header, raw data)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
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
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Write ``items`` (name, info) to ``path``; each tensor is fetched, written, reported to ``on_tensor(name,
    nbytes)`` and dropped in turn."""
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
                on_tensor(name, info.nbytes)
            del t, data


# --------------------------------------------------------------------------------------------------
# Files a tokenizer (and generation defaults) may leave in a checkpoint directory: an ``--overwrite`` keeps them
# (copies them into the new output) so that ``eval`` / ``generate`` still find the checkpoint's tokenizer.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "added_tokens.json",
        "chat_template.jinja",  # transformers >= 4.47 saves a tokenizer's chat template beside it
        "chat_template.json",
        "spiece.model",
        "generation_config.json",
    }
)


def check_destination(
    dst: Path,
    *,
    to: str,
    writes: Callable[[str], bool] | None,
    source: Path,
    source_files: Sequence[Path],
    overwrite: bool,
) -> tuple[str, ...]:
    """Refuse a destination a conversion must not write to or replace; return the tokenizer files to carry over.

    ``writes(name)`` says whether a conversion to ``to`` writes a file of that name into its output directory
    (None: the output is a single file). ``source`` is the checkpoint read (a file, or an HF / mamba_ssm
    directory) and ``source_files`` the files read from it. Refused, before anything is changed: a destination
    that is or holds a file the conversion reads (except the source itself, converted in place), and, with
    ``overwrite``, a destination of the wrong kind or holding entries the conversion does not write. An output
    written inside a source directory is fine: nothing the conversion reads is replaced.
    """
    target, src = dst.resolve(), source.resolve()
    in_place = target == src and src.is_dir() == (writes is not None)
    if not in_place:
        for path in (source, *source_files):
            if path.resolve() == target or target in path.resolve().parents:
                what = "is" if path.resolve() == target else "holds"
                raise ConversionError(
                    f"{dst}: {what} the source {path}, which writing {dst} would delete; write the output elsewhere"
                )
    if not overwrite or not dst.exists():
        return ()
    if writes is None:
        if dst.is_dir():
            raise ConversionError(f"{dst}: is a directory; --to {to} writes a file and does not replace a directory")
        return ()
    if not dst.is_dir():
        raise ConversionError(f"{dst}: is a file; --to {to} writes a directory and does not replace a file")
    replaced = {f.name for f in source_files if f.parent.resolve() == target} if in_place else set()
    foreign, carry = [], []
    for entry in sorted(dst.iterdir()):
        name = entry.name
        if entry.is_dir():
            foreign.append(name + "/")
        elif writes(name) or name in replaced:
            continue
        elif name in TOKENIZER_FILES:
            carry.append(name)
        else:
            foreign.append(name)
    if foreign:
        listed = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise ConversionError(
            f"{dst}: holds {listed}, which a conversion to {to} does not write; --overwrite replaces the whole "
            "directory, so it does not delete them: move them away or write elsewhere (tokenizer files are kept)"
        )
    return tuple(carry)


_NOW: Any = object()  # atomic_output's `before` default: list the destination on entry


@contextlib.contextmanager
def atomic_output(
    dst: Path, overwrite: bool = False, carry: Iterable[str] = (), before: frozenset[str] | None = _NOW
) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success move it to ``dst``, on any failure remove it.

    ``carry`` names files of an existing ``dst`` directory copied into the new output (tokenizer files).
    Without ``overwrite``, a ``dst`` that appears while writing (another conversion) is not replaced. Parent
    directories created here are removed again on failure. Write failures (a read-only or full filesystem,
    an unwritable location) raise ConversionError naming ``dst`` and the cause. ``before``: the destination's
    entries (:func:`entries`) when the caller checked it; with ``overwrite`` it is replaced only if it holds
    nothing more at the end (default: its entries on entry here). Stale partial outputs of killed conversions
    are the caller's to remove (:func:`remove_stale_partials`), before it checks the destination: one of them
    may be the destination's own output, moved aside.
    """
    dst = Path(dst)
    if _exists(dst) and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
    parent = dst.parent if str(dst.parent) else Path(".")
    tmp = parent / _side_name(dst, "partial", os.getpid())
    created = _missing_parents(dst, parent)
    if before is _NOW:
        before = entries(dst)  # what --overwrite was checked against: replaced only while it still holds no more
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConversionError(f"{dst}: cannot create directory {e.filename or parent}: {e.strerror}") from None
        _remove(tmp)
        yield tmp
        if not tmp.exists():
            raise ConversionError(f"internal: nothing was written for {dst}")
        now = entries(dst)
        if now is None:
            os.replace(tmp, dst)
        elif before is None or not overwrite:
            raise ConversionError(
                f"{dst}: appeared while converting (another conversion to it?); left as it is"
                + ("" if overwrite else " (pass overwrite=True / --overwrite to replace it)")
            )
        elif now - before:
            new = ", ".join(sorted(now - before)[:5])
            raise ConversionError(
                f"{dst}: {new} appeared in it while converting; left as it is, and the new output is not written "
                "(--overwrite replaces only what the destination held when the conversion started)"
            )
        else:
            _replace(tmp, dst, parent / _side_name(dst, "old", os.getpid()), carry)
    except BaseException as e:
        try:
            _remove(tmp)
        except OSError as cleanup:  # never hide the error that stopped the conversion
            _log.warning("could not remove the partial output %s: %s", tmp, cleanup)
        for folder in created:  # deepest first; stops at the first one something else has put files in
            try:
                folder.rmdir()
            except OSError:
                break
        error = write_error(dst, e) if isinstance(e, Exception) else None
        if error is not None:
            raise error from None
        raise


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def entries(path: Path) -> frozenset[str] | None:
    """The names in directory ``path`` ({""} for a file), None when nothing is there."""
    if not _exists(path):
        return None
    if not path.is_dir():
        return frozenset({""})
    try:
        return frozenset(e.name + ("/" if e.is_dir() else "") for e in path.iterdir())
    except OSError:
        return frozenset()


_NAME_MAX = 255


def _side_stem(dst: Path) -> str:
    """``dst``'s name as the side files (partial output, replaced output) carry it: shortened with a hash when
    the side name would pass the filesystem's 255-byte limit."""
    name = dst.name
    if len(f".{name}.partial-{_HOST}-{2**22}".encode()) <= _NAME_MAX:
        return name
    return f"{name.encode()[:96].decode(errors='ignore')}~{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def _side_name(dst: Path, kind: str, pid: int) -> str:
    return f".{_side_stem(dst)}.{kind}-{_HOST}-{pid}"


def _missing_parents(dst: Path, parent: Path) -> list[Path]:
    """The directories ``parent.mkdir(parents=True)`` would create, deepest first; ConversionError when an
    existing ancestor is not a directory (nothing could be written below it)."""
    missing = []
    folder = parent
    while not _exists(folder):
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    if _exists(folder) and not folder.is_dir():
        raise ConversionError(f"{dst}: cannot write: {folder} is not a directory")
    return missing


def _replace(tmp: Path, dst: Path, old: Path, carry: Iterable[str]) -> None:
    """Move ``tmp`` to the existing ``dst``, carrying ``carry`` over from it; ``dst`` is restored on failure."""
    for name in carry:
        if (dst / name).is_file() and not (tmp / name).exists():
            shutil.copy2(dst / name, tmp / name)
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _remove(old)


_NO_SPACE = {errno.ENOSPC: "no space left on device while writing", errno.EDQUOT: "disk quota exceeded while writing"}


def write_error(dst: Path, error: Exception) -> ConversionError | None:
    """A ConversionError naming ``dst`` and the cause for a failure to write it (an OSError with an errno, or
    the RuntimeError of torch.save's stream writer); None for other exceptions."""
    if isinstance(error, OSError) and error.errno is not None:
        cause = _NO_SPACE.get(error.errno) or f"cannot write: {error.strerror or os.strerror(error.errno)}"
        return ConversionError(f"{dst}: {cause}")
    text = str(error)
    if not isinstance(error, RuntimeError) or "inline_container.cc" not in text:
        return None
    detail = text.split("] . ", 1)[-1].strip()
    if "unexpected pos" in text or "file write failed" in text:  # the writer got fewer bytes out than it asked
        cause = _NO_SPACE[errno.ENOSPC]
        limit = _file_size_limit()
        if limit is not None:  # the writer does not say which: name both
            cause = f"{cause}, or past this process's file size limit of {limit:,} bytes (ulimit -f)"
        return ConversionError(f"{dst}: {cause} (torch.save wrote short: {detail})")
    m = re.search(r"(?:strerror|fopen): ([^,\n]+)", text)
    return ConversionError(f"{dst}: cannot write: {m.group(1).strip() if m else detail}")


def _file_size_limit() -> int | None:
    """RLIMIT_FSIZE in bytes, None when unlimited (or not POSIX)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


# partial outputs are named ``.<dst name>.partial-<host>-<pid>``; older versions wrote ``.<dst name>.partial-<pid>``
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove the partial outputs for ``dst`` left by killed conversions on this host; returns those removed.

    Only names this package writes for ``dst`` whose process is gone (and, for names carrying a host, only
    ones of this host: a PID says nothing about another machine's processes on a shared filesystem).
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    stem = re.escape(_side_stem(dst))
    pattern = re.compile(rf"\.{stem}\.(?P<kind>partial|old)-(?:(?P<host>[A-Za-z0-9._-]+)-)?(?P<pid>\d+)")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        m = pattern.fullmatch(path.name)
        if m is None or m.group("host") not in (None, _HOST) or _pid_alive(int(m.group("pid"))):
            continue
        if m.group("kind") == "old":  # the output an --overwrite moved aside; the process died before the swap
            if m.group("host") is None:
                continue  # older versions' name without a host: it may be another machine's
            if not _exists(dst):
                try:  # never over something that appeared meanwhile: link (files) or rename into an absent name
                    if path.is_dir():
                        os.rename(path, dst)
                    else:
                        os.link(path, dst)
                        path.unlink()
                except OSError as e:
                    _log.warning("could not restore %s from %s: %s", dst, path, e)
                else:
                    _log.warning("restored %s from %s, left by an interrupted conversion", dst, path)
                continue
        try:
            _remove(path)
        except OSError as e:
            _log.warning("could not remove stale partial output %s: %s", path, e)
            continue
        _log.warning("removed %s, the partial output of an interrupted conversion (process %s)", path, m.group("pid"))
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (``kill(pid, 0)``); True whenever that cannot be told."""
    if os.name != "posix" or pid <= 0:
        return True  # on Windows os.kill would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM: it exists, owned by someone else
    return True


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
    except UnicodeDecodeError as e:
        raise ConversionError(
            f"{path}: not a UTF-8 JSON file (byte {e.start} is {e.object[e.start : e.start + 1]!r})"
        ) from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read {what}: {e.strerror or e}") from None
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
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"10KiB"`` or an int -> bytes."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConversionError(
            f"shard size must be an int number of bytes or a string like 5GB, got {type(text).__name__} {text!r}"
        )
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"shard size must look like 5GB, 500MB or a number of bytes, got {text!r}")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)
