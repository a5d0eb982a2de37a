"""Explicit fallback entry point: ``python -m openlm_mamba.train <open_lm args>``.

Registers our Mamba models with OpenLM, then runs OpenLM's unmodified ``open_lm.main.main``.
Use it where the automatic ``.pth`` activation is unavailable or switched off
(``OPENLM_MAMBA_AUTOLOAD=0``); works under ``torchrun -m openlm_mamba.train`` too.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None):
    """Register the plugin and run ``open_lm.main.main(argv)``; returns what OpenLM returns."""
    try:
        import open_lm.model  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"openlm_mamba.train: OpenLM (open_lm) is not importable ({e}); install it: "
            "pip install 'openlm-mamba[openlm]' (the packages OpenLM imports), then pip install --no-deps "
            "'open_lm @ git+https://github.com/mlfoundations/open_lm.git@9bb92ef1689333534b7057942a20d18a46d1fa52' "
            "(--no-deps: its own requirements would replace torch)"
        ) from None
    from .openlm import register

    register()
    from open_lm.main import main as open_lm_main

    return open_lm_main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
