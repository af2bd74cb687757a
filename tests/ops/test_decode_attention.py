"""decode_attention: the launcher's torch path and Triton kernels against decode_attention_ref.

CPU tier: the reference against an independent oracle (SDPA over each row's keys gathered
by hand, with an explicit HF-style window mask; soft-capping by explicit per-head math);
the torch path over B in {1, 3, 5} x (H, KVH) in {(4, 4), (6, 2), (8, 2), (14, 2)} x D in
{16, 64, 80} x T in {37, 300}, and the Triton kernels (interpreter, fp32 and fp16) over a
cut of that grid with small chunks (several splits, empty ones included); lengths 1 and T,
repeated and strided slots, strided q / cache / out, softcap, window below and above the
length, scale. Row independence and dead positions holding NaN; out-of-range values;
validation. GPU tier (marker ``gpu``): fp16/bf16 under flash-attention's rule, fp32, and a
CUDA-graph capture replayed with new slots / lengths.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton's interpreter is chosen when triton is first imported; on a CPU-only machine
    # nothing can use compiled Triton anyway.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _cubin import compile_kernel, interp  # noqa: E402
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
    tensors. "transpose": q is an [H, B, D] tensor transposed (head stride B·D)."""
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
    return dict(q=q, k_cache=k, v_cache=v, slots=slots, lengths=lengths, scale=scale, softcap=softcap,
                window=window)


# ------------------------------------------------------------------------------ reference


def _sdpa_oracle(c):
    """Per row: its slot's T keys with an explicit HF mask (key k visible from position
    p = L - 1 iff k <= p and k > p - window), SDPA with enable_gqa. No softcap."""
    q, k_cache, v_cache = c["q"].float(), c["k_cache"].float(), c["v_cache"].float()
    B, H, D = q.shape
    T = k_cache.shape[1]
    out = torch.zeros(B, H, D)
    for b in range(B):
        s, L = int(c["slots"][b]), int(c["lengths"][b])
        p = L - 1
        kk = torch.arange(T)
        mask = kk <= p
        if c["window"] is not None:
            mask &= kk > p - c["window"]
        if not mask.any():
            continue
        k = k_cache[s].transpose(0, 1)[None]  # (1, KVH, T, D)
        v = v_cache[s].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q[b][None, :, None], k, v, attn_mask=mask[None, None, None],
                                           scale=c["scale"], enable_gqa=True)  # (1, H, 1, D)
        out[b] = o[0, :, 0]
    return out


