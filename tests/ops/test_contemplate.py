"""contemplate: the launcher's torch path and Triton kernel against contemplate_ref.

CPU tier: the reference against an independent per-row oracle (HF's LlamaRMSNorm,
nn.Linear, nn.Embedding); the torch path and the Triton kernel (interpreter, fp32 and
fp16) over B in {1, 3, 17}, H in {64, 111, 576}, Hh != H with a projection, all-latent /
no-latent / mixed batches and every optional stage; exactness of token rows; strided
inputs; validation. GPU tier (marker ``gpu``): fp16/bf16 against the fp32 reference.
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
from cotrt.testing import assert_close  # noqa: E402
from cotrt.ops.contemplate import contemplate, contemplate_ref  # noqa: E402

V = 997  # odd vocabulary


def make_case(B, H, Hh, *, mode="mixed", norm=False, proj=False, bias=False, embed_scale=None,
              latent_scale=None, dtype=torch.float32, device="cpu", seed=0, strided=False):
    """Inputs of order 1. Token rows carry NaN hidden states and latent rows garbage token
    ids (-1, past V): both must be ignored. strided: hidden is the last position of a
    [B, 3, Hh] tensor, tokens and latent_mask are every other element of a longer tensor."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if mode == "latent":
        mask = torch.ones(B, dtype=torch.bool)
    elif mode == "token":
        mask = torch.zeros(B, dtype=torch.bool)
    else:  # alternate, starting with a latent row when B is odd: both kinds for B >= 2
        mask = torch.arange(B) % 2 == (B % 2 == 0)
        if B == 1:
            mask[:] = seed % 2 == 0
    tokens = torch.randint(0, V, (B,), generator=g)
    tokens[mask] = torch.tensor([-1, V + 5, 2**40])[torch.arange(int(mask.sum())) % 3]
    hidden = torch.randn(B, 3 if strided else 1, Hh, generator=g)[:, -1]
    hidden[~mask] = float("nan")
    if strided:
        tokens = torch.stack([tokens, torch.full_like(tokens, -7)], 1).reshape(-1)[::2]
        mask = torch.stack([mask, ~mask], 1).reshape(-1)[::2]
    else:
        hidden = hidden.contiguous()
    c = dict(tokens=tokens.to(device), latent_mask=mask.to(device), hidden=hidden.to(device=device, dtype=dtype),
             embed_weight=rnd(V, H), norm_weight=rnd(Hh, scale=0.5) + 1 if norm else None, norm_eps=1e-5,
             proj_weight=rnd(H, Hh, scale=Hh**-0.5) if proj else None, proj_bias=rnd(H) if bias else None,
             embed_scale=embed_scale, latent_scale=latent_scale)
    return c


# ------------------------------------------------------------------------------ reference


def test_ref_matches_hf_modules_row_by_row():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    c = make_case(5, 111, 64, norm=True, proj=True, bias=True, embed_scale=1.5, latent_scale=0.25, seed=2)
    y = contemplate_ref(**c)
    norm = LlamaRMSNorm(64, eps=c["norm_eps"])
    norm.weight.data.copy_(c["norm_weight"])
    lin = torch.nn.Linear(64, 111)
    lin.weight.data.copy_(c["proj_weight"])
    lin.bias.data.copy_(c["proj_bias"])
    emb = torch.nn.Embedding.from_pretrained(c["embed_weight"])
    with torch.no_grad():
        for b in range(5):
            if c["latent_mask"][b]:
                want = lin(norm(c["hidden"][b])) * 0.25
            else:
                want = emb(c["tokens"][b]) * 1.5
            assert_close(y[b], want, msg=f"row {b}")


# ------------------------------------------------------------------------------ grid

# (H, Hh, proj): no projection needs Hh == H; with one, Hh both smaller and larger than H.
SHAPES = [(64, 64, False), (111, 111, False), (576, 576, False), (111, 576, True), (576, 111, True),
          (64, 200, True)]
