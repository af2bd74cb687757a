"""cpu_attention: the paged CPU decode-attention kernel (cotrt._cpu) against
paged_decode_attention_ref and against torch SDPA on keys gathered by block table."""
import pytest
import torch
import torch.nn.functional as F

from cotrt.ops.cpu_attention import (HAS_CPU_ATTENTION, SPLIT, paged_decode_attention_cpu,
                                     paged_decode_attention_ref)
from cotrt.testing import assert_close, assert_flash_rule

pytestmark = pytest.mark.skipif(not HAS_CPU_ATTENTION, reason="cotrt._cpu is not built")

HEADS = [(9, 3), (4, 4), (8, 1), (14, 2)]
SLOT = "slot"  # PS = T: the slot layout, a 1-D [B] table


def make(B, H, KVH, D, PS, *, lengths, seed=0, dtype=torch.float32, cache_dtype=None, share=True,
         spare_columns=0):
    """A paged cache with random page ids (a pool with spare pages), -1 table entries past
    each row's pages (and ``spare_columns`` more), rows 0 and 1 sharing the pages their
    common prefix fills, and NaN in every cache position no row should read. PS == SLOT:
    one page of T = max(lengths) keys per row and a 1-D table. Returns launcher kwargs."""
    g = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    T = max(max(lengths), 1)
    slot = PS == SLOT
    PS = T if slot else PS
    NP = -(-T // PS) + spare_columns
    used = [-(-L // PS) for L in lengths]
    P = sum(used) + 3
    perm = torch.randperm(P, generator=g).tolist()
    tables = torch.full((B, NP), -1, dtype=torch.int64)
    k = torch.full((P, PS, KVH, D), float("nan"))
    v = torch.full((P, PS, KVH, D), float("nan"))
    for b, L in enumerate(lengths):
        for i in range(used[b]):
            if share and b == 1 and (i + 1) * PS <= min(lengths[:2]):
                tables[b, i] = tables[0, i]  # a full page of row 0's prefix
                continue
            page = perm.pop()
            tables[b, i] = page
            n = min(PS, L - i * PS)
            k[page, :n] = torch.randn(n, KVH, D, generator=g)
            v[page, :n] = torch.randn(n, KVH, D, generator=g)
    q = torch.randn(B, H, D, generator=g)
    tables = tables.to(torch.int32 if seed % 2 else torch.int64)
    return dict(q=q.to(dtype), k_cache=k.to(cache_dtype), v_cache=v.to(cache_dtype),
                block_tables=tables[:, 0].contiguous() if slot else tables,
                lengths=torch.tensor(lengths, dtype=torch.int64 if seed % 2 else torch.int32))


def lengths_for(B, PS):
    """The full table, one less (rows 0 and 1 share the pages of their common prefix), 0,
    1, a page boundary and past it (B = 8 takes them all)."""
    page = 16 if PS == SLOT else max(PS, 2)
    full = max(3 * page, 40)
    return [full, full - 1, 0, 1, page, 2 * page + 1, 5, 2][:B]


def gathered_sdpa(q, k_cache, v_cache, block_tables, lengths, scale=None, window=None, dtype=None):
    """torch SDPA per row on K/V gathered by the table, in ``dtype`` (default q's)."""
    dtype = dtype or q.dtype
    B, H, D = q.shape
    P, PS, KVH, _ = k_cache.shape
    tables = block_tables.view(B, -1)
    out = torch.zeros(B, H, D, dtype=dtype)
    for b in range(B):
        L = int(lengths[b])
        lo = max(0, L - window) if window else 0
        if L <= lo:
            continue
        pages = tables[b, :-(-L // PS)].long()
        k = k_cache[pages].reshape(-1, KVH, D)[lo:L].transpose(0, 1).to(dtype)  # [KVH, n, D]
        v = v_cache[pages].reshape(-1, KVH, D)[lo:L].transpose(0, 1).to(dtype)
        qb = q[b].to(dtype).view(KVH, H // KVH, D)
        out[b] = F.scaled_dot_product_attention(qb, k, v, scale=scale).reshape(H, D)
    return out


@pytest.mark.parametrize("PS", [1, 16, 24, SLOT])
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("H,KVH", HEADS)
@pytest.mark.parametrize("B", [1, 3, 8])
def test_matches_reference_and_sdpa(B, H, KVH, D, PS):
    seed = B * 1000 + H * 100 + D + (0 if PS == SLOT else PS)
    c = make(B, H, KVH, D, PS, lengths=lengths_for(B, PS), seed=seed)
    msg = f"B={B} H={H} KVH={KVH} D={D} PS={PS}"
    y1 = paged_decode_attention_cpu(**c, threads=1)
    y2 = paged_decode_attention_cpu(**c, threads=2)
    ref = paged_decode_attention_ref(**c)
    assert y1.dtype == torch.float32 and y1.shape == (B, H, D)
    assert torch.equal(y1, y2), msg  # work items and the merge order do not depend on threads
    assert_close(y1, ref, msg=msg)
    assert_close(ref, gathered_sdpa(**c), msg=msg + " (reference vs SDPA)")
    zero = c["lengths"] == 0
    assert torch.equal(y1[zero], torch.zeros_like(y1[zero]))


@pytest.mark.parametrize("q_dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("PS", [16, SLOT])
def test_bf16_flash_rule(q_dtype, cache_dtype, PS):
    """bf16 q/out and/or cache: no worse than 2x plain bf16 SDPA against the fp32 reference."""
    c = make(3, 9, 3, 64, PS, lengths=[300, 1, 47], seed=7, dtype=q_dtype, cache_dtype=cache_dtype)
    y = paged_decode_attention_cpu(**c, threads=2)
    assert y.dtype == q_dtype
    ref = paged_decode_attention_ref(**c)
    assert_flash_rule(y, ref, gathered_sdpa(**c, dtype=torch.bfloat16), msg=f"{q_dtype}/{cache_dtype} PS={PS}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_long_rows_split_into_key_ranges(threads):
    """Rows longer than SPLIT keys are cut into key ranges merged by log-sum-exp; batch 1
    and mixed lengths around multiples of SPLIT, with a window and softcap too."""
    lengths = [4 * SPLIT + 7, SPLIT, SPLIT + 1, 2 * SPLIT - 1]
    for kw in ({}, {"window": SPLIT + 40}, {"softcap": 10.0, "scale": 0.3}):
        for B in (1, 4):
            c = make(B, 14, 2, 64, 16, lengths=lengths[:B], seed=B + threads)
            y = paged_decode_attention_cpu(**c, **kw, threads=threads)
            assert_close(y, paged_decode_attention_ref(**c, **kw), msg=f"B={B} {kw}")
            assert torch.equal(y, paged_decode_attention_cpu(**c, **kw, threads=1))


@pytest.mark.parametrize("PS", [1, 16, 24, SLOT])
def test_softcap_and_window(PS):
    """Softcap (scores both sides of the polynomial/exp switch of tanh) and windows that
    cross page boundaries, are 1, or are longer than the row."""
    lengths = [70, 1, 33, 16, 0, 48]
    c = make(6, 8, 2, 80, PS, lengths=lengths, seed=11)
    c["q"] = c["q"] * 3  # scores of order 10: softcap matters
    for kw in ({"softcap": 50.0}, {"softcap": 2.0}, {"window": 1}, {"window": 17}, {"window": 40},
               {"window": 500}, {"window": 23, "softcap": 30.0, "scale": 0.07}):
        y = paged_decode_attention_cpu(**c, **kw, threads=2)
        assert_close(y, paged_decode_attention_ref(**c, **kw), msg=f"PS={PS} {kw}")
    no_cap = paged_decode_attention_cpu(**c)
    assert not torch.allclose(paged_decode_attention_cpu(**c, softcap=2.0), no_cap)
    assert_close(paged_decode_attention_cpu(**c, window=40), gathered_sdpa(**c, window=40), msg="window vs SDPA")


def test_bad_page_ids_and_lengths():
    """Needed page ids outside [0, P) zero the row (never read out of bounds); entries past
    the row's pages and pages wholly before its window are never read; lengths are
    clamped to [0, NP·PS]; the other rows are unaffected."""
    c = make(6, 9, 3, 64, 16, lengths=[40] * 6, seed=3, share=False, spare_columns=2)  # 3 pages of 5 used
    P = c["k_cache"].shape[0]
    t = c["block_tables"]
    t[0, 1] = -1            # a needed page: the row is zeros
    t[1, 2] = P             # the last needed page, one past the pool: zeros
    t[2, 3:] = 10 ** 9      # past the row's pages: never read
    c["lengths"][3] = 10 ** 6   # clamped to NP·PS = 80: needs the -1 pages 3, 4: zeros
    c["lengths"][4] = -5    # clamped to 0: zeros
    y = paged_decode_attention_cpu(**c, threads=2)
    assert_close(y, paged_decode_attention_ref(**c))
    for b in (0, 1, 3, 4):
        assert torch.equal(y[b], torch.zeros_like(y[b])), b
    assert y[2].abs().sum() > 0 and y[5].abs().sum() > 0
    # A length past a table whose pages are all valid reads the whole table.
    c = make(2, 9, 3, 64, 16, lengths=[48, 7], seed=4)
    expect = paged_decode_attention_cpu(**c)
    c["lengths"][0] = 10 ** 6
    assert torch.equal(paged_decode_attention_cpu(**c), expect)
    # Pages wholly before the window may be -1 (a sliding-window cache frees them).
    c = make(1, 4, 4, 16, 16, lengths=[70], seed=5)
    expect = paged_decode_attention_cpu(**c, window=20)  # keys 50..69: pages 3, 4
    c["block_tables"][0, :3] = -1
    assert torch.equal(paged_decode_attention_cpu(**c, window=20), expect)
    assert_close(expect, paged_decode_attention_ref(**c, window=20))


@pytest.mark.parametrize("D", [1, 7, 37])
def test_odd_head_dims(D):
    """Head dims that are not a multiple of 8 (the AVX2 kernel's scalar tails)."""
    c = make(3, 6, 2, D, 16, lengths=[SPLIT + 30, 9, 16], seed=D)
    for kw in ({}, {"softcap": 3.0, "window": 100}):
        assert_close(paged_decode_attention_cpu(**c, **kw), paged_decode_attention_ref(**c, **kw), msg=f"D={D} {kw}")


def test_strided_q_and_out():
    """q sliced out of a fused qkv projection ([B, (H + 2 KVH) D]); out a slice of a bigger buffer."""
    c = make(3, 9, 3, 64, 24, lengths=[50, 17, 72], seed=9)
    qkv = torch.randn(3, (9 + 6) * 64, generator=torch.Generator().manual_seed(1))
    c["q"] = qkv[:, :9 * 64].view(3, 9, 64)
    assert not c["q"].is_contiguous()
    buf = torch.full((3, 12, 70), float("nan"))
    out = buf[:, 2:11, 3:67]
    y = paged_decode_attention_cpu(**c, out=out)
    assert y is out
    assert_close(out, paged_decode_attention_ref(**c))
    assert buf[:, :2].isnan().all() and buf[:, :, :3].isnan().all() and buf[:, :, 67:].isnan().all()


def test_concurrent_callers():
    """Two Python threads calling at once (the GIL is released; one owns the pool, the
    other runs alone) get the results of serial calls."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [make(1 + i % 4, 9, 3, 64, 16, lengths=[300 + 37 * i, 5, 140, 64][:1 + i % 4], seed=i)
             for i in range(6)]
    serial = [paged_decode_attention_cpu(**c, threads=2) for c in cases]
    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(lambda c: [paged_decode_attention_cpu(**c, threads=2) for _ in range(20)], cases))
    for i, (ys, y0) in enumerate(zip(outs, serial)):
        for y in ys:
            assert torch.equal(y, y0), i


def test_empty_shapes():
    c = make(2, 4, 2, 16, 16, lengths=[0, 0], seed=0)
    assert torch.equal(paged_decode_attention_cpu(**c), torch.zeros(2, 4, 16))
    empty = dict(c, q=c["q"][:0], block_tables=c["block_tables"][:0], lengths=c["lengths"][:0])
    assert paged_decode_attention_cpu(**empty).shape == (0, 4, 16)


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(2, 4)), "q must be"),
    (dict(q=torch.zeros(2, 4, 8, dtype=torch.float16)), "q dtype"),
    (dict(k_cache=torch.zeros(3, 4, 2, 9)), "k_cache must be"),
    (dict(k_cache=torch.zeros(3, 4, 2, 8, dtype=torch.float64)), "k_cache dtype"),
    (dict(v_cache=torch.zeros(3, 4, 2, 8, dtype=torch.bfloat16)), "v_cache must"),
    (dict(k_cache=torch.zeros(3, 4, 3, 8), v_cache=torch.zeros(3, 4, 3, 8)), "multiple"),
    (dict(k_cache=torch.zeros(3, 2, 4, 8).transpose(1, 2)), "k_cache must be contiguous"),
    (dict(v_cache=torch.zeros(3, 2, 4, 8).transpose(1, 2)), "v_cache must be contiguous"),
    (dict(block_tables=torch.zeros(2, 3)), "block_tables must be"),
    (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), "block_tables must be"),
    (dict(block_tables=torch.zeros(3, 2, dtype=torch.int32).t()), "block_tables rows"),
    (dict(lengths=torch.zeros(2)), "lengths must be"),
    (dict(lengths=torch.zeros(2, 1, dtype=torch.int32)), "lengths must be"),
    (dict(scale=float("nan")), "scale"),
    (dict(softcap=0.0), "softcap"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(out=torch.zeros(2, 4, 8, dtype=torch.bfloat16)), "out must be"),
    (dict(out=torch.zeros(2, 8, 4).transpose(1, 2)), "out must have unit stride"),
    (dict(q=torch.zeros(2, 8, 4).transpose(1, 2)), "q must have unit stride"),
    (dict(threads=1.5), "threads"),
    (dict(q=torch.zeros(2, 4, 8, device="meta")), "q is on meta"),
])
def test_bad_arguments_name_the_argument(bad, match):
    args = dict(q=torch.zeros(2, 4, 8), k_cache=torch.zeros(3, 4, 2, 8), v_cache=torch.zeros(3, 4, 2, 8),
                block_tables=torch.zeros(2, 3, dtype=torch.int32), lengths=torch.zeros(2, dtype=torch.int64))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_cpu(**args)


def test_portable_kernel_matches_reference():
    """The scalar fallback (what a CPU without AVX2/FMA runs), forced by COTRT_CPU_ISA."""
    import os
    import subprocess
    import sys

    code = """
import sys, torch
sys.path.insert(0, %r)
from test_cpu_attention import make
from cotrt import _cpu
from cotrt.ops.cpu_attention import paged_decode_attention_cpu, paged_decode_attention_ref
assert _cpu.isa() == "scalar", _cpu.isa()
for dt in (torch.float32, torch.bfloat16):
    c = make(3, 9, 3, 37, 16, lengths=[300, 0, 45], seed=1, cache_dtype=dt)
    for kw in ({}, {"softcap": 5.0, "window": 150}):
        err = (paged_decode_attention_cpu(**c, **kw, threads=2) - paged_decode_attention_ref(**c, **kw)).abs().max()
        assert err < 1e-5, (dt, kw, err.item())
print("ok")
""" % os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, COTRT_CPU_ISA="scalar")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
