"""valve_lora: the launcher's torch path and Triton kernel against valve_lora_ref.

CPU tier: the torch path over the acceptance grid (M in {1, 3, 17, 64}, K/N in {111, 576,
1536}, r in {1, 8, 16, 64}, 1 or 4 adapters); the Triton kernel in the interpreter (fp32,
some fp16) over INTERP_CASES, a chosen subset (the interpreter's dot is a non-BLAS numpy
loop, ~50 MFLOP/s: the full product would take an hour). GPU tier (marker ``gpu``):
fp16/bf16 against the fp32 reference with flash-attention's 2x rule, fp32, exactness.
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
from cotrt.testing import assert_close, assert_flash_rule, tolerance  # noqa: E402
from cotrt.ops.valve_lora import valve_lora, valve_lora_ref  # noqa: E402

ALPHAS = [0.0, 0.5, 1.0, 1.7, -0.8]


def make_case(M, K, N, r, n, *, dtype=torch.float32, device="cpu", seed=0, idx=True,
              bias=False, noncontig=False):
    """Inputs scaled so that y and the delta are O(1). noncontig: x is a strided slice,
    weight is column-major, lora_a is a transposed view, lora_b is N-major ([N, n, r] in
    memory, as ValveLinear stores it)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if noncontig:
        x = rnd(M, 2 * K)[:, ::2]
        w = rnd(K, N, scale=K**-0.5).t()
        a = rnd(n, K, r, scale=K**-0.5).transpose(1, 2)
        b = rnd(N, n, r, scale=r**-0.5).permute(1, 0, 2)
    else:
        x, w, a = rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(n, r, K, scale=K**-0.5)
        b = rnd(n, N, r, scale=r**-0.5)
    perm = torch.randperm(M, generator=g)
    alpha = torch.tensor([ALPHAS[i % len(ALPHAS)] for i in perm.tolist()], dtype=torch.float32, device=device)
    adapter = None
    if idx:  # -1 rows are base-only; int64 on odd seeds to cover both index dtypes
        adapter = torch.randint(-1, n, (M,), generator=g).to(device=device,
                                                             dtype=torch.int64 if seed % 2 else torch.int32)
    bvec = rnd(N) if bias else None
    return dict(x=x, weight=w, lora_a=a, lora_b=b, alpha=alpha, adapter_idx=adapter, bias=bvec)


# ------------------------------------------------------------------------------ reference


def test_ref_matches_row_loop():
    torch.manual_seed(0)
    c = make_case(5, 13, 7, 3, 2, seed=1, bias=True)
    y = valve_lora_ref(**c)
    for m in range(5):
        want = c["x"][m] @ c["weight"].t() + c["bias"]
        a = int(c["adapter_idx"][m])
        if a >= 0 and c["alpha"][m] != 0:
            want = want + c["alpha"][m] * ((c["x"][m] @ c["lora_a"][a].t()) @ c["lora_b"][a].t())
        assert_close(y[m], want, msg=f"row {m}")


# ------------------------------------------------------------------------------ torch path

