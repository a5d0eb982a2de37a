"""A non-editable install in a fresh venv ships the model configs and the C++ source, and works."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from .installs import install_into_fresh_venv

CHECK = textwrap.dedent(
    """
    import sys, torch, openlm_mamba
    from openlm_mamba import MambaConfig, MambaLM
    from openlm_mamba.config import config_dir
    from openlm_mamba.ops import cpp
    print("PKG", openlm_mamba.__file__)
    print("CONFIGS", config_dir())
    print("CPP_BUILT", cpp.load_extension())
    with torch.device("meta"):
        big = MambaLM(MambaConfig.load("mamba_7b"))
    n = sum(p.numel() for p in big.parameters())
    print("PARAMS", n)
    tiny = MambaLM("mamba_tiny")
    logits, _, _ = tiny(torch.randint(0, 512, (2, 16)))
    logits.logsumexp(-1).mean().backward()
    print("GRADS_OK", all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.parameters()))
    """
)


def test_wheel_install_in_fresh_venv(tmp_path):
    py = install_into_fresh_venv(tmp_path, "wheel")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}  # build from the installed sources
    out = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    venv = str(py.parent.parent)
    assert lines["CPP_BUILT"] == "True", "the C++ kernels build from the wheel's sources"
    assert "openlm_mamba: compiling the C++ CPU kernels" in out.stderr, "a first build says so (~1 min)"
    assert lines["PKG"].startswith(venv), "the installed copy is imported, not the source tree"
    assert lines["CONFIGS"].startswith(venv), "model configs ship inside the wheel"
    from openlm_mamba.ops.cpp import SOURCES

    csrc = next(py.parent.parent.glob("lib/python*/site-packages/openlm_mamba/ops/csrc"))
    for name in (*SOURCES, "common.h"):
        assert (csrc / name).stat().st_size > 0, f"the C++ kernel source {name} ships inside the wheel"
    params = int(lines["PARAMS"])
    print(f"mamba_7b parameters: {params:,}")
    assert abs(params - 6.95e9) / 6.95e9 < 0.01
    assert lines["GRADS_OK"] == "True"


def test_sdist_ships_a_runnable_test_suite_and_the_quick_start(tmp_path):
    """The source distribution holds what its README and tests use: the whole tests/ package (conftest.py,
    __init__.py, helpers), the examples of the Quick start, the benchmarks and the model configs; not the
    generated example data."""
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if files.returncode != 0:  # not a git checkout (an unpacked sdist): nothing to compare with
        pytest.skip("not a git checkout")
    for name in files.stdout.splitlines():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((root / name).read_bytes())
    (src / "examples" / "tiny_data").mkdir(exist_ok=True)
    (src / "examples" / "tiny_data" / "tokenizer.json").write_text("{}")  # generated data: left out
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("tests/__init__.py", "tests/conftest.py", "tests/installs.py", "tests/test_model.py",
                 "examples/make_tiny_data.py", "examples/tiny_cpu.yaml", "benchmarks/bench_generate.py",
                 "model_configs/mamba_7b.json", "openlm_mamba/ops/csrc/common.h", "BENCHMARKS.md", "LICENSE",
                 "openlm_mamba_autoload.pth"):  # fmt: skip
        assert need in names, need
    assert not any(n.startswith("examples/tiny_data") for n in names)
