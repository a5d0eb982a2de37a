"""openlm-mamba: Mamba language models for OpenLM, with fused selective-scan and conv kernels."""

from __future__ import annotations

from .config import ConfigError, MambaConfig, available_configs
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


def register() -> None:
    """Make OpenLM build our Mamba models (imports ``open_lm``; done automatically after pip install)."""
    from .openlm import register as _register

    _register()
