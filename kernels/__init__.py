"""Triton kernels (installed as cotrt.kernels): @triton.jit code only, one file per op."""