SHAPES_KN = [(111, 111), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("K,N", SHAPES_KN)
@pytest.mark.parametrize("M", [1, 3, 17, 64])
def test_torch_path_matches_ref(M, K, N, r, n):
    seed = M * 7 + r + n
    c = make_case(M, K, N, r, n, seed=seed, idx=n > 1 or M % 2 == 1, bias=M != 3, noncontig=(M + r) % 3 == 0)
    assert_close(valve_lora(**c, impl="torch"), valve_lora_ref(**c), msg=f"M={M} K={K} N={N} r={r} n={n}")


@pytest.mark.parametrize("n", [1, 3])
def test_torch_path_base_rows_exact(n):
    c = make_case(17, 111, 576, 8, n, seed=3, bias=True)
    y = valve_lora(**c, impl="torch")
    base = F.linear(c["x"], c["weight"], c["bias"])
    off = (c["alpha"] == 0) | (c["adapter_idx"] < 0)
    assert off.any() and (~off).any()
    assert torch.equal(y[off], base[off])
    assert not torch.equal(y[~off], base[~off])


def test_torch_path_out_and_broadcast_alpha():
    c = make_case(17, 111, 576, 16, 2, seed=4, bias=True)
    c["alpha"] = torch.tensor([0.7]).expand(17)  # stride 0, as ValveState.set_uniform gives
    out = torch.empty(576, 17).t()  # strided out
    y = valve_lora(**c, out=out, impl="torch")
    assert y is out
    assert_close(out, valve_lora_ref(**c))


# ------------------------------------------------------------------------------ Triton, interpreter

# (M, K, N, r, n_adapters, flags): decode rows 1/3/17/64, one prefill-ish 80 (two M tiles),
# odd 111s against 576/1536, ranks 1..128, 1-4 adapters.
INTERP_CASES = [
    (1, 111, 111, 1, 1, "noidx"),
    (1, 1536, 1536, 16, 1, "noidx,bias"),
    (3, 576, 111, 8, 2, "noncontig"),
    (3, 1536, 576, 1, 4, "noncontig"),
    (3, 111, 576, 128, 2, "bias"),
    (17, 111, 576, 16, 4, "bias,noncontig"),
    (17, 1536, 576, 64, 3, ""),
    (64, 576, 576, 64, 4, "bias"),
    (64, 1536, 111, 128, 1, "noncontig"),
    (64, 111, 1536, 8, 4, ""),
    (64, 1536, 1536, 16, 2, "bias"),
    (80, 111, 111, 16, 2, "bias,noncontig"),
]


def _case(M, K, N, r, n, flags, **kw):
    return make_case(M, K, N, r, n, seed=M + K + r, idx="noidx" not in flags, bias="bias" in flags,
                     noncontig="noncontig" in flags, **kw)


@interp
@pytest.mark.parametrize("M,K,N,r,n,flags", INTERP_CASES)
def test_triton_fp32_matches_ref(M, K, N, r, n, flags):
    c = _case(M, K, N, r, n, flags)
    assert_close(valve_lora(**c, impl="triton"), valve_lora_ref(**c),
                 msg=f"M={M} K={K} N={N} r={r} n={n} {flags}")


@interp
@pytest.mark.parametrize("tiles", [(16, 64, 4, 1, True), (128, 256, 8, 3, False), (32, 128, 4, 3, False)])
@pytest.mark.parametrize("n", [1, 2])
def test_triton_forced_tiles_match_ref(tiles, n, monkeypatch):
    """The tiles a sweep (bench/gpu_suite.py) forces give the same result, one pass (the
    shrink inside the base loop: one adapter) or two."""
    import cotrt.ops.valve_lora as vl

    monkeypatch.setattr(vl, "_TUNING", tiles)
    c = _case(17, 300, 111, 16, n, "bias")
    assert_close(valve_lora(**c, impl="triton"), valve_lora_ref(**c), msg=str(tiles))


@interp
@pytest.mark.parametrize("M,K,N,r,n,flags", [(3, 576, 111, 8, 2, "bias"), (17, 111, 576, 16, 4, "noncontig"),
                                            (64, 1536, 111, 64, 1, "noidx")])
def test_triton_fp16_flash_rule(M, K, N, r, n, flags):
    c = _case(M, K, N, r, n, flags, dtype=torch.float16)
    ref = valve_lora_ref(**c)
    baseline = valve_lora(**c, impl="torch")  # plain fp16 PyTorch on CPU
    out = valve_lora(**c, impl="triton")
    assert out.dtype == torch.float16
    assert_flash_rule(out, ref, baseline, msg=f"fp16 M={M} K={K} N={N} r={r}")


@interp
def test_triton_base_rows_exact_and_out():
    c = _case(17, 576, 111, 16, 3, "bias")
    out = torch.full((111, 17), float("nan")).t()  # strided out, poisoned
    y = valve_lora(**c, out=out, impl="triton")
    assert y is out
    base = valve_lora(**{**c, "alpha": torch.zeros(17)}, impl="triton")
    off = (c["alpha"] == 0) | (c["adapter_idx"] < 0)
    assert torch.equal(y[off], base[off])  # bit for bit, not merely close
    assert_close(base, F.linear(c["x"], c["weight"], c["bias"]))
    assert_close(y, valve_lora_ref(**c))


@interp
def test_triton_broadcast_alpha_and_adapter():
    c = _case(17, 111, 111, 8, 2, "")
    c["alpha"] = torch.tensor([1.7]).expand(17)
    c["adapter_idx"] = torch.tensor([1], dtype=torch.int32).expand(17)
    assert_close(valve_lora(**c, impl="triton"), valve_lora_ref(**c))


@interp
def test_triton_empty_and_bf16_refused():
    c = _case(1, 111, 111, 1, 1, "")
    c0 = {**c, "x": c["x"][:0], "alpha": c["alpha"][:0], "adapter_idx": c["adapter_idx"][:0]}
    assert valve_lora(**c0, impl="triton").shape == (0, 111)
    cb = {k: (v.bfloat16() if k in ("x", "weight", "lora_a", "lora_b") else v) for k, v in c.items()}
    with pytest.raises(ValueError, match="bfloat16"):
        valve_lora(**cb, impl="triton")


# ------------------------------------------------------------------------------ validation


def _bad(name, value):
    return lambda c: {**c, name: value}


BAD = [
    (lambda c: {**c, "x": c["x"][None]}, "x must be a 2-D"),
    (_bad("weight", torch.zeros(111, 110)), "weight must be"),
    (_bad("lora_a", torch.zeros(2, 4, 110)), "lora_a must be"),
    (_bad("lora_b", torch.zeros(2, 111, 5)), "lora_b must be"),
    (_bad("alpha", torch.zeros(4)), "alpha must be"),
    (_bad("alpha", torch.zeros(3, dtype=torch.float16)), "alpha must be float32"),
    (_bad("adapter_idx", torch.zeros(3)), "adapter_idx must be int32"),
    (_bad("bias", torch.zeros(110)), "bias must be"),
    (_bad("weight", torch.zeros(111, 111, dtype=torch.float16)), "weight dtype"),
    (lambda c: {**c, "out": torch.zeros(3, 110)}, "out must be"),
    (lambda c: {**c, "impl": "cuda"}, "impl must be"),
    (lambda c: {**c, "lora_a": torch.zeros(2, 129, 111), "lora_b": torch.zeros(2, 111, 129), "impl": "triton"},
     "r <= 128"),
]


@pytest.mark.parametrize("mutate,match", BAD)
def test_validation_names_the_argument(mutate, match):
    c = make_case(3, 111, 111, 4, 2, seed=0, bias=True)
    with pytest.raises(ValueError, match=match):
        valve_lora(**mutate(c))


# ------------------------------------------------------------------------------ CUDA codegen, no GPU

# Compiles the kernel to cubin for sm_80/89/90 with Triton's bundled ptxas: catches codegen
# errors (dot shapes, dtypes, shared memory) on a CPU-only machine. A subprocess, because
# this process runs Triton in interpreter mode.
def test_kernel_compiles_for_cuda_targets(tmp_path):
    variants = [dict(dtype=dt, arch=arch, options=dict(num_warps=4, num_stages=stages),
                     ptr_types={"alpha_ptr": "*fp32", "idx_ptr": "*i32"},
                     constexprs=dict(HAS_IDX=True, HAS_BIAS=True, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64 if dt == "fp32" else 128, BLOCK_R=br,
                                     ONE_PASS=bool(one)))
                for dt, bm, bn, br, stages, arch, one in [
                    ("fp16", 16, 32, 16, 3, 90, 0), ("bf16", 64, 64, 128, 2, 90, 0), ("fp32", 32, 64, 64, 2, 80, 1),
                    ("bf16", 16, 64, 16, 3, 89, 0), ("bf16", 16, 32, 16, 3, 90, 1), ("bf16", 16, 128, 16, 4, 90, 1)]]
    compile_variants(tmp_path, "valve_lora", "_valve_lora_kernel", variants)


# ------------------------------------------------------------------------------ GPU

GPU_CASES = [
    (1, 111, 111, 1, 1, "noidx"),
    (3, 576, 1536, 8, 2, "bias,noncontig"),
    (16, 4096, 4096, 16, 1, "noidx"),
    (16, 4096, 4096, 16, 4, "bias"),
    (17, 1536, 576, 64, 3, ""),
    (64, 1536, 111, 128, 2, "noncontig"),
    (200, 576, 576, 16, 4, "bias"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r,n,flags", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_low_precision_flash_rule(M, K, N, r, n, flags, dtype):
    c = _case(M, K, N, r, n, flags, dtype=dtype, device="cuda")
    out = valve_lora(**c)
    ref = valve_lora_ref(**c)
    baseline = valve_lora(**c, impl="torch")
    assert_flash_rule(out, ref, baseline, msg=f"{dtype} M={M} K={K} N={N} r={r} n={n}")
    assert_close(out, ref.to(dtype), dtype=dtype, rtol=tolerance(dtype)[0] * 4, atol=tolerance(dtype)[1] * 4)


@pytest.mark.parametrize("M,K,N,r,n,flags", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_and_base_rows_exact(M, K, N, r, n, flags):
    c = _case(M, K, N, r, n, flags, device="cuda")
    y = valve_lora(**c)
    assert_close(y, valve_lora_ref(**c))
    base = valve_lora(**{**c, "alpha": torch.zeros(M, device="cuda")})
    off = c["alpha"] == 0
    if c["adapter_idx"] is not None:
        off |= c["adapter_idx"] < 0
    assert torch.equal(y[off], base[off])
