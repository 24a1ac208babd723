"""Builds the native extension modules; package metadata lives in pyproject.toml."""

import os
import shutil
import subprocess
from glob import glob
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# The x86-64 baseline every host of this project has (AVX2, FMA, F16C), never -march=native: the built
# module must run on any such CPU. Kernels compile faster paths (AVX-512, BF16, VNNI, AMX) with target
# attributes and pick them at run time (native/cpu/cpu_features.h). The kernels' threads are kvmux's own pool
# (native/cpu/thread_pool.h); OpenMP is used only for its `simd` loop pragmas.
# -fno-trapping-math lets GCC turn the selects in exp and silu into vector blends (without it those loops ran
# scalar: silu_mul 7x slower at 8 rows); no kernel reads the floating-point exception flags, and no value changes.
NATIVE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fno-trapping-math", "-fopenmp-simd"]
NVCC_FLAGS = ["-O3", "-Inative", "--use_fast_math", "-std=c++17", "-Xcompiler", "-fPIC", "--threads", "0",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def cpu_extension() -> Pybind11Extension:
    return Pybind11Extension(
        "kvmux._native",
        sorted(glob("native/*.cpp") + glob("native/allocator/*.cpp") + glob("native/cpu/*.cpp")),
        include_dirs=["native"],
        cxx_std=17,
        extra_compile_args=NATIVE_FLAGS,
        depends=sorted(glob("native/*.h") + glob("native/allocator/*.h") + glob("native/cpu/*.h")),
    )


def cuda_home() -> Path | None:
    """The CUDA toolkit root, or None where there is no nvcc (or KVMUX_NO_CUDA=1 asks to skip it)."""
    if os.environ.get("KVMUX_NO_CUDA") == "1":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root)
    return None


def cuda_extension(root: Path) -> Pybind11Extension:
    lib = root / "lib64" if (root / "lib64").is_dir() else root / "lib"
    ext = Pybind11Extension(
        "kvmux._native_cuda",
        ["native/cuda/bindings.cpp"],
        include_dirs=["native"],
        cxx_std=17,
        extra_compile_args=["-O2"],
        library_dirs=[str(lib)],
        # The static runtime makes the module importable without a CUDA
        # runtime library on the loader path; only the driver is needed, and
        # only when a kernel is launched.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        depends=sorted(glob("native/cuda/*") + ["native/dtype.h"]),
    )
    ext.cuda_sources = sorted(glob("native/cuda/*.cu"))
    ext.nvcc = str(root / "bin" / "nvcc")
    return ext


class BuildExt(build_ext):
    """pybind11's build_ext plus one step: .cu sources go through nvcc into objects linked into their module."""

    def build_extension(self, ext):
        cuda_sources = getattr(ext, "cuda_sources", [])
        if cuda_sources:
            ext.extra_objects = [self.compile_cuda(ext, src) for src in cuda_sources]
        super().build_extension(ext)

    def compile_cuda(self, ext, src: str) -> str:
        obj = Path(self.build_temp) / "cuda" / (Path(src).stem + ".o")
        deps = [src, *ext.depends]
        # nvcc for two architectures takes most of a minute; skip it when nothing changed.
        if self.force or not obj.exists() or any(Path(d).stat().st_mtime > obj.stat().st_mtime for d in deps):
            obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [ext.nvcc, *NVCC_FLAGS, "-c", src, "-o", str(obj)]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
        return str(obj)


def extensions() -> list:
    # Every build gets the CPU module; the CUDA one only where nvcc is found.
    exts = [cpu_extension()]
    root = cuda_home()
    if root is not None:
        exts.append(cuda_extension(root))
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
