"""The C++ CPU kernels (selective scan, causal conv1d, decoding steps, add + RMSNorm): built on first use.

``csrc/*.cpp`` are compiled with ``torch.utils.cpp_extension`` the first time a CPU op needs
them and cached under the torch extensions directory (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), keyed by this CPU's instruction set, the sources' hash and the
toolchain (torch, compiler and ninja versions). They
are compiled from a copy of the sources kept in that directory, so every checkout or install of
the same sources shares one build, and a build lock left by a killed build is broken after
5 minutes instead of hanging every later import. They register the torch ops
``openlm_mamba_cpu::*``. Where they cannot be built (no compiler or ninja,
or ``OPENLM_MAMBA_DISABLE_CPP=1``) every op runs its pure PyTorch path, after one warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

DISABLE_ENV = "OPENLM_MAMBA_DISABLE_CPP"
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("selective_scan_cpu.cpp", "causal_conv1d_cpu.cpp", "step_cpu.cpp", "add_norm_cpu.cpp")

_lock = threading.Lock()
_ext_state: dict[str, object] = {}  # "ok": bool, "reason": str
STALE_LOCK_S = 300.0  # a build takes about a minute; torch's build lock older than this was left by a killed build


def _tool_version(cmd: str) -> str:
    """``cmd --version``'s first line, or "" if it does not run."""
    try:
        out = subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def _ninja_on_path() -> None:
    """Put the ninja this package depends on onto $PATH when only its environment's bin/ has it: torch's builder
    runs ``ninja`` from $PATH, which lacks the venv's bin/ when the venv is not activated (cron, an IDE, pipx,
    ``venv/bin/python`` called directly)."""
    if shutil.which("ninja") is not None:
        return
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package: its binary lives in ninja.BIN_DIR

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for folder in folders:
        if shutil.which("ninja", path=folder) is not None:
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def _build_tag() -> str:
    """A short hash of this CPU's instruction set, the sources and the toolchain (torch, compiler,
    ninja): a cached build is never reused on another CPU, after an edit or under another torch,
    and two environments with different ninja versions (whose logs disagree, so each would rebuild
    the other's objects) keep separate builds."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    toolchain = (
        f"torch {torch.__version__} | {_tool_version(os.environ.get('CXX', 'c++'))} | ninja {_tool_version('ninja')}"
    )
    h = hashlib.sha1(f"{platform.machine()} {flags} {toolchain}".encode())
    for p in sorted(CSRC.iterdir()):
        if p.suffix in (".cpp", ".h"):
            h.update(p.read_bytes())
    return h.hexdigest()[:10]


def cpp_disabled() -> bool:
    """True when $OPENLM_MAMBA_DISABLE_CPP asks for the pure PyTorch paths."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _build_directory(name: str) -> Path | None:
    """torch's build directory for extension ``name`` (created), or None if its helper moved."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except Exception:  # private helper: if it moves, build from the package's sources
        return None


def _stable_sources(build_dir: Path) -> Path:
    """A copy of csrc/ inside the build directory, so every checkout or install of the same sources
    compiles the same paths: torch (ninja) rebuilds whenever a source path changes."""
    dest = build_dir / "src"
    dest.mkdir(exist_ok=True)
    for p in CSRC.iterdir():
        if p.suffix in (".cpp", ".h"):
            target = dest / p.name
            data = p.read_bytes()
            if not target.exists() or target.read_bytes() != data:
                tmp = dest / f".{p.name}.{os.getpid()}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, target)  # atomic: a concurrent build never reads half a file
    return dest


def wait_for_build_lock(build_dir: Path, stale_after: float = STALE_LOCK_S, poll: float = 0.5) -> bool:
    """Wait while another process holds torch's build lock; remove the lock once it is older than
    ``stale_after`` seconds (a killed build leaves it behind, and torch would then wait forever).
    True if a stale lock was removed."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age > stale_after:
            lock.unlink(missing_ok=True)
            warnings.warn(
                f"openlm_mamba: removed a stale build lock ({age:.0f} s old, left by an interrupted build): {lock}",
                RuntimeWarning,
                stacklevel=2,
            )
            return True
        time.sleep(poll)


def _announce_build(build_dir: Path | None, name: str) -> None:
    """One line on stderr before a build (not before loading a cached one): it takes tens of seconds."""
    if build_dir is None or any(build_dir.glob(f"{name}*.so")) or any(build_dir.glob(f"{name}*.pyd")):
        return
    print(
        f"openlm_mamba: compiling the C++ CPU kernels (first use on this machine, about a minute) into {build_dir}",
        file=sys.stderr,
        flush=True,
    )


def load_extension() -> bool:
    """Build (first call, then cached on disk) and load the C++ kernels; False, with one warning, if impossible."""
    with _lock:
        if "ok" in _ext_state:
            return bool(_ext_state["ok"])
        try:
            if cpp_disabled():
                raise RuntimeError(f"disabled by ${DISABLE_ENV}")
            from torch.utils.cpp_extension import load, verify_ninja_availability

            cxx = os.environ.get("CXX", "c++")
            if shutil.which(cxx) is None:
                raise RuntimeError(f"no C++ compiler: {cxx!r} not found")
            _ninja_on_path()
            verify_ninja_availability()
            flags = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp-simd"]
            ldflags = []
            if platform.system() == "Linux":
                # at::parallel_for is an inline OpenMP region: without -fopenmp it runs on one thread.
                # libgomp.so.1 resolves to the copy torch has already loaded (one OpenMP runtime).
                flags.append("-fopenmp")
                ldflags.append("-fopenmp")
            if platform.machine() in ("x86_64", "AMD64"):
                flags += ["-march=native", "-mprefer-vector-width=512"]
            name = f"openlm_mamba_cpu_{_build_tag()}"
            build_dir = _build_directory(name)
            src = CSRC
            if build_dir is not None:
                src = _stable_sources(build_dir)
                wait_for_build_lock(build_dir)
            _announce_build(build_dir, name)
            load(
                name=name,
                sources=[str(src / s) for s in SOURCES],
                extra_cflags=flags,
                extra_include_paths=[str(src)],
                extra_ldflags=ldflags,
                is_python_module=False,
                verbose=False,
            )
            _ext_state["ok"] = True
        except Exception as exc:  # no compiler / ninja / headers: fall back, say so once
            _ext_state["ok"] = False
            msg = str(exc).strip()
            _ext_state["reason"] = f"{type(exc).__name__}: {msg.splitlines()[-1] if msg else ''}"
            warnings.warn(
                f"openlm_mamba: C++ CPU kernels unavailable ({_ext_state['reason']}); "
                "using the slower pure PyTorch path",
                RuntimeWarning,
                stacklevel=3,
            )
        return bool(_ext_state["ok"])


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd is on and one of ``tensors`` requires a gradient (else a kernel can skip
    the ``autograd.Function`` machinery)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_cpp(t: torch.Tensor) -> bool:
    """True when the C++ kernels can run on ``t`` (a CPU float32 / float64 tensor) and are built."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and load_extension()


__all__ = ["DISABLE_ENV", "cpp_disabled", "load_extension", "needs_grad", "use_cpp", "wait_for_build_lock"]
