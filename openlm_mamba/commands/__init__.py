"""Sub-commands of the ``openlm-mamba`` CLI (see ``openlm_mamba.cli``)."""
