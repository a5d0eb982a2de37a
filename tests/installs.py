"""Install this repository into a fresh venv (wheel or editable), for the install-mode tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def install_into_fresh_venv(tmp_path: Path, mode: str) -> Path:
    """Create a venv (seeing the system site-packages for torch & co.) and install this repository
    into it without dependencies: ``mode`` "wheel" (a built, non-editable wheel) or "editable".
    Returns the venv's python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    if mode == "editable":
        subprocess.run([*pip, "-e", ROOT], check=True, cwd=tmp_path)
        return py
    src = tmp_path / "src"  # build from a copy: `pip wheel` leaves build/ in the source tree
    skip = shutil.ignore_patterns(".git", "logs", "build", "tiny_data", "*.egg-info", "__pycache__", ".venv")
    shutil.copytree(ROOT, src, ignore=skip)
    wheels = tmp_path / "w"
    subprocess.run(
        [str(py), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src],
        check=True,
    )
    subprocess.run([*pip, next(wheels.glob("openlm_mamba-*.whl"))], check=True, cwd=tmp_path)
    return py