def _math_oracle(c):
    """Per row and head, explicit fp64 math, softcap included (kv head h // G by index)."""
    q, k_cache, v_cache = c["q"].double(), c["k_cache"].double(), c["v_cache"].double()
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    scale = D ** -0.5 if c["scale"] is None else c["scale"]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        s, L = int(c["slots"][b]), int(c["lengths"][b])
        keys = [t for t in range(L) if c["window"] is None or t >= L - c["window"]]
        for h in range(H):
            kv = h // (H // KVH)
            scores = torch.stack([q[b, h] @ k_cache[s, t, kv] * scale for t in keys])
            if c["softcap"] is not None:
                scores = c["softcap"] * torch.tanh(scores / c["softcap"])
            w = torch.exp(scores - scores.max())
            out[b, h] = sum(w[i] * v_cache[s, t, kv] for i, t in enumerate(keys)) / w.sum()
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
    s0 = int(c["slots"][0])
    others = torch.ones(c["k_cache"].shape[0], dtype=torch.bool)
    others[s0] = False
    c2 = dict(c, k_cache=c["k_cache"].clone(), v_cache=c["v_cache"].clone(), lengths=c["lengths"].clone(),
              slots=c["slots"].clone())
    c2["k_cache"][others] = torch.randn_like(c2["k_cache"][others]) * 3
    c2["v_cache"][others] = float("nan")
    c2["lengths"][1:] = torch.tensor([7, 300, 0, 150], dtype=c2["lengths"].dtype)
    c2["slots"][1:] = c2["slots"][1:].flip(0)
    c2["slots"][4] = int(others.nonzero()[0])  # no longer sharing row 0's slot
    y2 = decode_attention(**c2, **kw)
    assert torch.equal(y[0], y2[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_dead_positions_may_hold_nan(impl):
    """Keys/values past a row's length and before its window are never used."""
    c = make_case(3, 8, 2, 16, 300, seed=5, window=20, lengths=[300, 150, 60], extra_slots=0)
    c["slots"] = torch.tensor([2, 0, 1], dtype=c["slots"].dtype)  # no slot shared
    want = decode_attention_ref(**c)
    for b, (s, L) in enumerate(zip(c["slots"].tolist(), c["lengths"].tolist())):
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
    c["slots"] = torch.tensor([2, 4, 2, 4, 2], dtype=c["slots"].dtype)
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
    c["slots"] = c["slots"].clone()
    c["slots"][1], c["slots"][3] = 4, -1  # S = 4
    y = decode_attention(**c, chunk=16, impl=impl)
    assert_close(y[0], want[0])
    assert not y[1:].any()
    with pytest.raises(ValueError, match="row 0 has slot"):
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
    e = dict(c, q=c["q"][:0], slots=c["slots"][:0], lengths=c["lengths"][:0])
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


# ------------------------------------------------------------------------------ validation


def _set(**kw):
    return lambda c: {**c, **kw}


BAD = [
    (_set(q=torch.zeros(3, 6)), "q must be a 3-D"),
    (_set(q=torch.zeros(3, 6, 16, dtype=torch.float64)), "q dtype"),
    (_set(q=torch.zeros(3, 16, 6).transpose(1, 2)), "q must have unit stride"),
    (_set(q=torch.zeros(3, 5, 16)), "H=5 heads must be a multiple of k_cache's KVH=2"),
    (_set(k_cache=torch.zeros(4, 37, 2, 15)), "k_cache must be a 4-D tensor \\[S, T, KVH, D=16\\]"),
    (_set(k_cache=torch.zeros(37, 2, 16)), "k_cache must be a 4-D"),
    (_set(k_cache=torch.zeros(6, 37, 2, 16, dtype=torch.float16)), "k_cache dtype"),
    (_set(k_cache=torch.zeros(6, 37, 16, 2).transpose(2, 3)), "k_cache must have unit stride"),
    (_set(v_cache=torch.zeros(6, 36, 2, 16)), "v_cache must have k_cache's shape"),
    (_set(v_cache=torch.zeros(6, 37, 2, 16, dtype=torch.float16)), "v_cache dtype"),
    (_set(v_cache=torch.zeros(6, 37, 2, 16, device="meta")), "v_cache is on meta"),
    (_set(slots=torch.zeros(4, dtype=torch.long)), "slots must be a \\[B=3\\]"),
    (_set(slots=torch.zeros(3)), "slots must be int32 or int64"),
    (_set(slots=torch.zeros(3, dtype=torch.long, device="meta")), "slots is on meta"),
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
# off, D up to 256): catches codegen errors on a CPU-only machine. A subprocess, because
# this process runs Triton in interpreter mode.
_COMPILE = """
try:
    from cotrt.kernels.decode_attention import _decode_attention_reduce_kernel as k2
except ModuleNotFoundError:
    from kernels.decode_attention import _decode_attention_reduce_kernel as k2
k2 = JITFunction(k2.fn)
# (dtype, HAS_SOFTCAP, HAS_WINDOW, BLOCK_G, BLOCK_D, BLOCK_N, sm)
for dt, cap, win, bg, bd, bn, arch in [("bf16", 1, 1, 16, 64, 64, 90), ("fp32", 0, 0, 16, 128, 64, 80),
                                       ("bf16", 0, 0, 32, 256, 32, 80), ("fp32", 1, 1, 16, 64, 64, 90),
                                       ("fp32", 1, 0, 16, 256, 32, 80)]:
    cfg = dict(HAS_SOFTCAP=bool(cap), HAS_WINDOW=bool(win), DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
               BLOCK_G=bg, BLOCK_D=bd, BLOCK_N=bn)
    ptr = {"slots_ptr": "*i64", "lengths_ptr": "*i32", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32"}
    sig = {n: (ptr.get(n, "*" + dt) if n.endswith("_ptr") else "fp32" if n in ("scale", "softcap") else "i32")
           for n in k.arg_names}
    sig.update({c: "constexpr" for c in cfg})
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(c),): v for c, v in cfg.items()})
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, num_stages=2))
    assert out.asm.get("cubin"), ("split", dt, arch)
    cfg = dict(BLOCK_S=16, BLOCK_D=bd)
    sig = {n: (("*" + dt if n == "out_ptr" else "*fp32") if n.endswith("_ptr") else "i32") for n in k2.arg_names}
    sig.update({c: "constexpr" for c in cfg})
    src = ASTSource(fn=k2, signature=sig, constexprs={(k2.arg_names.index(c),): v for c, v in cfg.items()})
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    assert out.asm.get("cubin"), ("reduce", dt, arch)
"""


def test_kernels_compile_for_cuda_targets(tmp_path):
    compile_kernel(tmp_path, "decode_attention", "_decode_attention_split_kernel", _COMPILE)


# ------------------------------------------------------------------------------ GPU


def _plain_low_precision(c):
    """The same attention in plain PyTorch in the inputs' dtype (the flash rule's baseline):
    gathered caches, scores and softmax output rounded to the dtype, as HF's eager path."""
    q, k_cache, v_cache = c["q"], c["k_cache"], c["v_cache"]
    H, D = q.shape[1:]
    T, KVH = k_cache.shape[1:3]
    k = k_cache[c["slots"].long()].permute(0, 2, 1, 3).repeat_interleave(H // KVH, dim=1)  # (B, H, T, D)
    v = v_cache[c["slots"].long()].permute(0, 2, 1, 3).repeat_interleave(H // KVH, dim=1)
    s = (q[:, :, None] @ k.transpose(-1, -2))[:, :, 0] * (D ** -0.5 if c["scale"] is None else c["scale"])
    if c["softcap"] is not None:
        s = torch.tanh(s / c["softcap"]) * c["softcap"]
    t = torch.arange(T, device=q.device)
    L = c["lengths"].long()[:, None]
    valid = (t < L) & (t >= L - (c["window"] or T + 1))
    p = torch.softmax(s.masked_fill(~valid[:, None], float("-inf")), dim=-1).to(q.dtype)
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


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_replays_with_new_slots_and_lengths(impl):
    """Capture once, refill slots / lengths / q in place, replay: matches an eager call on
    the new values (bit for bit) and the reference. Nothing in the call may sync or depend
    on the values for its shapes, or the capture fails."""
    c = make_case(8, 14, 2, 64, 512, dtype=torch.float16, device="cuda", seed=3, window=300, extra_slots=8)
    out = torch.empty(8, 14, 64, dtype=torch.float16, device="cuda")
    kw = dict(scale=c["scale"], softcap=c["softcap"], window=c["window"], out=out, impl=impl)

    def step():
        return decode_attention(c["q"], c["k_cache"], c["v_cache"], c["slots"], c["lengths"], **kw)

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
        c["slots"].copy_(torch.randperm(16, generator=g)[:8])
        c["lengths"].copy_(torch.randint(0, 513, (8,), generator=g))
        c["q"].copy_(torch.randn(8, 14, 64, generator=g))
        graph.replay()
        got = out.clone()
        want = decode_attention(c["q"], c["k_cache"], c["v_cache"], c["slots"], c["lengths"],
                                **{**kw, "out": None})
        if impl == "triton":  # the same kernels on the same values (cuBLAS may pick another algorithm)
            assert torch.equal(got, want)
        assert_close(got, want, msg=f"graph replay vs eager, {impl}")
        assert_close(got, decode_attention_ref(**c), dtype=torch.float16, msg=f"graph replay, {impl}")
