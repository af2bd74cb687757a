"""Builds the C++ extensions: cotrt._C (the token automaton compiler) and cotrt._cpu (the
CPU decode kernels: linear and paged decode attention).

Plain C++17 with pybind11: no torch headers, so ``pip install .`` works with build
isolation on a CPU-only machine. Metadata lives in pyproject.toml.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


ext_modules = [
    Pybind11Extension(
        "cotrt._C",
        ["csrc/automaton.cpp", "csrc/bindings.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    # AVX2/FMA code is compiled per function (target attributes) and picked at run time,
    # so the module is built without -march flags and runs on any x86-64 (or other) CPU.
    Pybind11Extension(
        "cotrt._cpu",
        ["csrc/cpu_linear.cpp", "csrc/cpu_attention.cpp", "csrc/cpu_layer.cpp", "csrc/work_pool.cpp", "csrc/cpu_bindings.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread"],
        extra_link_args=["-pthread"],
    ),
]

# Every package under cotrt/ (found, so a new one cannot be left out of the wheel), and the
# top-level kernels/ folder installed as cotrt.kernels (package-dir in pyproject.toml).
packages = find_packages(include=["cotrt", "cotrt.*"]) + ["cotrt.kernels"]

setup(packages=packages, ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
