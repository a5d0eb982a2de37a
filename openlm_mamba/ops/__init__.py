"""Fused Mamba ops. Each op has a plain reference and backends picked by ``dispatch``."""

from .causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from .dispatch import BackendUnavailableError, available_backends
from .rms_norm import add_norm, add_norm_ref
from .selective_scan import selective_scan, selective_scan_ref
from .state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "BackendUnavailableError",
    "add_norm",
    "add_norm_ref",
    "available_backends",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
