"""rope and the rotary patch (cotrt.layers.rope).

CPU tier: the torch path is HF's ``apply_rotary_pos_emb`` bit for bit; the reference is
close to it; the Triton kernel (interpreter) equals HF's function bit for bit in fp32 and
fp16 (it rounds each product as the eager ops do), for both layouts, GQA, strided
(transposed) q/k as HF passes them; validation. The patch: found in every tiny
architecture's modeling module, active only inside cotrt's forward, decoding with the
kernel in the interpreter equals the plain runtime's tokens; a non-rotate-half function
is not patched; calls it cannot take go to the original. GPU tier: bf16/fp16 bit-exact
against HF's function on CUDA.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _cubin import compile_variants, interp  # noqa: E402
from cotrt.testing import assert_close  # noqa: E402
from cotrt.testing import ARCHS, tiny_model  # noqa: E402
from cotrt.ops._triton import HAS_TRITON  # noqa: E402
from cotrt.ops.rope import rope, rope_ref  # noqa: E402
from cotrt.layers.rope import RopePatch, _fused  # noqa: E402


def hf_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def _case(B, H, KVH, T, D, dtype=torch.float32, device="cpu", seed=0, layout=1):
    """q/k as HF's attention passes them: projections [B, T, heads, D] transposed to
    [B, heads, T, D] (layout 1), or left as [B, T, heads, D] (layout 2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, T, KVH, D, generator=g).to(device=device, dtype=dtype)
    if layout == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = torch.randint(0, 4000, (B, T), generator=g).double()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).double() / D))
    ang = pos[..., None] * inv
    cos = torch.cat([ang.cos()] * 2, -1).to(device=device, dtype=dtype)
    sin = torch.cat([ang.sin()] * 2, -1).to(device=device, dtype=dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_hf(dtype):
    q, k, cos, sin = _case(2, 6, 2, 5, 64, dtype)
    for a, b in zip(rope(q, k, cos, sin), hf_rope()(q, k, cos, sin)):
        assert torch.equal(a, b)
    for a, b in zip(rope_ref(q, k, cos, sin), hf_rope()(q, k, cos, sin)):
        assert_close(b, a.to(dtype), dtype=dtype)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,KVH,T,D,layout", [(1, 9, 3, 1, 64, 1), (3, 4, 4, 7, 16, 1), (2, 14, 2, 3, 64, 2),
                                                (5, 8, 1, 1, 128, 1), (1, 2, 2, 4, 80, 2)])
def test_kernel_equals_hf_bit_for_bit(B, H, KVH, T, D, layout, dtype):
    q, k, cos, sin = _case(B, H, KVH, T, D, dtype, seed=B * T + D, layout=layout)
    got = rope(q, k, cos, sin, unsqueeze_dim=layout, impl="triton")
    want = hf_rope()(q, k, cos, sin, unsqueeze_dim=layout)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)


def test_validation():
    q, k, cos, sin = _case(2, 4, 2, 3, 16)
    with pytest.raises(ValueError, match="unsqueeze_dim must be"):
        rope(q, k, cos, sin, unsqueeze_dim=0)
    with pytest.raises(ValueError, match="cos must be"):
        rope(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="k .* does not match q"):
        rope(q, k[:1], cos, sin)
    with pytest.raises(ValueError, match="sin dtype"):
        rope(q, k, cos, sin.double())
    with pytest.raises(ValueError, match="head dim must be even"):
        rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="no bfloat16"):
        rope(*(t.bfloat16() for t in (q, k, cos, sin)), impl="triton")


# ------------------------------------------------------------------------------ the patch


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_finds_every_architecture_and_restores(arch):
    model = tiny_model(arch, 300)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    patch = RopePatch(model, head_dim)
    name = type(model.model.layers[0].self_attn).__module__
    if not HAS_TRITON:  # no kernel to run: nothing is patched
        assert patch.modules == []
        return
    assert patch.modules == [name]
    original = sys.modules[name].apply_rotary_pos_emb
    with patch:
        assert sys.modules[name].apply_rotary_pos_emb.original is original
    assert sys.modules[name].apply_rotary_pos_emb is original


