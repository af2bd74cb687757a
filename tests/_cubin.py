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


def compile_variants(tmp_path, op: str, name: str, variants: list[dict]) -> None:
    """Compile ``kernels/<op>.py``'s ``name`` to cubin once per variant, a dict of:
    ``dtype`` ("bf16", "fp16", "fp32": every pointer not in ``ptr_types``), ``constexprs``
    (name -> value), ``arch`` (80, 89, 90), ``options`` (num_warps, ...), optional
    ``ptr_types`` (argument -> "*i32", ...) and ``floats`` (scalar arguments that are fp32;
    the other scalars are i32)."""
    import json

    body = f"""
import json
for v in json.loads({json.dumps(json.dumps(variants))}):
    cfg, ptr, floats = v["constexprs"], v.get("ptr_types", {{}}), v.get("floats", [])
    sig = {{n: (ptr.get(n, "*" + v["dtype"]) if n.endswith("_ptr") else "fp32" if n in floats else "i32")
           for n in k.arg_names}}
    sig.update({{c: "constexpr" for c in cfg}})
    src = ASTSource(fn=k, signature=sig, constexprs={{(k.arg_names.index(c),): x for c, x in cfg.items()}})
    out = triton.compile(src, target=GPUTarget("cuda", v["arch"], 32), options=v["options"])
    assert out.asm.get("cubin"), v
"""
    compile_kernel(tmp_path, op, name, body)
