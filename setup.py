"""Build script: packages (with the top-level model_configs/ shipped as openlm_mamba.model_configs), plus the
``openlm_mamba_autoload.pth`` file that activates the OpenLM plugin, in regular and editable installs."""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "openlm_mamba_autoload.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    """Regular wheels: put the .pth at the top of build_lib, so it is installed into site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    """Editable installs: also place the .pth in the editable wheel (at its namespace-install step)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(os.path.join(HERE, PTH), os.path.join(installation_dir, PTH))


setup(
    packages=[*find_packages(include=["openlm_mamba", "openlm_mamba.*"]), "openlm_mamba.model_configs"],
    package_dir={"openlm_mamba.model_configs": "model_configs"},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