def test_patch_refuses_other_forms_and_routes_odd_calls():
    from cotrt.layers.rope import _is_rotate_half

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style pairs: not rotate-half
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * c + rot(q) * s, k * c + rot(k) * s

    assert _is_rotate_half(hf_rope(), 16) and not _is_rotate_half(interleaved, 16)
    calls = []

    def original(*args, **kwargs):
        calls.append(kwargs)
        return "original"

    fused = _fused(original, impl="triton")
    q, k, cos, sin = _case(1, 2, 2, 3, 16)
    assert fused(q, k, cos[..., :8], sin[..., :8]) == "original"  # partial rotary dims
    assert fused(q, k, cos, sin, position_ids=None) == "original"  # an argument it does not know
    assert fused(q, k, cos.double(), sin.double()) == "original"  # mixed dtypes
    assert len(calls) == 3
    assert _fused(original)(q, k, cos, sin) == "original"  # CPU tensors, impl auto: HF's own


@interp
@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_decoding_with_the_kernel_equals_plain(arch, smol_tokenizer):
    import cotrt

    vocab = len(smol_tokenizer)
    prompts = [[5, 17, 300, 9, 41], list(range(100, 130)), [7, 7, 7]]
    params = cotrt.Params(max_new_tokens=10, ignore_eos=True)
    plain = cotrt.wrap(tiny_model(arch, vocab, seed=3), smol_tokenizer, max_batch=2, max_len=64, fuse=False,
                       cpu_kernels=False)
    assert plain.runner.fused == {}
    ref = [o.token_ids for o in plain.generate(prompts, params)]
    rt = cotrt.wrap(tiny_model(arch, vocab, seed=3), smol_tokenizer, max_batch=2, max_len=64, fuse=True,
                    decode_graph="static", cpu_kernels=False)
    assert set(rt.runner.fused) == {"norms", "rope"} and rt.runner.fused["norms"]
    model = rt.model
    head_dim = model.config.head_dim
    rt.runner._rope_patch = RopePatch(model, head_dim, impl="triton")  # the kernel, interpreted
    calls = []
    real = rope.__globals__["load_kernel"]
    import cotrt.ops.rope as rope_mod

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    rope_mod.load_kernel = counting
    try:
        assert [o.token_ids for o in rt.generate(prompts, params)] == ref
    finally:
        rope_mod.load_kernel = real
    assert calls and set(calls) == {"rope"}  # the kernel ran in every forward
    with pytest.raises(ValueError, match="fuse must be"):
        cotrt.wrap(tiny_model("llama", vocab), smol_tokenizer, max_len=64, fuse="yes")


# ------------------------------------------------------------------------------ CUDA codegen, no GPU

def test_kernel_compiles_for_cuda_targets(tmp_path):
    variants = [dict(dtype=dt, constexprs=dict(HALF=half, BLOCK=max(16, 1 << (half - 1).bit_length())), arch=arch,
                     options=dict(num_warps=1, enable_fp_fusion=False))
                for dt, half, arch in [("bf16", 32, 90), ("fp16", 64, 80), ("fp32", 40, 90), ("bf16", 128, 80)]]
    compile_variants(tmp_path, "rope", "_rope_kernel", variants)


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,H,KVH,T,D", [(1, 9, 3, 1, 64), (32, 32, 8, 1, 64), (4, 14, 2, 77, 64), (2, 16, 4, 5, 128)])
def test_gpu_equals_hf(B, H, KVH, T, D, dtype):
    q, k, cos, sin = _case(B, H, KVH, T, D, dtype, device="cuda", seed=D)
    for a, b in zip(rope(q, k, cos, sin), hf_rope()(q, k, cos, sin)):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