MODES = ["latent", "token", "mixed"]


def _grid_case(B, H, Hh, proj, mode, **kw):
    """Every optional stage in turn: the flags cycle with the case's position in the grid."""
    i = B + H + Hh + MODES.index(mode)
    return make_case(B, H, Hh, mode=mode, proj=proj, norm=i % 2 == 0, bias=proj and i % 3 != 0,
                     embed_scale=[None, 2.0, 0.0][i % 3], latent_scale=[None, 0.5][i % 2 == 1 and i % 4 == 1],
                     seed=i, strided=i % 5 == 0, **kw)


def _grid_id(B, H, Hh, proj, mode):
    return f"B{B}-H{H}-Hh{Hh}{'-proj' if proj else ''}-{mode}"


GRID = [(B, H, Hh, proj, mode) for B in (1, 3, 17) for (H, Hh, proj) in SHAPES for mode in MODES]


@pytest.mark.parametrize("B,H,Hh,proj,mode", GRID, ids=[_grid_id(*g) for g in GRID])
def test_torch_path_matches_ref(B, H, Hh, proj, mode):
    c = _grid_case(B, H, Hh, proj, mode)
    assert_close(contemplate(**c, impl="torch"), contemplate_ref(**c), msg=_grid_id(B, H, Hh, proj, mode))


@pytest.mark.parametrize("B,H,Hh,proj,mode", GRID[::4], ids=[_grid_id(*g) for g in GRID[::4]])
def test_sync_free_torch_path_matches_ref(B, H, Hh, proj, mode):
    """The torch path CUDA takes without triton (both branches, then a select), run on CPU."""
    from cotrt.ops.contemplate import _contemplate_torch_where

    c = _grid_case(B, H, Hh, proj, mode)
    args = [c[k] for k in ("tokens", "latent_mask", "hidden", "embed_weight", "norm_weight", "norm_eps",
                           "proj_weight", "proj_bias", "embed_scale", "latent_scale")]
    out = torch.full((B, H), float("nan")) if B % 2 else None
    assert_close(_contemplate_torch_where(*args, out), contemplate_ref(**c), msg=_grid_id(B, H, Hh, proj, mode))


@interp
@pytest.mark.parametrize("B,H,Hh,proj,mode", GRID, ids=[_grid_id(*g) for g in GRID])
def test_triton_fp32_matches_ref(B, H, Hh, proj, mode):
    c = _grid_case(B, H, Hh, proj, mode)
    assert_close(contemplate(**c, impl="triton"), contemplate_ref(**c), msg=_grid_id(B, H, Hh, proj, mode))


@interp
@pytest.mark.parametrize("B,H,Hh,proj", [(3, 111, 111, False), (17, 576, 111, True), (1, 64, 200, True)])
def test_triton_fp16_matches_ref(B, H, Hh, proj):
    c = make_case(B, H, Hh, proj=proj, norm=True, bias=proj, embed_scale=0.5, dtype=torch.float16, seed=B)
    out = contemplate(**c, impl="triton")
    assert out.dtype == torch.float16
    # fp32 inside, one rounding at the end: within the fp16 table of the fp32 reference.
    assert_close(out, contemplate_ref(**c), dtype=torch.float16, msg=f"fp16 B={B} H={H} Hh={Hh}")


# ------------------------------------------------------------------------------ exactness, out, edges


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=interp)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_rows_are_exact_embedding_lookups(impl, dtype):
    c = make_case(17, 111, 64, proj=True, norm=True, dtype=dtype, seed=5)
    y = contemplate(**c, impl=impl)
    tok = ~c["latent_mask"]
    assert torch.equal(y[tok], F.embedding(c["tokens"][tok], c["embed_weight"]))
    assert torch.isfinite(y).all()  # NaN hidden on token rows, bad ids on latent rows: ignored


