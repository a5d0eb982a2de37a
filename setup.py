"""Build script: packages (with the top-level model_configs/ shipped as openlm_mamba.model_configs)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["openlm_mamba", "openlm_mamba.*"]), "openlm_mamba.model_configs"],
    package_dir={"openlm_mamba.model_configs": "model_configs"},
)
