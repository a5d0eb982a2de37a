"""openlm-mamba: Mamba language models for OpenLM, with fused selective-scan and conv kernels."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ConfigError, MambaConfig, available_configs

if TYPE_CHECKING:
    from .generation import MambaCache, generate
    from .model import MambaLM

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "MambaCache",
    "MambaConfig",
    "MambaLM",
    "__version__",
    "available_configs",
    "generate",
    "register",
]

# Imported on first use (they import torch): `import openlm_mamba` and the CLI start in milliseconds, so
# `openlm-mamba --help` is instant and Ctrl-C during a command's start-up reaches its handler.
_LAZY = {"MambaCache": ".generation", "generate": ".generation", "MambaLM": ".model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def register() -> None:
    """Make OpenLM build our Mamba models (imports ``open_lm``; done automatically after pip install)."""
    from .openlm import register as _register

    _register()
