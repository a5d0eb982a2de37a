"""Automatic activation: :func:`activate` runs the moment ``open_lm.model`` has been imported.

``openlm_mamba_autoload.pth`` (installed into site-packages) runs at every interpreter start and
imports nothing: it puts a tiny finder on ``sys.meta_path`` that, on the first ``import open_lm``,
removes itself and registers ``activate`` (by name) as a wrapt post-import hook on
``open_lm.model``. So torch and ``openlm_mamba`` load only when OpenLM's model module is imported.
Set ``OPENLM_MAMBA_AUTOLOAD=0`` (or ``false``/``no``/``off``) to switch it off.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

ENV_VAR = "OPENLM_MAMBA_AUTOLOAD"
_OFF = ("0", "false", "no", "off")
HOOK_TARGET = "open_lm.model"


def enabled() -> bool:
    """False when $OPENLM_MAMBA_AUTOLOAD switches automatic activation off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


_pending = False


def take_pending() -> bool:
    """True once if :func:`activate` deferred registration to the end of ``openlm_mamba.openlm``'s import."""
    global _pending
    pending, _pending = _pending, False
    return pending


def activate(module: ModuleType) -> None:
    """Post-import hook on ``open_lm.model``: register our models; warn (never raise) on failure."""
    global _pending
    if not enabled():
        return
    partial = sys.modules.get("openlm_mamba.openlm")
    if partial is not None and not hasattr(partial, "register"):
        _pending = True  # openlm_mamba.openlm is mid-import (it imported open_lm.model): it registers when done
        return
    try:
        from .openlm import register

        register(module)
    except Exception as e:  # a broken plugin must not break `import open_lm.model`
        print(
            f"openlm_mamba: automatic registration with OpenLM failed ({type(e).__name__}: {e}); "
            "Mamba models are unavailable in open_lm. Use `python -m openlm_mamba.train` to see the full error.",
            file=sys.stderr,
        )


def arm() -> None:
    """Arm the post-import hook now (what the ``.pth`` line does, for interpreters without it)."""
    if enabled():
        import wrapt

        wrapt.register_post_import_hook(f"{__name__}:activate", HOOK_TARGET)
