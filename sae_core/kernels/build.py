"""Compile the kernel sources on first use and load them with ctypes, cached by a hash of the sources.

No torch extension machinery: the CUDA file is compiled by nvcc and the CPU twin by the system C++
compiler into plain shared libraries with ``extern "C"`` entry points, so a build takes seconds and a
machine without a compiler simply gets ``None`` (callers fall back to pure torch).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
HEADER = KERNEL_DIR / "sparse_index.cuh"
CPU_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
OPENMP_FLAGS = ["-fopenmp"]
"""Tried first: the twin's workers are then torch's OpenMP threads (sparse_cpu.cpp, parallel_for); a
compiler without OpenMP builds it on std::threads."""
CUDA_ARCHS = ("80", "90")
CUDA_FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC"] + [
    f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS
]


def cache_dir() -> Path:
    root = os.environ.get("SAE_KERNELS_CACHE") or Path.home() / ".cache" / "sae-ray" / "kernels"
    return Path(root)


def cpu_signature() -> str:
    """-march=native code must not be reused on a CPU with fewer instruction sets (shared home dirs)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def source_hash(source: Path, flags: list[str], extra: str = "") -> str:
    digest = hashlib.sha256()
    for part in (source.read_bytes(), HEADER.read_bytes(), " ".join(flags).encode(), extra.encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def compile_shared(compiler: str, source: Path, flags: list[str], extra_key: str = "") -> Path:
    """Build ``source`` into a cached .so (atomic rename, so concurrent builders do not clash)."""
    target = cache_dir() / f"{source.stem}-{source_hash(source, flags, extra_key)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, f"-I{KERNEL_DIR}", str(source), "-o", str(out)]
        logger.info("building %s: %s", source.name, " ".join(cmd))
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, target)
    return target


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _load(compiler: str | None, source: Path, flags: list[str], extra_key: str = "",
          instead: str = "using the pure-torch path") -> ctypes.CDLL | None:
    if compiler is None:
        return None
    try:
        return ctypes.CDLL(str(compile_shared(compiler, source, flags, extra_key)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        logger.warning("could not build %s, %s: %s", source.name, instead, detail)
        return None


def _declare(lib: ctypes.CDLL, names: dict[str, list[type]], restype: type | None) -> ctypes.CDLL:
    for name, argtypes in names.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The CPU twin (sparse_cpu.cpp), or None when no C++ compiler is available."""
    compiler, source = shutil.which(os.environ.get("CXX", "c++")), KERNEL_DIR / "sparse_cpu.cpp"
    lib = (_load(compiler, source, CPU_FLAGS + OPENMP_FLAGS, cpu_signature(), instead="trying without OpenMP")
           or _load(compiler, source, CPU_FLAGS, cpu_signature()))
    return None if lib is None else declare_cpu(lib)


def declare_cpu(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The argument and return types of every function of a built sparse_cpu.cpp."""
    _declare(lib, {
        "sae_cpu_gather_sum": [P, P, P, P, I64, I64, I64, I64, INT],
        "sae_cpu_row_dots": [P, P, P, P, I64, I64, I64, I64, INT],
        "sae_cpu_scatter_rows": [P, P, P, P, P, I64, I64, I64, INT],
        "sae_cpu_scatter_cols": [P, P, P, P, P, I64, I64, I64, INT],
        "sae_cpu_topk": [P, P, P, P, I64, I64, I64, INT, INT],
        "sae_cpu_csr": [P, I64, I64, P, P],
        "sae_cpu_count_above": [P, P, I64, P, I64, I64, INT],
        "sae_cpu_select_above": [P, P, I64, P, I64, I64, I64, INT],
    }, None)
    return _declare(lib, {"sae_cpu_uses_openmp": []}, ctypes.c_int)


@functools.cache
def cuda_library() -> ctypes.CDLL | None:
    """The CUDA kernels (sparse_cuda.cu), or None when nvcc is missing or the build fails."""
    lib = _load(find_nvcc(), KERNEL_DIR / "sparse_cuda.cu", CUDA_FLAGS)
    if lib is None:
        return None
    return _declare(lib, {
        "sae_cuda_gather_sum": [INT, P, P, P, P, P, I64, I64, I64, I64, P],
        "sae_cuda_row_dots": [INT, P, P, P, P, I64, I64, I64, I64, P],
        "sae_cuda_scatter_rows": [INT, P, P, P, P, P, I64, I64, I64, INT, P],
    }, ctypes.c_int)
