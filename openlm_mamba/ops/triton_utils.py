"""Helpers shared by the Triton kernels: availability checks and launch-size choices."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


_IMPORT_ERROR: list[str | None] = []  # filled on the first check


def _import_error() -> str | None:
    if not _IMPORT_ERROR:
        try:
            import triton.language  # noqa: F401
        except Exception as exc:  # a broken install must not break the other backends
            _IMPORT_ERROR.append(f"triton is installed but does not import: {type(exc).__name__}: {exc}")
        else:
            _IMPORT_ERROR.append(None)
    return _IMPORT_ERROR[0]


def triton_available(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    if not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not interpreting():
        return "Triton kernels run on CPU tensors only through the interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device.type not in ("cuda", "cpu"):
        return f"Triton kernels do not support device type {device.type!r}"
    return _import_error()


def on_device(t: torch.Tensor):
    """Context to launch a kernel on ``t``'s GPU (as mamba_ssm does). Triton launches on the
    *current* CUDA device and its stream: for tensors on another GPU that is the wrong device, with
    foreign pointers. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Accumulation dtype of a kernel: float64 if any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype for a torch floating dtype."""
    import triton.language as tl

    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }[dtype]


def lazy(module: str, name: str):
    """A function that imports ``module`` on first call and calls its ``name``.

    Importing the kernels late lets ``TRITON_INTERPRET`` be set any time before the first call
    (Triton reads it when a kernel is defined) and keeps ``import openlm_mamba`` light. If that
    first call happens while torch.compile traces, the dynamic import is a graph break: ops meant
    for compiled code register a wrapper with a static ``from .triton import fn`` instead.
    """
    cache: list = []

    def call(*args, **kwargs):
        if not cache:
            cache.append(getattr(importlib.import_module(module), name))
        return cache[0](*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Lazily imported {module}.{name}."
    return call


def vectorize_interpreter_scan() -> bool:
    """Make the Triton interpreter's ``associative_scan`` call its combine function once per position
    along the scan axis (on whole slices) instead of once per element. Same results, same
    combine order; the per-element loop made the scan kernels too slow to test on CPU. True if
    the patch is in place (False for an interpreter whose internals differ: it stays as is)."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except Exception:
        return False
    ops = getattr(interpreter, "ScanOps", None)
    if ops is None or not hasattr(ops, "generic_scan") or not hasattr(ops, "to_tensor"):
        return False
    if getattr(ops.generic_scan, "_openlm_mamba", False):
        return True

    def generic_scan(self, input):
        axis = self.axis
        data = [arg.handle.data for arg in input]
        outs = [np.empty_like(x) for x in data]

        def at(x, i):
            return np.ascontiguousarray(np.take(x, i, axis=axis))

        acc = [self.to_tensor(at(x, 0), arg.dtype) for x, arg in zip(data, input)]
        for i in range(data[0].shape[axis]):
            if i:
                cur = [self.to_tensor(at(x, i), arg.dtype) for x, arg in zip(data, input)]
                ret = self.combine_fn.fn(*acc, *cur)
                acc = list(ret) if isinstance(ret, tuple) else [ret]
            for out, a in zip(outs, acc):
                index = [slice(None)] * out.ndim
                index[axis] = i
                out[tuple(index)] = a.handle.data if hasattr(a, "handle") else a
        return [self.to_tensor(out, arg.dtype) for out, arg in zip(outs, input)]

    generic_scan._openlm_mamba = True
    ops.generic_scan = generic_scan
    return True
