"""openlm-mamba: Mamba language models for OpenLM, with fused selective-scan and conv kernels."""

from __future__ import annotations

from .config import ConfigError, MambaConfig, available_configs
from .model import MambaLM

__version__ = "0.1.0"

__all__ = ["ConfigError", "MambaConfig", "MambaLM", "__version__", "available_configs"]
