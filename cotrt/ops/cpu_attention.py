"""cpu_attention: decode attention on CPU over a paged KV cache, reading the pages in place.

    out[b, h] = softmax(cap(scale · q[b, h] · Kᵀ)) · V,   keys n in [max(0, L - window), L)
    K[n] = k_cache[block_tables[b, n // PS], n % PS, h // G]   (V likewise)

with ``L = lengths[b]`` clamped to [0, NP·PS], ``G = H // KVH`` query heads per kv head
(GQA) and ``cap(s) = softcap · tanh(s / softcap)`` when softcap is given (Gemma2); the
window is HF's (key n is visible from the query at position L - 1 iff n > L - 1 - window).
These are the semantics of ``cotrt.ops.decode_attention.decode_attention``, the Triton op.

A decode step of SmolLM2-135M on CPU spent ~0.2 ms per layer in torch's SDPA call, and a
paged cache would add a gather of every row's K/V per layer per step. The C++ kernel
(csrc/cpu_attention.cpp, module ``cotrt._cpu``) reads the pages through the block table:
work items of (row, up to ``SPLIT`` keys) claimed from the work pool (csrc/work_pool.h),
each streaming its keys' whole K/V rows (every kv head) once for all H queries; a longer
row is split into key ranges merged by log-sum-exp, so batch 1 uses every thread. Scores,
softmax and P·V accumulate in fp32; the result does not depend on the thread count.

Table and length values are read by the kernel, never checked against the host (the
arguments are the same device tensors a graph-captured step refills in place):

- L outside [0, NP·PS] is clamped; a row with no key (L == 0) gives zeros.
- Table entries of pages the row does not need (at/after ceil(L / PS), or wholly before
  its window) are never read: they may hold anything (-1 for unallocated pages).
- A needed page id outside [0, P) makes the whole row zeros (it is never read out of
  bounds): a bad table is the caller's bug, and a zero row is what the Triton op gives for
  a slot out of range.

- :func:`paged_decode_attention_cpu` — the launcher (validates, then calls the kernel).
- :func:`paged_decode_attention_ref` — the fp32 reference, a loop over rows (the oracle).
- ``HAS_CPU_ATTENTION`` — whether ``cotrt._cpu`` is built here.
"""
from __future__ import annotations

import math

import torch

from ._triton import INDEX_DTYPES, shape_of

try:
    from cotrt import _cpu
except ImportError:  # pragma: no cover - built by setup.py; absent in a source tree never built
    _cpu = None

HAS_CPU_ATTENTION = _cpu is not None and hasattr(_cpu, "paged_decode_attention")
SPLIT = _cpu.ATTENTION_SPLIT if HAS_CPU_ATTENTION else 128  # keys per work item (csrc/cpu_attention.h)
_DTYPES = (torch.float32, torch.bfloat16)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(q, k_cache, v_cache, block_tables, lengths, scale, softcap, window, out):
    """Validate shapes, dtypes, devices and strides. Returns (B, H, D, P, PS, KVH, tables)
    with ``tables`` the [B, NP] view of block_tables (a 1-D [B] table is the slot layout:
    one page of PS keys per row)."""
    name = "paged_decode_attention_cpu"
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"{name}: q must be a 3-D tensor [B, H, D], got {shape_of(q)}")
    B, H, D = q.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"{name}: q dtype must be float32 or bfloat16, got {q.dtype}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or k_cache.shape[3] != D:
        raise ValueError(f"{name}: k_cache must be a 4-D tensor [P, PS, KVH, D={D}], got {shape_of(k_cache)}")
    P, PS, KVH, _ = k_cache.shape
    if k_cache.dtype not in _DTYPES:
        raise ValueError(f"{name}: k_cache dtype must be float32 or bfloat16, got {k_cache.dtype}")
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{name}: v_cache must have k_cache's shape {tuple(k_cache.shape)} and dtype "
                         f"{k_cache.dtype}, got {shape_of(v_cache)}"
                         f"{' ' + str(v_cache.dtype) if isinstance(v_cache, torch.Tensor) else ''}")
    if KVH == 0 or H % KVH != 0:
        raise ValueError(f"{name}: q's H={H} heads must be a multiple of k_cache's KVH={KVH} heads")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() not in (1, 2) \
            or block_tables.shape[0] != B or block_tables.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name}: block_tables must be an int32/int64 [B={B}, NP] (or slot-layout [B={B}]) "
                         f"tensor, got {shape_of(block_tables)}"
                         f"{' ' + str(block_tables.dtype) if isinstance(block_tables, torch.Tensor) else ''}")
    tables = block_tables if block_tables.dim() == 2 else block_tables[:, None]
    if tables.shape[1] > 1 and tables.stride(1) != 1:
        raise ValueError(f"{name}: block_tables rows must be contiguous, got strides {tuple(block_tables.stride())}")
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,) or lengths.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name}: lengths must be an int32/int64 [B={B}] tensor, got {shape_of(lengths)}"
                         f"{' ' + str(lengths.dtype) if isinstance(lengths, torch.Tensor) else ''}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"{name}: scale must be a finite number or None, got {scale!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or not softcap > 0):
        raise ValueError(f"{name}: softcap must be a finite number > 0 or None, got {softcap!r}")
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"{name}: window must be an int >= 1 or None, got {window!r}")
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, H, D)
                            or out.dtype != q.dtype):
        raise ValueError(f"{name}: out must be [B={B}, H={H}, D={D}] of dtype {q.dtype}, got {shape_of(out)}"
                         f"{' ' + str(out.dtype) if isinstance(out, torch.Tensor) else ''}")
    for arg, t in (("q", q), ("out", out)):
        if t is not None and D > 1 and t.stride(2) != 1:
            raise ValueError(f"{name}: {arg} must have unit stride along its last dim, got strides "
                             f"{tuple(t.stride())} (call .contiguous())")
    for arg, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous (the kernel walks pages of PS·KVH·D elements)")
    for arg, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                   ("lengths", lengths), ("out", out)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name}: {arg} is on {t.device}; the kernel is CPU-only")
    return B, H, D, P, PS, KVH, tables


def paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, lengths, *, scale=None, softcap=None,
                               window=None, out=None, threads: int = 0):
    """Attention of one new query per row over its pages of the KV cache, on CPU.

    Args:
        q: [B, H, D] float32 or bfloat16, the new token's queries (last dim unit-stride;
            other strides free, e.g. a [B, 1, H, D] transpose's ``[:, 0]``).
        k_cache, v_cache: [P, PS, KVH, D] float32 or bfloat16 (both the same; may differ
            from q's dtype), contiguous: P pages of PS tokens. H % KVH == 0.
        block_tables: [B, NP] int32/int64 with contiguous rows: row b's key n lives in page
            ``block_tables[b, n // PS]`` (rows may share pages). A 1-D [B] tensor is the
            slot layout, [B, 1]: one page (slot) of PS = T keys per row.
        lengths: [B] int32/int64, row b attends keys 0 .. lengths[b] - 1 (clamped to
            [0, NP·PS]); the caller has already written the new token's key at L - 1.
        scale: the score scale, default D ** -0.5.
        softcap: None or > 0: scores become softcap · tanh(scores / softcap).
        window: None or int >= 1: attend only keys n >= lengths[b] - window.
        out: [B, H, D] of q's dtype to write into (last dim unit-stride), or None.
        threads: at most this many threads, the caller's included; <= 0 for torch's
            ``get_num_threads()``. The kernel takes one more thread per ~2^18 FMAs of work
            (waking one costs a few microseconds), so a short batch-1 call runs alone.

    Returns:
        [B, H, D] of q's dtype (``out`` when given). A row with no key, or with a needed
        page id outside [0, P), is zeros (see the module docstring).
    """
    if not HAS_CPU_ATTENTION:
        raise RuntimeError("paged_decode_attention_cpu: cotrt._cpu is not built (run `pip install -e .` or "
                           "`python setup.py build_ext --inplace`)")
    if not _is_int(threads):
        raise ValueError(f"paged_decode_attention_cpu: threads must be an int, got {threads!r}")
    *_, tables = _check(q, k_cache, v_cache, block_tables, lengths, scale, softcap, window, out)
    return _launch(q, k_cache, v_cache, tables, lengths, scale, softcap, window, out, threads)


def _launch(q, k_cache, v_cache, tables, lengths, scale, softcap, window, out, threads):
    """The call without validation (callers that checked their fixed tensors once);
    ``tables`` is 2-D."""
    B, H, D = q.shape
    P, PS, KVH, _ = k_cache.shape
    y = torch.empty((B, H, D), dtype=q.dtype) if out is None else out
    _cpu.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lengths.data_ptr(), y.data_ptr(),
        B, H, KVH, D, P, PS, tables.shape[1],
        q.stride(0), q.stride(1), tables.stride(0), lengths.stride(0), y.stride(0), y.stride(1),
        D ** -0.5 if scale is None else float(scale), 0.0 if softcap is None else float(softcap),
        0 if window is None else window,
        q.dtype == torch.bfloat16, k_cache.dtype == torch.bfloat16, tables.dtype == torch.int64,
        lengths.dtype == torch.int64, threads if threads > 0 else torch.get_num_threads())
    return y


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lengths, *, scale=None, softcap=None,
                               window=None):
    """The fp32 reference: each row's live keys gathered page by page, every head at once.
    Same arguments and value semantics as :func:`paged_decode_attention_cpu`; returns fp32
    [B, H, D]."""
    B, H, D, P, PS, KVH, tables = _check(q, k_cache, v_cache, block_tables, lengths, scale, softcap, window, None)
    scale = D ** -0.5 if scale is None else float(scale)
    G = H // KVH
    NP = tables.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float32)
    for b in range(B):
        L = min(max(int(lengths[b]), 0), NP * PS)
        lo = max(0, L - window) if window is not None else 0
        if L <= lo:
            continue  # no key: zeros
        pages = [int(tables[b, i]) for i in range(lo // PS, -(-L // PS))]
        if any(not 0 <= p < P for p in pages):
            continue  # a needed page out of range: zeros
        first = lo // PS * PS  # position of the first gathered key
        k = k_cache[pages].reshape(-1, KVH, D)[lo - first:L - first].float()  # [n, KVH, D]
        v = v_cache[pages].reshape(-1, KVH, D)[lo - first:L - first].float()
        qb = q[b].float().view(KVH, G, D)
        s = torch.einsum("kgd,nkd->kgn", qb, k) * scale  # [KVH, G, n]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("kgn,nkd->kgd", p, v).reshape(H, D)
    return out