@interp
def test_latent_rows_without_stages_copy_the_state():
    c = make_case(3, 111, 111, mode="latent", seed=1)
    assert torch.equal(contemplate(**c, impl="triton"), c["hidden"])
    y = contemplate(**c, impl="torch")
    assert torch.equal(y, c["hidden"]) and y.data_ptr() != c["hidden"].data_ptr()  # a copy, not an alias


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=interp)])
@pytest.mark.parametrize("mode", ["mixed", "latent", "token"])
def test_out_strided_and_poisoned(impl, mode):
    c = make_case(17, 111, 64, mode=mode, proj=True, bias=True, norm=True, embed_scale=3.0, seed=7)
    out = torch.full((17, 2 * 111), float("nan"))[:, 5:116]  # row stride 222
    y = contemplate(**c, out=out, impl=impl)
    assert y is out
    assert_close(out, contemplate_ref(**c))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=interp)])
def test_empty_batch(impl):
    c = make_case(1, 64, 64, seed=0)
    c.update(tokens=c["tokens"][:0], latent_mask=c["latent_mask"][:0], hidden=c["hidden"][:0])
    assert contemplate(**c, impl=impl).shape == (0, 64)


@interp
def test_triton_bad_token_id_writes_zeros_and_bf16_refused():
    c = make_case(3, 64, 64, mode="token", seed=3)
    c["tokens"] = torch.tensor([5, -2, V])
    y = contemplate(**c, impl="triton")
    assert torch.equal(y[0], c["embed_weight"][5]) and not y[1:].any()
    with pytest.raises(IndexError):  # the torch path checks, as F.embedding does
        contemplate(**c, impl="torch")
    cb = make_case(3, 64, 64, seed=3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        contemplate(**cb, impl="triton")


def test_auto_uses_torch_on_cpu(monkeypatch):
    import cotrt.ops.contemplate as mod

    monkeypatch.setattr(mod, "_contemplate_triton", lambda *a, **k: pytest.fail("triton on CPU"))
    c = make_case(3, 64, 64, seed=1)
    assert_close(contemplate(**c), contemplate_ref(**c))


# ------------------------------------------------------------------------------ validation


def _set(**kw):
    return lambda c: {**c, **kw}


BAD = [
    (_set(embed_weight=torch.zeros(V, 64, 1)), "embed_weight must be a 2-D"),
    (_set(embed_weight=torch.zeros(V, 64, dtype=torch.float64)), "embed_weight dtype"),
    (_set(tokens=torch.zeros(3, 1, dtype=torch.long)), "tokens must be a 1-D"),
    (_set(tokens=torch.zeros(3)), "tokens must be int32 or int64"),
    (_set(latent_mask=torch.zeros(4, dtype=torch.bool)), "latent_mask must be a \\[B=3\\]"),
    (_set(latent_mask=torch.zeros(3, dtype=torch.uint8)), "latent_mask must be bool"),
    (_set(hidden=torch.zeros(2, 64)), "hidden must be a 2-D tensor \\[B=3"),
    (_set(hidden=torch.zeros(3, 65)), "needs proj_weight"),
    (_set(hidden=torch.zeros(3, 64, dtype=torch.float16)), "hidden dtype"),
    (_set(hidden=torch.zeros(64, 3).t()), "hidden must have unit stride"),
    (_set(norm_weight=torch.ones(63)), "norm_weight must be \\[Hh=64\\]"),
    (_set(norm_weight=torch.ones(64), norm_eps=-1.0), "norm_eps must be"),
    (_set(norm_weight=torch.ones(64), norm_eps=float("nan")), "norm_eps must be"),
    (_set(proj_weight=torch.zeros(64, 63)), "proj_weight must be \\[H=64, Hh=64\\]"),
    (_set(proj_weight=torch.zeros(64, 64).t()), "proj_weight must have unit stride"),
    (_set(proj_weight=torch.zeros(64, 64), proj_bias=torch.zeros(63)), "proj_bias must be \\[H=64\\]"),
    (_set(proj_bias=torch.zeros(64)), "proj_bias is given without proj_weight"),
    (_set(embed_scale=float("inf")), "embed_scale must be a finite number"),
    (_set(embed_scale=torch.tensor(2.0)), "embed_scale must be a finite number"),
    (_set(latent_scale=True), "latent_scale must be a finite number"),
    (_set(out=torch.zeros(3, 63)), "out must be \\[B=3, H=64\\]"),
    (_set(out=torch.zeros(3, 64, dtype=torch.float16)), "out must be .* of dtype torch.float32"),
    (_set(out=torch.zeros(64, 3).t()), "out must have unit stride"),
    (_set(hidden=torch.zeros(3, 64, device="meta")), "hidden is on meta"),
    (_set(impl="cuda"), "impl must be"),
]


@pytest.mark.parametrize("mutate,match", BAD)
def test_validation_names_the_argument(mutate, match):
    c = make_case(3, 64, 64, seed=0)
    with pytest.raises(ValueError, match=match):
        contemplate(**mutate(c))


# ------------------------------------------------------------------------------ CUDA codegen, no GPU

# Compiles the kernel to cubin for sm_80/89/90 with Triton's bundled ptxas (each flag on and
# off): catches codegen errors on a CPU-only machine. A subprocess, because this process
# runs Triton in interpreter mode.
def test_kernel_compiles_for_cuda_targets(tmp_path):
    variants = [dict(dtype=dt, arch=arch, options=dict(num_warps=4), ptr_types={"tok_ptr": "*i64", "mask_ptr": "*u8"},
                     floats=["norm_eps", "embed_scale", "latent_scale"],
                     constexprs=dict(HAS_NORM=bool(norm), HAS_PROJ=bool(proj), HAS_BIAS=bool(bias),
                                     HAS_EMBED_SCALE=bool(es), HAS_LATENT_SCALE=bool(ls), BLOCK_H=bh, BLOCK_K=bk))
                # (dtype, HAS_NORM, HAS_PROJ, HAS_BIAS, HAS_EMBED_SCALE, HAS_LATENT_SCALE, BLOCK_H, BLOCK_K, sm)
                for dt, norm, proj, bias, es, ls, bh, bk, arch in [
                    ("fp16", 1, 1, 1, 1, 0, 64, 128, 90), ("bf16", 0, 0, 0, 0, 1, 1024, 1024, 90),
                    ("fp32", 1, 1, 1, 1, 1, 64, 128, 80), ("bf16", 0, 1, 0, 0, 1, 64, 128, 90),
                    ("fp16", 1, 0, 0, 1, 0, 1024, 1024, 89)]]
    compile_variants(tmp_path, "contemplate", "_contemplate_kernel", variants)


# ------------------------------------------------------------------------------ GPU

GPU_CASES = [(1, 576, 576, False), (8, 576, 576, False), (17, 111, 576, True), (64, 4096, 4096, False),
             (16, 4096, 2048, True), (3, 2048, 4096, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hh,proj", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_low_precision(B, H, Hh, proj, dtype):
    c = make_case(B, H, Hh, proj=proj, norm=True, bias=proj, embed_scale=2.0, dtype=dtype, device="cuda",
                  seed=B, strided=B % 2 == 1)
    y = contemplate(**c)
    assert_close(y, contemplate_ref(**c), dtype=dtype, msg=f"{dtype} B={B} H={H} Hh={Hh}")
    tok = ~c["latent_mask"]
    assert torch.equal(contemplate(**{**c, "embed_scale": None})[tok], F.embedding(c["tokens"][tok], c["embed_weight"]))


@pytest.mark.parametrize("B,H,Hh,proj", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32(B, H, Hh, proj):
    c = make_case(B, H, Hh, proj=proj, norm=True, bias=proj, latent_scale=0.5, device="cuda", seed=B)
    assert_close(contemplate(**c), contemplate_ref(**c), msg=f"fp32 B={B} H={H} Hh={Hh}")
