"""The C++ CPU kernels (selective scan, causal conv1d, decoding steps, add + RMSNorm): built on first use.

``csrc/*.cpp`` are compiled with ``torch.utils.cpp_extension`` the first time a CPU op needs
them and cached under the torch extensions directory (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), keyed by this CPU's instruction set, the sources' hash and the
toolchain (torch, compiler and ninja versions). They
are compiled from a copy of the sources kept in that directory, so every checkout or install of
the same sources shares one build. Builders take turns under an OS file lock (``flock``), which a
killed build cannot leave behind: torch's own build lock found then is a dead build's and is removed
at once (without ``flock``, after 5 minutes). A failed build's compiler output is kept in
``build_error.log`` there, and the warning quotes its error lines. They register the torch ops
``openlm_mamba_cpu::*``. Where they cannot be built (no compiler or ninja,
or ``OPENLM_MAMBA_DISABLE_CPP=1``) every op runs its pure PyTorch path, after one warning.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def build_turn(build_dir: Path | None):
    """Hold this build directory's OS file lock while building or loading: other processes wait their turn (one
    line says so), and torch's build lock found while holding it was left by a killed build (the OS drops a dead
    process's file lock, never torch's), so it goes at once. Where ``flock`` is unavailable, the age rule of
    :func:`wait_for_build_lock` instead."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    fd = None
    if build_dir is not None and fcntl is not None:
        try:
            fd = os.open(build_dir / ".openlm_mamba_build.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(
                    f"openlm_mamba: waiting for another process building the C++ CPU kernels in {build_dir}",
                    file=sys.stderr,
                    flush=True,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: fall back to the age rule
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        if build_dir is not None:
            if fd is None:
                wait_for_build_lock(build_dir)
            elif (build_dir / "lock").exists():
                (build_dir / "lock").unlink(missing_ok=True)
                warnings.warn(
                    f"openlm_mamba: removed a build lock left by an interrupted build: {build_dir / 'lock'}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def build_failure(exc: BaseException, build_dir: Path | None) -> str:
    """The reason a build failed, in one line: the compiler's error lines (not ninja's closing "build stopped"),
    with where the whole output was saved (``build_error.log`` in the build directory)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower() or ln.startswith("FAILED:")]
    errors = [ln for ln in errors if not ln.startswith("FAILED:")] or errors  # the cause, not the step name
    shown = "; ".join(dict.fromkeys(errors[:3])) if errors else (lines[-1] if lines else "")
    if len(shown) > 400:
        shown = shown[:400] + "..."
    reason = f"{type(exc).__name__}: {shown}"
    if build_dir is not None and len(lines) > 1:
        log = build_dir / "build_error.log"
        with contextlib.suppress(OSError):
            log.write_text(text + "\n")
            reason += f" (the whole compiler output: {log})"
    return reason


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
        build_dir: Path | None = None
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
            with build_turn(build_dir):
                if build_dir is not None:
                    src = _stable_sources(build_dir)
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
            _ext_state["reason"] = build_failure(exc, build_dir)
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


__all__ = [
    "DISABLE_ENV",
    "build_failure",
    "build_turn",
    "cpp_disabled",
    "load_extension",
    "needs_grad",
    "use_cpp",
    "wait_for_build_lock",
]
