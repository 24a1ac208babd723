"""Builds the native extension modules; package metadata lives in pyproject.toml."""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# OpenMP parallelises the CPU attention kernels that live in the same module.
NATIVE_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_extension() -> Pybind11Extension:
    return Pybind11Extension(
        "kvmux._native",
        sorted(glob("native/*.cpp")),
        cxx_std=17,
        extra_compile_args=NATIVE_FLAGS,
        extra_link_args=["-fopenmp"],
    )


def extensions() -> list:
    # Every build gets the CPU module; optional accelerator modules (CUDA,
    # only where nvcc is found) are appended here.
    return [cpu_extension()]


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext})
