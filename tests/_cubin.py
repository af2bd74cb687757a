"""Triton test helpers for a CPU-only machine: the interpreter marker, and compiling a
kernel to cubin without a GPU to catch codegen errors (dot shapes, dtypes, shared memory),
in a subprocess since the test process runs Triton in interpreter mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_kernel(tmp_path, op: str, name: str, body: str) -> None:
    """Run ``body`` with ``k`` bound to ``kernels/<op>.py``'s JIT function ``name`` and
    ``triton``, ``GPUTarget``, ``ASTSource`` imported; skip when triton has no NVIDIA backend."""
    pytest.importorskip("triton")
    script = f"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
if "nvidia" not in triton.backends.backends:
    sys.exit(77)
try:
    from cotrt.kernels.{op} import {name} as k
except ModuleNotFoundError:
    from kernels.{op} import {name} as k
k = JITFunction(k.fn)
""" + body
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip("triton has no NVIDIA backend here")
    assert proc.returncode == 0, proc.stderr[-3000:]


def _interpreter_ready() -> bool:
    try:
        import triton.language.standard as tl_standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl_standard.zeros, InterpretedFunction)


interp = pytest.mark.skipif(
    not _interpreter_ready(),
    reason="needs triton imported with TRITON_INTERPRET=1 (another module imported triton first?)")
