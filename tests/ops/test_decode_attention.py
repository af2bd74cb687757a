"""decode_attention: the launcher's torch path and Triton kernels against decode_attention_ref.

CPU tier, slot form (block_tables [B]: a cache [S, T, KVH, D], one page of T per row): the
reference against an independent oracle (SDPA over each row's keys gathered by hand, with
an explicit HF-style window mask; soft-capping by explicit per-head math); the torch path
over B in {1, 3, 5} x (H, KVH) in {(4, 4), (6, 2), (8, 2), (14, 2)} x D in {16, 64, 80} x
T in {37, 300}, and the Triton kernels (interpreter, fp32 and fp16) over a cut of that grid
with small chunks (several splits, empty ones included); lengths 1 and T, repeated and
strided slots, strided q / cache / out, softcap, window below and above the length, scale.
Row independence and dead positions holding NaN; out-of-range values; validation.

CPU tier, paged form (block_tables [B, NP]): page sizes 1, 16, 24 and 64 with permuted page
ids, rows sharing a prefix of pages, -1 entries past the length (and before the window),
lengths 0, 1, a page boundary and NP · PS, GQA, softcap, windows crossing page boundaries,
strided tables and caches, chunks cutting pages or not (both the per-key and per-tile page
lookups), fp32 and fp16; the slot form equal to the same cache viewed as pages; page ids
out of range; validation; the paged kernel compiled to cubin for sm_80/90.

GPU tier (marker ``gpu``): fp16/bf16 under flash-attention's rule, fp32, and CUDA-graph
captures replayed with new slots / block tables / lengths.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton's interpreter is chosen when triton is first imported; on a CPU-only machine
    # nothing can use compiled Triton anyway.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _cubin import compile_variants, interp  # noqa: E402
from cotrt.testing import assert_close, assert_flash_rule  # noqa: E402
from cotrt.ops.decode_attention import decode_attention, decode_attention_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_case(B, H, KVH, D, T, *, dtype=torch.float32, device="cpu", seed=0, softcap=None, window=None,
              scale=None, layout="contig", lengths=None, extra_slots=3):
    """Inputs of order 1 (scores ~ N(0, 1) at the default scale). The cache has
    S = B + extra_slots slots; rows take distinct random slots except the last of 3+ rows,
    which repeats the first's (a padding row sharing a scratch slot) with its own length.
    Default lengths: T, 1, then random (B = 1: T, 1 or random by seed).

    layout "strided": q is a [:, 1] slice of [B, 3, H, D] (row stride 3·H·D); the cache is
    a slice of a bigger one (offset slot, T + 5 positions, head dim padded, so every stride
    differs from the contiguous one); slots and lengths are every other element of longer
    tensors. "transpose": q is an [H, B, D] tensor transposed (head stride B·D). The slots
    are passed as ``block_tables`` [B] (the slot form)."""
    g = torch.Generator().manual_seed(seed)
    S = B + extra_slots

    def rnd(*shape):  # views are taken after the move: .to() would make them contiguous
        return torch.randn(*shape, generator=g).to(device, dtype)

    if layout == "strided":
        q = rnd(B, 3, H, D)[:, 1]
        k = rnd(S + 1, T + 5, KVH, D + 3)[1:, :T, :, :D]
        v = rnd(S + 1, T + 5, KVH, D + 3)[1:, :T, :, :D]
    else:
        q = rnd(H, B, D).transpose(0, 1) if layout == "transpose" else rnd(B, H, D)
        k, v = rnd(S, T, KVH, D), rnd(S, T, KVH, D)
    slots = torch.randperm(S, generator=g)[:B]
    if B >= 3:
        slots[-1] = slots[0]
    if lengths is None:
        rnd = torch.randint(1, T + 1, (B,), generator=g)
        lengths = torch.tensor([T, 1, int(rnd[0])][seed % 3:seed % 3 + 1]) if B == 1 else \
            torch.cat([torch.tensor([T, 1]), rnd[2:]])
    lengths = torch.as_tensor(lengths)
    index_dtype = torch.int64 if seed % 2 else torch.int32
    slots, lengths = slots.to(device, index_dtype), lengths.to(device, index_dtype)
    if layout == "strided":
        slots = torch.stack([slots, torch.full_like(slots, -9)], 1).reshape(-1)[::2]
        lengths = torch.stack([lengths, torch.full_like(lengths, 10**6)], 1).reshape(-1)[::2]
    return dict(q=q, k_cache=k, v_cache=v, block_tables=slots, lengths=lengths, scale=scale, softcap=softcap,
                window=window)


def make_paged_case(B, H, KVH, D, PS, NP, *, dtype=torch.float32, device="cpu", seed=0, softcap=None,
                    window=None, scale=None, lengths=None, share=0, layout="contig", extra_pages=3):
    """A paged cache of P = B · NP + extra_pages pages, handed out in random order: row b's
    table holds ceil(L_b / PS) pages, then -1 (unallocated). With ``share`` > 0 row 1's
    table starts with row 0's first ``share`` pages (a shared prefix: the same keys).
    Default lengths: NP · PS, PS + 1 (one key past a page boundary), 1, 0, PS (a page
    boundary), then random.

    layout "strided": q is a [:, 1] slice of [B, 3, H, D]; the cache is a slice of a bigger
    one (offset page, PS + 3 positions, head dim padded); the table is every other column
    of a [B, 2 · NP] tensor and lengths every other element. "transpose": q is an [H, B, D]
    tensor transposed and the table an [NP, B] tensor transposed."""
    g = torch.Generator().manual_seed(seed)
    P = B * NP + extra_pages

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if layout == "strided":
        q = rnd(B, 3, H, D)[:, 1]
        k = rnd(P + 1, PS + 3, KVH, D + 3)[1:, :PS, :, :D]
        v = rnd(P + 1, PS + 3, KVH, D + 3)[1:, :PS, :, :D]
    else:
        q = rnd(H, B, D).transpose(0, 1) if layout == "transpose" else rnd(B, H, D)
        k, v = rnd(P, PS, KVH, D), rnd(P, PS, KVH, D)
    if lengths is None:
        lengths = ([NP * PS, PS + 1, 1, 0, PS] + torch.randint(0, NP * PS + 1, (B,), generator=g).tolist())[:B]
    lengths = torch.as_tensor(lengths).clamp(0, NP * PS)
    table = torch.randperm(P, generator=g)[:B * NP].view(B, NP)
    if share:
        table[1, :share] = table[0, :share]
    dead = torch.arange(NP)[None, :] >= (lengths[:, None] + PS - 1) // PS
    table[dead] = -1
    index_dtype = torch.int64 if seed % 2 else torch.int32
    table, lengths = table.to(device, index_dtype), lengths.to(device, index_dtype)
    if layout == "strided":
        table = torch.stack([table, torch.full_like(table, -5)], 2).reshape(B, 2 * NP)[:, ::2]
        lengths = torch.stack([lengths, torch.full_like(lengths, 10**6)], 1).reshape(-1)[::2]
    elif layout == "transpose":
        table = table.t().contiguous().t()
    return dict(q=q, k_cache=k, v_cache=v, block_tables=table, lengths=lengths, scale=scale, softcap=softcap,
                window=window)


# ------------------------------------------------------------------------------ reference


def _logical(c):
    """Each row's logical K and V, [B, NP · PS, KVH, D]: its pages in table order, written
    independently of the op (a Python loop; unallocated entries give NaN pages)."""
    k_cache, v_cache, table = c["k_cache"], c["v_cache"], c["block_tables"]
    table = table[:, None] if table.dim() == 1 else table
    P = k_cache.shape[0]

    def page(cache, p):
        return cache[p] if 0 <= p < P else torch.full_like(cache[0], float("nan"))

    k = torch.stack([torch.cat([page(k_cache, p) for p in row]) for row in table.tolist()])
    v = torch.stack([torch.cat([page(v_cache, p) for p in row]) for row in table.tolist()])
    return k, v


def _sdpa_oracle(c):
    """Per row: its NP · PS logical keys with an explicit HF mask (key k visible from
    position p = L - 1 iff k <= p and k > p - window), SDPA with enable_gqa. No softcap."""
    q = c["q"].float()
    k_rows, v_rows = (x.float().nan_to_num() for x in _logical(c))
    B, H, D = q.shape
    T = k_rows.shape[1]
    out = torch.zeros(B, H, D)
    for b in range(B):
        L = int(c["lengths"][b])
        p = L - 1
        kk = torch.arange(T)
        mask = kk <= p
        if c["window"] is not None:
            mask &= kk > p - c["window"]
        if not mask.any():
            continue
        k = k_rows[b].transpose(0, 1)[None]  # (1, KVH, T, D)
        v = v_rows[b].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q[b][None, :, None], k, v, attn_mask=mask[None, None, None],
                                           scale=c["scale"], enable_gqa=True)  # (1, H, 1, D)
        out[b] = o[0, :, 0]
    return out


def _math_oracle(c):
    """Per row and head, explicit fp64 math, softcap included (kv head h // G by index)."""
    q = c["q"].double()
    k_rows, v_rows = (x.double() for x in _logical(c))
    B, H, D = q.shape
    KVH = k_rows.shape[2]
    scale = D ** -0.5 if c["scale"] is None else c["scale"]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        L = int(c["lengths"][b])
        keys = [t for t in range(L) if c["window"] is None or t >= L - c["window"]]
        if not keys:
            continue
        for h in range(H):
            kv = h // (H // KVH)
            scores = torch.stack([q[b, h] @ k_rows[b, t, kv] * scale for t in keys])
            if c["softcap"] is not None:
                scores = c["softcap"] * torch.tanh(scores / c["softcap"])
            w = torch.exp(scores - scores.max())
            out[b, h] = sum(w[i] * v_rows[b, t, kv] for i, t in enumerate(keys)) / w.sum()
    return out


@pytest.mark.parametrize("window", [None, 1, 5, 100])
@pytest.mark.parametrize("H,KVH", [(4, 4), (6, 2)])
def test_ref_matches_sdpa_oracle(H, KVH, window):
    c = make_case(5, H, KVH, 16, 37, seed=H + (window or 0), window=window, scale=0.2 if KVH == 2 else None,
                  layout="strided")
    c["lengths"][1] = 0  # an empty row: zeros
    y = decode_attention_ref(**c)
    assert_close(y, _sdpa_oracle(c), msg=f"H={H} KVH={KVH} window={window}")
    assert not y[1].any()


@pytest.mark.parametrize("softcap,window", [(1.5, None), (30.0, 7)])
def test_ref_matches_math_oracle_with_softcap(softcap, window):
    c = make_case(3, 6, 2, 16, 37, seed=4, softcap=softcap, window=window, scale=1.0)
    assert_close(decode_attention_ref(**c), _math_oracle(c), msg=f"softcap={softcap} window={window}")


# ------------------------------------------------------------------------------ grid

HEADS = [(4, 4), (6, 2), (8, 2), (14, 2)]


def _grid_case(B, H, KVH, D, T, **kw):
    """Every option in turn: softcap, window (below and above the lengths), scale and the
    layouts cycle with the case's position in the grid."""
    i = B + H + D + T // 37
    return make_case(B, H, KVH, D, T, seed=i, softcap=[None, 1.5, None, 20.0][i % 4],
                     window=[None, 5, None, T + 10, 1][i % 5], scale=[None, 0.3][i % 3 == 2],
                     layout=["contig", "strided", "transpose"][i % 3], **kw)


def _grid_id(B, H, KVH, D, T):
    return f"B{B}-H{H}-KVH{KVH}-D{D}-T{T}"


GRID = [(B, H, KVH, D, T) for B in (1, 3, 5) for (H, KVH) in HEADS for D in (16, 64, 80) for T in (37, 300)]
# The interpreter runs each program in numpy (~5-10 ms): a cut of the grid that still
# holds every B, head layout, D and T.
TRITON_GRID = GRID[::5]


def _chunk(T):
    return 16 if T < 100 else 64  # 3 or 5 splits: short rows leave most of them empty


@pytest.mark.parametrize("B,H,KVH,D,T", GRID, ids=[_grid_id(*g) for g in GRID])
def test_torch_path_matches_ref(B, H, KVH, D, T):
    c = _grid_case(B, H, KVH, D, T)
    assert_close(decode_attention(**c, impl="torch"), decode_attention_ref(**c), msg=_grid_id(B, H, KVH, D, T))


@interp
@pytest.mark.parametrize("B,H,KVH,D,T", TRITON_GRID, ids=[_grid_id(*g) for g in TRITON_GRID])
def test_triton_fp32_matches_ref(B, H, KVH, D, T):
    c = _grid_case(B, H, KVH, D, T)
    y = decode_attention(**c, chunk=_chunk(T), impl="triton")
    assert_close(y, decode_attention_ref(**c), msg=_grid_id(B, H, KVH, D, T))


@interp
@pytest.mark.parametrize("chunk", [None, 24, 1000])
def test_triton_chunk_choices(chunk):
    """Default chunk (one split per 256 keys), a chunk that is neither a power of two nor a
    divisor of T, and a chunk past T (one split)."""
    c = make_case(3, 6, 2, 64, 300, seed=2, window=40, lengths=[300, 250, 24])
    assert_close(decode_attention(**c, chunk=chunk, impl="triton"), decode_attention_ref(**c), msg=f"chunk={chunk}")


@interp
@pytest.mark.parametrize("B,H,KVH,D,T,softcap,window", [(3, 6, 2, 80, 37, None, None), (5, 14, 2, 64, 300, 20.0, 50),
                                                        (1, 8, 2, 16, 300, None, 3)])
def test_triton_fp16_matches_ref(B, H, KVH, D, T, softcap, window):
    c = make_case(B, H, KVH, D, T, dtype=torch.float16, seed=B, softcap=softcap, window=window)
    y = decode_attention(**c, chunk=_chunk(T), impl="triton")
    assert y.dtype == torch.float16
    # fp32 scores and sums; only the probabilities (for P·V) and the output are rounded.
    assert_close(y, decode_attention_ref(**c), dtype=torch.float16, msg=f"fp16 {_grid_id(B, H, KVH, D, T)}")


def test_torch_path_fp16_matches_ref():
    c = make_case(3, 14, 2, 64, 300, dtype=torch.float16, seed=3, softcap=20.0, window=50)
    y = decode_attention(**c, impl="torch")
    assert y.dtype == torch.float16
    assert_close(y, decode_attention_ref(**c), dtype=torch.float16)


# ------------------------------------------------------------------------------ rows, dead keys, edges

IMPLS = ["torch", pytest.param("triton", marks=interp)]


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_are_independent(impl):
    """Row 0's output is bit-identical when other rows' caches, lengths and slots change."""
    c = make_case(5, 6, 2, 64, 300, seed=1, window=100)
    kw = dict(chunk=64, impl=impl)
    y = decode_attention(**c, **kw)
    s0 = int(c["block_tables"][0])
    others = torch.ones(c["k_cache"].shape[0], dtype=torch.bool)
    others[s0] = False
    c2 = dict(c, k_cache=c["k_cache"].clone(), v_cache=c["v_cache"].clone(), lengths=c["lengths"].clone(),
              block_tables=c["block_tables"].clone())
    c2["k_cache"][others] = torch.randn_like(c2["k_cache"][others]) * 3
    c2["v_cache"][others] = float("nan")
    c2["lengths"][1:] = torch.tensor([7, 300, 0, 150], dtype=c2["lengths"].dtype)
    c2["block_tables"][1:] = c2["block_tables"][1:].flip(0)
    c2["block_tables"][4] = int(others.nonzero()[0])  # no longer sharing row 0's slot
    y2 = decode_attention(**c2, **kw)
    assert torch.equal(y[0], y2[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_dead_positions_may_hold_nan(impl):
    """Keys/values past a row's length and before its window are never used."""
    c = make_case(3, 8, 2, 16, 300, seed=5, window=20, lengths=[300, 150, 60], extra_slots=0)
    c["block_tables"] = torch.tensor([2, 0, 1], dtype=c["block_tables"].dtype)  # no slot shared
    want = decode_attention_ref(**c)
    for b, (s, L) in enumerate(zip(c["block_tables"].tolist(), c["lengths"].tolist())):
        for cache in (c["k_cache"], c["v_cache"]):
            cache[s, L:] = float("nan")
            cache[s, :L - 20] = float("inf")
    y = decode_attention(**c, chunk=64, impl=impl)
    assert_close(y, want, msg="dead positions poisoned")


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_slots_and_empty_rows(impl):
    """Padding rows point at one scratch slot with length 0: zeros, not NaN. Rows sharing a
    slot with the same length and query agree exactly."""
    c = make_case(5, 6, 2, 16, 37, seed=0, lengths=[37, 0, 20, 0, 20], extra_slots=0)
    c["block_tables"] = torch.tensor([2, 4, 2, 4, 2], dtype=c["block_tables"].dtype)
    c["q"][4] = c["q"][2]
    y = decode_attention(**c, chunk=16, impl=impl)
    assert_close(y, decode_attention_ref(**c))
    assert not y[1].any() and not y[3].any()
    assert torch.equal(y[2], y[4])


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_values_stay_in_bounds(impl):
    """Lengths past T act as T, negative lengths and slots outside [0, S) give zero rows
    (the values are not checked: that would cost a device sync)."""
    c = make_case(4, 4, 4, 16, 37, seed=2, lengths=[37, 37, 5, 5], extra_slots=0)
    want = decode_attention_ref(**c)
    c["lengths"] = torch.tensor([1000, 37, -3, 5], dtype=c["lengths"].dtype)
    c["block_tables"] = c["block_tables"].clone()
    c["block_tables"][1], c["block_tables"][3] = 4, -1  # S = 4
    y = decode_attention(**c, chunk=16, impl=impl)
    assert_close(y[0], want[0])
    assert not y[1:].any()
    with pytest.raises(ValueError, match="row 0 has length 1000"):
        decode_attention_ref(**c)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_strided_and_poisoned(impl):
    c = make_case(3, 14, 2, 64, 37, seed=7, softcap=20.0)
    out = torch.full((3, 14, 2 * 64), float("nan"))[:, :, 3:67]
    y = decode_attention(**c, out=out, chunk=16, impl=impl)
    assert y is out
    assert_close(out, decode_attention_ref(**c))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_and_empty_cache(impl):
    c = make_case(1, 4, 2, 16, 37, seed=0)
    e = dict(c, q=c["q"][:0], block_tables=c["block_tables"][:0], lengths=c["lengths"][:0])
    assert decode_attention(**e, impl=impl).shape == (0, 4, 16)
    z = dict(c, k_cache=c["k_cache"][:, :0], v_cache=c["v_cache"][:, :0])
    assert torch.equal(decode_attention(**z, impl=impl), torch.zeros(1, 4, 16))


@interp
def test_triton_refuses_bf16_in_interpreter_and_large_head_dim():
    with pytest.raises(ValueError, match="bfloat16"):
        decode_attention(**make_case(1, 4, 2, 16, 37, dtype=torch.bfloat16), impl="triton")
    with pytest.raises(ValueError, match="D <= 256"):
        decode_attention(**make_case(1, 4, 2, 264, 37), impl="triton")
    c = make_case(1, 4, 2, 264, 37)  # the torch path has no limit
    assert_close(decode_attention(**c, impl="torch"), decode_attention_ref(**c))


def test_auto_uses_torch_on_cpu(monkeypatch):
    import cotrt.ops.decode_attention as mod

    monkeypatch.setattr(mod, "_decode_attention_triton", lambda *a, **k: pytest.fail("triton on CPU"))
    c = make_case(3, 6, 2, 16, 37, seed=1)
    assert_close(decode_attention(**c), decode_attention_ref(**c))


# ------------------------------------------------------------------------------ paged

# (PS, NP): one key a page, 16 (vLLM's default), a non-power-of-two 24 and 64; 40 to 256
# keys a row.
PAGES = [(1, 40), (16, 7), (24, 5), (64, 4)]
PAGED_GRID = [(B, H, KVH, D, PS, NP) for (PS, NP) in PAGES for (H, KVH) in [(4, 4), (6, 2), (14, 2)]
              for (B, D) in [(5, 16), (3, 80)]]
PAGED_TRITON_GRID = PAGED_GRID[::3]  # every page size and head layout, both D


def _paged_id(B, H, KVH, D, PS, NP):
    return f"B{B}-H{H}-KVH{KVH}-D{D}-PS{PS}-NP{NP}"


def _paged_grid_case(B, H, KVH, D, PS, NP, **kw):
    """Options cycling with the case's position: softcap, windows crossing page boundaries
    (PS + 3, 2 · PS - 1) or within a page (3), scale, layouts, a shared prefix."""
    i = B + H + D + PS
    return make_paged_case(B, H, KVH, D, PS, NP, seed=i, softcap=[None, 1.5, None, 20.0][i % 4],
                           window=[None, PS + 3, None, 2 * PS - 1, 3][i % 5], scale=[None, 0.3][i % 3 == 2],
                           layout=["contig", "strided", "transpose"][i % 3], share=2 if i % 2 else 0, **kw)


@pytest.mark.parametrize("PS,NP", PAGES)
def test_paged_ref_matches_oracles(PS, NP):
    for i, window in enumerate([None, 3, PS + 3]):
        c = make_paged_case(5, 6, 2, 16, PS, NP, seed=PS + i, window=window, share=2,
                            layout=["contig", "strided", "transpose"][i])
        y = decode_attention_ref(**c)
        assert_close(y, _sdpa_oracle(c), msg=f"PS={PS} window={window}")
        assert not y[3].any()  # length 0
    c = make_paged_case(3, 6, 2, 16, PS, NP, seed=PS, softcap=1.5, window=2 * PS - 1, scale=1.0)
    assert_close(decode_attention_ref(**c), _math_oracle(c), msg=f"PS={PS} softcap")


@pytest.mark.parametrize("B,H,KVH,D,PS,NP", PAGED_GRID, ids=[_paged_id(*g) for g in PAGED_GRID])
def test_paged_torch_path_matches_ref(B, H, KVH, D, PS, NP):
    c = _paged_grid_case(B, H, KVH, D, PS, NP)
    assert_close(decode_attention(**c, impl="torch"), decode_attention_ref(**c), msg=_paged_id(B, H, KVH, D, PS, NP))


@interp
@pytest.mark.parametrize("B,H,KVH,D,PS,NP", PAGED_TRITON_GRID, ids=[_paged_id(*g) for g in PAGED_TRITON_GRID])
def test_paged_triton_fp32_matches_ref(B, H, KVH, D, PS, NP):
    c = _paged_grid_case(B, H, KVH, D, PS, NP)
    ref = decode_attention_ref(**c)
    for chunk in (None, 40):  # whole pages a split (the default); 40 keys a split, cutting pages of 16+
        assert_close(decode_attention(**c, chunk=chunk, impl="triton"), ref,
                     msg=f"{_paged_id(B, H, KVH, D, PS, NP)} chunk={chunk}")


@interp
@pytest.mark.parametrize("PS,NP,chunk,per_tile", [(16, 7, 16, True), (64, 4, 64, True), (64, 4, None, False),
                                                  (16, 7, 40, False), (24, 5, None, False), (1, 40, 8, False)])
def test_paged_triton_page_lookups(PS, NP, chunk, per_tile):
    """Both ways the kernel finds a key's page: one table entry per tile (BLOCK_N divides PS
    and the chunk) and one per key (tiles straddling pages, chunks cutting them)."""
    import cotrt.ops.decode_attention as mod

    G, D = 3, 16
    ch = mod._chunk(NP, PS, chunk)
    assert mod._blocks(G, D, PS, ch, -(-NP * PS // ch), True)[4] == per_tile
    if chunk is None:
        assert ch % PS == 0  # page-granular splits
    c = make_paged_case(5, 6, 2, D, PS, NP, seed=PS, window=PS + 3, share=2, layout="strided")
    assert_close(decode_attention(**c, chunk=chunk, impl="triton"), decode_attention_ref(**c),
                 msg=f"PS={PS} chunk={chunk}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("PS,NP", PAGES)
def test_paged_fp16_matches_ref(PS, NP, impl):
    c = make_paged_case(4, 14, 2, 64, PS, NP, dtype=torch.float16, seed=PS, softcap=20.0 if PS % 2 == 0 else None,
                        window=PS + 3, share=2)
    y = decode_attention(**c, chunk=None if PS < 64 else 64, impl=impl)
    assert y.dtype == torch.float16
    assert_close(y, decode_attention_ref(**c), dtype=torch.float16, msg=f"fp16 PS={PS} {impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_slot_form_is_one_page_per_row(impl):
    """A slot cache [S, T] viewed as pages [S · T / PS, PS], row b's table listing its
    slot's pages in order, gives the slot form's result."""
    c = make_case(4, 6, 2, 16, 96, seed=3, window=40, extra_slots=1)
    S, T, KVH, D = c["k_cache"].shape
    PS = 16
    table = c["block_tables"].long()[:, None] * (T // PS) + torch.arange(T // PS)
    paged = dict(c, k_cache=c["k_cache"].view(S * T // PS, PS, KVH, D),
                 v_cache=c["v_cache"].view(S * T // PS, PS, KVH, D), block_tables=table.int())
    y = decode_attention(**c, chunk=32, impl=impl)
    assert_close(decode_attention(**paged, impl=impl), y)
    assert_close(decode_attention_ref(**paged), decode_attention_ref(**c))
    assert_close(y, decode_attention_ref(**c))


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_rows_sharing_pages(impl):
    """Prefix sharing: rows 0 and 1 share their first 3 pages, row 2's table is row 0's.
    Rows 1 and 2 have one query and one length within the shared prefix: the same keys,
    bit-identical outputs. Row 0 reads on past the prefix, row 3 has pages of its own."""
    c = make_paged_case(4, 6, 2, 16, 16, 6, seed=2, share=3, lengths=[96, 40, 40, 70], window=30)
    c["block_tables"][2] = c["block_tables"][0]
    c["q"][2] = c["q"][1]
    y = decode_attention(**c, chunk=32, impl=impl)
    assert_close(y, decode_attention_ref(**c))
    assert torch.equal(y[1], y[2])


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_unused_entries_and_dead_positions(impl):
    """Table entries past ceil(L / PS) and of pages wholly before the window are never used:
    garbage there (-1, P, 2**31 - 1, -2**31) changes nothing; positions past the length in
    the last page hold NaN and before the window in the first page inf."""
    PS, NP, W = 16, 8, 20
    c = make_paged_case(5, 8, 2, 16, PS, NP, seed=4, window=W, lengths=[128, 37, 16, 0, 21])
    want = decode_attention_ref(**c)
    P = c["k_cache"].shape[0]
    table = c["block_tables"].clone()
    garbage = [-1, P, 2**31 - 1, -2**31]
    for b, L in enumerate(c["lengths"].tolist()):
        lo = max(0, L - W)
        for j in range(NP):
            if j * PS >= L or (j + 1) * PS <= lo:
                table[b, j] = garbage[(b + j) % 4]
        if L:
            for cache in (c["k_cache"], c["v_cache"]):
                cache[table[b, (L - 1) // PS], L - (L - 1) // PS * PS:] = float("nan")
                cache[table[b, lo // PS], :lo - lo // PS * PS] = float("inf")
    c["block_tables"] = table
    y = decode_attention(**c, chunk=32, impl=impl)
    assert_close(y, want, msg="unused entries and dead positions poisoned")
    assert_close(decode_attention_ref(**c), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_out_of_range_values_stay_in_bounds(impl):
    """A page id outside [0, P) where a live key needs it gives a zero row, whichever page
    of the row (first, last, one split of several) and whatever id; the other rows are
    untouched. Lengths past NP · PS act as NP · PS. The reference raises instead."""
    c = make_paged_case(5, 6, 2, 16, 16, 8, seed=6, lengths=[128, 128, 100, 50, 128], window=70)
    want = decode_attention_ref(**c)
    P = c["k_cache"].shape[0]
    good = c["block_tables"].clone()
    c["block_tables"][1, 7] = P  # the last page
    c["block_tables"][2, 1] = -1  # the first page in the window (lo = 30)
    c["block_tables"][3, 3] = 2**31 - 1  # the last page of a 50-key row
    c["lengths"][4] = 10**6
    y = decode_attention(**c, chunk=32, impl=impl)
    assert_close(y[[0, 4]], want[[0, 4]])
    assert not y[1:4].any()
    with pytest.raises(ValueError, match=f"row 1 needs block_tables entry 7 = {P}, outside \\[0, P={P}\\)"):
        decode_attention_ref(**dict(c, lengths=c["lengths"].clamp(max=128)))
    with pytest.raises(ValueError, match="row 4 has length 1000000, outside \\[0, NP·PS=128\\]"):
        decode_attention_ref(**dict(c, block_tables=good))


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_empty_tables(impl):
    c = make_paged_case(3, 4, 2, 16, 16, 2, seed=0)
    z = dict(c, block_tables=c["block_tables"][:, :0])
    assert torch.equal(decode_attention(**z, impl=impl), torch.zeros(3, 4, 16))


# ------------------------------------------------------------------------------ validation


def _set(**kw):
    return lambda c: {**c, **kw}


BAD = [
    (_set(q=torch.zeros(3, 6)), "q must be a 3-D"),
    (_set(q=torch.zeros(3, 6, 16, dtype=torch.float64)), "q dtype"),
    (_set(q=torch.zeros(3, 16, 6).transpose(1, 2)), "q must have unit stride"),
    (_set(q=torch.zeros(3, 5, 16)), "H=5 heads must be a multiple of k_cache's KVH=2"),
    (_set(k_cache=torch.zeros(4, 37, 2, 15)), "k_cache must be a 4-D tensor \\[P, PS, KVH, D=16\\]"),
    (_set(k_cache=torch.zeros(37, 2, 16)), "k_cache must be a 4-D"),
    (_set(k_cache=torch.zeros(6, 37, 2, 16, dtype=torch.float16)), "k_cache dtype"),
    (_set(k_cache=torch.zeros(6, 37, 16, 2).transpose(2, 3)), "k_cache must have unit stride"),
    (_set(v_cache=torch.zeros(6, 36, 2, 16)), "v_cache must have k_cache's shape"),
    (_set(v_cache=torch.zeros(6, 37, 2, 16, dtype=torch.float16)), "v_cache dtype"),
    (_set(v_cache=torch.zeros(6, 37, 2, 16, device="meta")), "v_cache is on meta"),
    (_set(block_tables=torch.zeros(4, dtype=torch.long)), "block_tables must be a \\[B=3, NP\\] tensor"),
    (_set(block_tables=torch.zeros(4, 2, dtype=torch.long)), "block_tables must be a \\[B=3, NP\\] tensor"),
    (_set(block_tables=torch.zeros(3, 2, 1, dtype=torch.long)), "block_tables must be a \\[B=3, NP\\] tensor"),
    (_set(block_tables=[0, 1, 2]), "block_tables must be a \\[B=3, NP\\] tensor .* got list"),
    (_set(block_tables=torch.zeros(3)), "block_tables must be int32 or int64"),
    (_set(block_tables=torch.zeros(3, 2, dtype=torch.int16)), "block_tables must be int32 or int64"),
    (_set(block_tables=torch.zeros(3, dtype=torch.long, device="meta")), "block_tables is on meta"),
    (_set(block_tables=torch.zeros(3, 2, dtype=torch.long, device="meta")), "block_tables is on meta"),
    (_set(lengths=torch.zeros(3, 1, dtype=torch.long)), "lengths must be a \\[B=3\\]"),
    (_set(lengths=torch.zeros(3, dtype=torch.bool)), "lengths must be int32 or int64"),
    (_set(scale=float("nan")), "scale must be a finite number"),
    (_set(scale=torch.tensor(0.5)), "scale must be a finite number"),
    (_set(softcap=0.0), "softcap must be a finite number > 0"),
    (_set(softcap=-5.0), "softcap must be a finite number > 0"),
    (_set(softcap=float("inf")), "softcap must be a finite number > 0"),
    (_set(window=0), "window must be an int >= 1"),
    (_set(window=4.0), "window must be an int >= 1"),
    (_set(window=True), "window must be an int >= 1"),
    (_set(chunk=0), "chunk must be an int >= 1"),
    (_set(out=torch.zeros(3, 6, 15)), "out must be \\[B=3, H=6, D=16\\]"),
    (_set(out=torch.zeros(3, 6, 16, dtype=torch.float16)), "out must be .* of dtype torch.float32"),
    (_set(out=torch.zeros(3, 16, 6).transpose(1, 2)), "out must have unit stride"),
    (_set(impl="cuda"), "impl must be"),
]


@pytest.mark.parametrize("mutate,match", BAD, ids=[m for _, m in BAD])
def test_validation_names_the_argument(mutate, match):
    c = make_case(3, 6, 2, 16, 37, seed=0)
    with pytest.raises(ValueError, match=match):
        decode_attention(**mutate(c))


# ------------------------------------------------------------------------------ CUDA codegen, no GPU

# Compiles both kernels to cubin for sm_80/90 with Triton's bundled ptxas (each flag on and
# off, both page lookups, int32 and int64 tables and lengths, D up to 256): catches codegen
# errors on a CPU-only machine. A subprocess, because this process runs Triton in
# interpreter mode.
# (dtype, HAS_SOFTCAP, HAS_WINDOW, PAGE_PER_TILE, table dtype, BLOCK_G, BLOCK_D, BLOCK_N, sm)
_SPLIT_VARIANTS = [("bf16", 1, 1, 0, "i32", 16, 64, 64, 90), ("fp32", 0, 0, 1, "i64", 16, 128, 64, 80),
                   ("bf16", 0, 0, 1, "i32", 32, 256, 32, 80), ("fp16", 1, 1, 1, "i64", 16, 64, 64, 90),
                   ("fp32", 1, 0, 0, "i32", 16, 256, 32, 80), ("fp16", 0, 1, 0, "i64", 16, 128, 64, 80)]


def test_split_kernel_compiles_for_cuda_targets(tmp_path):
    variants = [dict(dtype=dt, arch=arch, options=dict(num_warps=4, num_stages=2), floats=["scale", "softcap"],
                     ptr_types={"block_tables_ptr": "*" + idx, "lengths_ptr": "*i32" if idx == "i64" else "*i64",
                                "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32"},
                     constexprs=dict(HAS_SOFTCAP=bool(cap), HAS_WINDOW=bool(win), PAGE_PER_TILE=bool(ppt),
                                     DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                                     BLOCK_G=bg, BLOCK_D=bd, BLOCK_N=bn))
                for dt, cap, win, ppt, idx, bg, bd, bn, arch in _SPLIT_VARIANTS]
    compile_variants(tmp_path, "decode_attention", "_decode_attention_split_kernel", variants)


def test_reduce_kernel_compiles_for_cuda_targets(tmp_path):
    variants = [dict(dtype=dt, arch=arch, options=dict(num_warps=4), constexprs=dict(BLOCK_S=bs, BLOCK_D=bd),
                     ptr_types={"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32"})
                for dt, bs, bd, arch in [("bf16", 16, 64, 90), ("fp32", 64, 128, 80), ("fp16", 16, 256, 80)]]
    compile_variants(tmp_path, "decode_attention", "_decode_attention_reduce_kernel", variants)


# ------------------------------------------------------------------------------ GPU


def _plain_low_precision(c):
    """The same attention in plain PyTorch in the inputs' dtype (the flash rule's baseline):
    gathered pages, scores and softmax output rounded to the dtype, as HF's eager path."""
    q, k_cache, v_cache, table = c["q"], c["k_cache"], c["v_cache"], c["block_tables"]
    H, D = q.shape[1:]
    KVH = k_cache.shape[2]
    pages = (table[:, None] if table.dim() == 1 else table).long().clamp(min=0)  # unallocated: masked below
    k = k_cache[pages].flatten(1, 2).permute(0, 2, 1, 3).repeat_interleave(H // KVH, dim=1)  # (B, H, N, D)
    v = v_cache[pages].flatten(1, 2).permute(0, 2, 1, 3).repeat_interleave(H // KVH, dim=1)
    N = k.shape[2]
    s = (q[:, :, None] @ k.transpose(-1, -2))[:, :, 0] * (D ** -0.5 if c["scale"] is None else c["scale"])
    if c["softcap"] is not None:
        s = torch.tanh(s / c["softcap"]) * c["softcap"]
    t = torch.arange(N, device=q.device)
    L = c["lengths"].long()[:, None]
    valid = (t < L) & (t >= L - (c["window"] or N + 1))
    p = torch.softmax(s.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num().to(q.dtype)  # L = 0: 0
    return (p[:, :, None] @ v)[:, :, 0]


# (B, H, KVH, D, T, softcap, window): SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B heads, D = 128
# (Qwen3, Llama-8B), D = 80 (masked), Gemma2's softcap and window.
GPU_CASES = [(1, 9, 3, 64, 2048, None, None), (8, 14, 2, 64, 2048, None, None), (32, 32, 8, 64, 1024, None, None),
             (16, 32, 8, 128, 4096, None, None), (5, 14, 2, 80, 300, None, 40), (8, 8, 4, 256, 1024, 50.0, 256)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,KVH,D,T,softcap,window", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_low_precision_flash_rule(B, H, KVH, D, T, softcap, window, dtype):
    c = make_case(B, H, KVH, D, T, dtype=dtype, device="cuda", seed=B, softcap=softcap, window=window,
                  layout="strided" if B % 2 else "contig")
    out = decode_attention(**c)
    ref = decode_attention_ref(**c)
    assert_flash_rule(out, ref, _plain_low_precision(c), msg=f"{dtype} {_grid_id(B, H, KVH, D, T)}")
    assert_close(out, ref, dtype=dtype, msg=f"{dtype} {_grid_id(B, H, KVH, D, T)}")


@pytest.mark.parametrize("B,H,KVH,D,T,softcap,window", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32(B, H, KVH, D, T, softcap, window):
    c = make_case(B, H, KVH, D, T, device="cuda", seed=B, softcap=softcap, window=window)
    assert_close(decode_attention(**c), decode_attention_ref(**c), msg=f"fp32 {_grid_id(B, H, KVH, D, T)}")
    assert_close(decode_attention(**c, impl="torch"), decode_attention_ref(**c), msg="torch path on CUDA")


# (B, H, KVH, D, PS, NP, softcap, window): vLLM's page of 16 and flash-attn's 256 at Qwen2.5 /
# Llama heads, a non-power-of-two page, one key a page, Gemma2's softcap and window.
GPU_PAGED_CASES = [(8, 14, 2, 64, 16, 128, None, None), (16, 32, 8, 128, 256, 16, None, None),
                   (5, 14, 2, 80, 24, 50, None, 40), (3, 8, 4, 64, 1, 700, None, None),
                   (8, 8, 4, 256, 64, 20, 50.0, 256)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H,KVH,D,PS,NP,softcap,window", GPU_PAGED_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_paged(B, H, KVH, D, PS, NP, softcap, window, dtype):
    c = make_paged_case(B, H, KVH, D, PS, NP, dtype=dtype, device="cuda", seed=B, softcap=softcap, window=window,
                        share=2 if B > 3 else 0, layout="strided" if B % 2 else "contig")
    out, ref = decode_attention(**c), decode_attention_ref(**c)
    msg = f"{dtype} {_paged_id(B, H, KVH, D, PS, NP)}"
    if dtype != torch.float32:
        assert_flash_rule(out, ref, _plain_low_precision(c), msg=msg)
    assert_close(out, ref, dtype=dtype, msg=msg)
    assert_close(decode_attention(**c, impl="torch"), ref, dtype=dtype, msg="torch path on CUDA " + msg)


@pytest.mark.parametrize("form", ["slot", "paged"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_replays_with_new_tables_and_lengths(impl, form):
    """Capture once, refill slots or block tables / lengths / q in place, replay: matches
    an eager call on the new values (bit for bit) and the reference. Nothing in the call
    may sync or depend on the values for its shapes, or the capture fails."""
    if form == "slot":
        c = make_case(8, 14, 2, 64, 512, dtype=torch.float16, device="cuda", seed=3, window=300, extra_slots=8)
        P, NP, PS = 16, 1, 512
    else:
        c = make_paged_case(8, 14, 2, 64, 16, 32, dtype=torch.float16, device="cuda", seed=3, window=300)
        P, NP, PS = c["k_cache"].shape[0], 32, 16
    out = torch.empty(8, 14, 64, dtype=torch.float16, device="cuda")
    kw = dict(scale=c["scale"], softcap=c["softcap"], window=c["window"], out=out, impl=impl)

    def step():
        return decode_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["lengths"], **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        c["block_tables"].copy_(torch.randperm(P, generator=g)[:8 * NP].view(c["block_tables"].shape))
        c["lengths"].copy_(torch.randint(0, NP * PS + 1, (8,), generator=g))
        c["q"].copy_(torch.randn(8, 14, 64, generator=g))
        graph.replay()
        got = out.clone()
        want = decode_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["lengths"],
                                **{**kw, "out": None})
        if impl == "triton":  # the same kernels on the same values (cuBLAS may pick another algorithm)
            assert torch.equal(got, want)
        assert_close(got, want, msg=f"graph replay vs eager, {impl} {form}")
        assert_close(got, decode_attention_ref(**c), dtype=torch.float16, msg=f"graph replay, {impl} {form}")
