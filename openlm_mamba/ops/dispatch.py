"""Backend choice for every op: ``auto | torch | triton | cuda``.

The backend comes from the ``backend=`` argument of an op, else the environment variable
``OPENLM_MAMBA_BACKEND``, else ``auto``. ``auto`` picks the first available backend in the
op's preference order for the device of its inputs (GPU: triton, cuda, torch; CPU: torch).
Each op registers its implementations here with :func:`register`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "OPENLM_MAMBA_BACKEND"

# Order `auto` tries on a GPU; on CPU it always takes "torch".
GPU_PREFERENCE = ("triton", "cuda", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclass
class _Impl:
    fn: Callable
    available: Callable[[torch.device], str | None]  # returns None if usable, else the reason


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def register(
    op: str, backend: str, fn: Callable, available: Callable[[torch.device], str | None] | None = None
) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``available(device)`` returns ``None`` when the backend can run on ``device``, otherwise a
    short reason (shown to users who asked for the backend explicitly).
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, available or (lambda device: None))


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else $OPENLM_MAMBA_BACKEND, else "auto"."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {', '.join(BACKENDS)}; got {type(backend).__name__}")
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def resolve(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for inputs on ``device``; returns (backend name, function)."""
    impls = _REGISTRY.get(op, {})
    name = requested_backend(backend)
    if name != "auto" and backend is None and name not in impls:
        name = "auto"  # $OPENLM_MAMBA_BACKEND is a preference for the ops that have it (add_norm has no "cuda")
    if name != "auto":
        impl = impls.get(name)
        if impl is None:
            have = ", ".join(sorted(impls)) or "none"
            raise BackendUnavailableError(f"{op}: backend {name!r} is not implemented for this op (available: {have})")
        reason = impl.available(device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable on {device}: {reason}")
        return name, impl.fn
    order = GPU_PREFERENCE if device.type == "cuda" else ("torch",)
    for candidate in order:
        impl = impls.get(candidate)
        if impl is not None and impl.available(device) is None:
            return candidate, impl.fn
    raise BackendUnavailableError(f"{op}: no backend available on {device}")


def for_op(op: str, backend: str | None) -> str | None:
    """``backend`` if ``op`` implements it (or it is None / "auto"), else "auto": a model-wide backend
    choice is a preference, and ops without that backend (add_norm has no "cuda") take auto."""
    name = requested_backend(backend) if backend is not None else None
    if name is None or name == "auto" or name in _REGISTRY.get(op, {}):
        return backend
    return "auto"


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends of ``op`` that can run on ``device`` now."""
    if op not in _REGISTRY:
        raise ValueError(f"available_backends: unknown op {op!r}; ops with backends: {', '.join(sorted(_REGISTRY))}")
    device = torch.device(device)
    return [name for name, impl in sorted(_REGISTRY[op].items()) if impl.available(device) is None]
