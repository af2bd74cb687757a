"""rms_norm and the RMSNorm swap (cotrt.layers.rms_norm).

CPU tier: the reference against HF's own modules (LlamaRMSNorm, Gemma2RMSNorm); the torch
path bit-identical to them; the Triton kernel (interpreter, fp32 and fp16) against the
reference over odd widths (one chunk and several), strided rows, ``out=``, both forms;
validation. The swap: every tiny architecture's norms are found, checked and swapped, the
logits stay bit-identical on CPU, the Parameters are shared, an unknown norm class is left
alone; greedy decoding with swapped norms and the static step equals the plain model's.
GPU tier (marker ``gpu``): fp16/bf16 against the reference.
"""
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _cubin import compile_variants, interp  # noqa: E402
from cotrt.testing import assert_close  # noqa: E402
from cotrt.testing import ARCHS, tiny_model  # noqa: E402
from cotrt.layers.rms_norm import FusedRMSNorm, fuse_rms_norms, original_norms  # noqa: E402
from cotrt.ops.rms_norm import rms_norm, rms_norm_ref  # noqa: E402


def _case(M, N, dtype=torch.float32, device="cpu", seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, N, generator=g) * 3).to(device=device, dtype=dtype)
    w = (torch.randn(N, generator=g) * 0.5 + 1).to(device=device, dtype=w_dtype or dtype)
    return x, w


def _hf_norm(gemma, N, eps, w):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m = Gemma2RMSNorm(N, eps=eps) if gemma else LlamaRMSNorm(N, eps=eps)
    with torch.no_grad():
        m.weight.copy_(w.float())
    return m.to(w.dtype)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_hf_and_ref_is_close(gemma, dtype):
    x, w = _case(5, 111, dtype)
    m = _hf_norm(gemma, 111, 1e-6, w)
    with torch.no_grad():
        expect = m(x)
    got = rms_norm(x, w, 1e-6, gemma=gemma)
    assert got.dtype == expect.dtype and torch.equal(got, expect)
    assert_close(expect, rms_norm_ref(x, w, 1e-6, gemma=gemma).to(dtype), dtype=dtype)


def test_llama_form_promotes_like_hf():
    x, w = _case(2, 64, torch.bfloat16, w_dtype=torch.float32)  # fp32 weight, bf16 input
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32
    assert rms_norm(x, w, 1e-5, gemma=True).dtype == torch.bfloat16


@interp
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("M,N", [(1, 64), (3, 111), (17, 576), (2, 5000)])  # 5000 > one 4096 chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(M, N, dtype, gemma):
    x, w = _case(M, N, dtype, seed=M + N)
    y = rms_norm(x, w, 1e-5, gemma=gemma, impl="triton")
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, rms_norm_ref(x, w, 1e-5, gemma=gemma).to(dtype), dtype=dtype)
    if dtype == torch.float32:  # and the module it replaces
        assert_close(y, rms_norm(x, w, 1e-5, gemma=gemma, impl="torch"), dtype=dtype)


@interp
def test_kernel_strided_rows_3d_and_out():
    x, w = _case(12, 96)
    xs = x.view(3, 4, 96)[:, ::2]  # [3, 2, 96], rows not evenly spaced
    ref = rms_norm_ref(xs, w, 1e-6)
    assert_close(rms_norm(xs, w, 1e-6, impl="triton"), ref)
    out = torch.full((3, 4, 96), float("nan"))[:, ::2]
    r = rms_norm(xs, w, 1e-6, out=out, impl="triton")
    assert r is out
    assert_close(out, ref)
    assert rms_norm(x[:0], w, 1e-6, impl="triton").shape == (0, 96)


def test_validation():
    x, w = _case(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, w[:4], 1e-6)
    with pytest.raises(ValueError, match="eps must be"):
        rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="x dtype"):
        rms_norm(x.long(), w, 1e-6)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, w, 1e-6, out=torch.empty(2, 9))
    with pytest.raises(ValueError, match="impl must be"):
        rms_norm(x, w, 1e-6, impl="cuda")
    with pytest.raises(ValueError, match="no bfloat16"):
        rms_norm(x.bfloat16(), w.bfloat16(), 1e-6, impl="triton")


# ------------------------------------------------------------------------------ the swap


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_keeps_the_model(arch):
    model = tiny_model(arch, 300, seed=1)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    report = fuse_rms_norms(model)
    (cls, count), = report.items()
    n_layers = model.config.num_hidden_layers
    assert count == n_layers * (4 if arch in ("qwen3", "gemma2") else 2) + 1, report  # Gemma2: 4 norms a layer
    assert all(isinstance(m, FusedRMSNorm) for n, m in model.named_modules() if n.endswith("norm"))
    assert {n: p for n, p in model.named_parameters()} == params  # same names, same Parameter objects
    assert list(model.state_dict()) == keys  # the originals are not submodules
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert fuse_rms_norms(model) == {}  # nothing left to swap
    with original_norms(model):  # HF's own modules back for a while (benchmark baselines)
        assert type(model.model.norm).__name__ == cls
        assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert isinstance(model.model.norm, FusedRMSNorm)


def test_unknown_norm_is_left_alone():
    class OddRMSNorm(nn.Module):  # looks like an RMSNorm, computes something else
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight

    class NoEpsRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

    model = nn.Sequential(OddRMSNorm(), NoEpsRMSNorm())
    report = fuse_rms_norms(model)
    assert report == {"OddRMSNorm": "output differs from both forms", "NoEpsRMSNorm": "no 1-D weight and eps"}
    assert isinstance(model[0], OddRMSNorm) and isinstance(model[1], NoEpsRMSNorm)


# ------------------------------------------------------------------------------ CUDA codegen, no GPU

def test_kernel_compiles_for_cuda_targets(tmp_path):
    variants = [dict(dtype=dt, constexprs=dict(GEMMA=bool(gemma), BLOCK_N=block), arch=arch, floats=["eps"],
                     options=dict(num_warps=4))
                for dt, gemma, block, arch in [("bf16", 0, 1024, 90), ("bf16", 1, 4096, 90), ("fp16", 0, 64, 80),
                                               ("fp32", 1, 1024, 80)]]
    compile_variants(tmp_path, "rms_norm", "_rms_norm_kernel", variants)


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N", [(1, 576), (8, 2048), (33, 896), (4, 8192)])
def test_gpu(M, N, dtype, gemma):
    x, w = _case(M, N, dtype, device="cuda", seed=N)
    y = rms_norm(x, w, 1e-6, gemma=gemma)
    assert_close(y, rms_norm_ref(x, w, 1e-6, gemma=gemma).to(dtype), dtype=dtype)
    assert_close(y, rms_norm(x, w, 1e-6, gemma=gemma, impl="torch"), dtype=dtype)
