"""The lean CPU decode step (cotrt.model.lean_decode): which models take it, that its
decode steps equal HF's forward (greedy parity with HF generate, the same tokens as the HF
path of the same runtime, with GQA, a sliding window, q/k norms, bf16, a valve, latent
taps, paging), and that everything else runs HF's forward."""
from __future__ import annotations

import copy

import pytest
import torch

import cotrt
from _parity import assert_greedy_match, hf_greedy
from cotrt.ops.cpu_attention import HAS_CPU_ATTENTION
from cotrt.ops.cpu_linear import HAS_CPU_KERNEL
from cotrt.testing import tiny_model

pytestmark = pytest.mark.skipif(not (HAS_CPU_KERNEL and HAS_CPU_ATTENTION), reason="cotrt._cpu is not built")

LEAN_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _prompts(vocab: int, n: int = 3, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(L),), generator=g).tolist() for L in torch.randint(4, 30, (n,), generator=g)]


def _count_lean(rt, monkeypatch) -> list:
    calls, inner = [], rt.runner.lean.forward
    monkeypatch.setattr(rt.runner.lean, "forward", lambda *a, **k: calls.append(1) or inner(*a, **k))
    return calls


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_lean_decode_matches_hf(arch, smol_tokenizer, monkeypatch):
    """Greedy tokens equal HF generate's (tie-gap rule) and the HF path's of the same
    runtime, over a context longer than Mistral's window of 12, three rows at once."""
    vocab = len(smol_tokenizer)
    model = tiny_model(arch, vocab, seed=11)
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=3, max_len=96, page_size=8)
    assert rt.runner.fused["lean_decode"] == "on"
    calls = _count_lean(rt, monkeypatch)
    prompts = _prompts(vocab)
    params = cotrt.Params(max_new_tokens=24, ignore_eos=True)
    outs = rt.generate(prompts, params)
    assert len(calls) >= 23  # every decode step went through it
    for p, o in zip(prompts, outs):
        assert_greedy_match(model, p, o.token_ids, hf_greedy(model, p, 24, eos=None), label=f"{arch} lean")
    rt.runner.lean = None  # the same runtime through HF's modules
    assert [o.token_ids for o in rt.generate(prompts, params)] == [o.token_ids for o in outs]


def test_lean_decode_in_bf16_and_with_a_valve(smol_tokenizer, tmp_path):
    """bf16 weights pass the wrap-time check; a valve's LoRA rides the projections: the
    same tokens as the HF path at several alphas in one batch."""
    pytest.importorskip("peft")
    from _peft import make_adapter

    vocab = len(smol_tokenizer)
    bf = tiny_model("llama", vocab, seed=12).to(torch.bfloat16)
    assert cotrt.wrap(bf, smol_tokenizer, max_batch=1, max_len=32).runner.fused["lean_decode"] == "on"
    base = tiny_model("qwen2", vocab, seed=13)
    make_adapter(base, tmp_path / "v", seed=2, std=0.4, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    rt = cotrt.wrap(copy.deepcopy(base), smol_tokenizer, max_batch=3, max_len=64)
    rt.load_valve(str(tmp_path / "v"), name="v")
    prompts = _prompts(vocab, seed=1)
    params = [cotrt.Params(max_new_tokens=16, ignore_eos=True, valve={"v": a}) for a in (0.0, 0.5, 1.0)]
    lean = [o.token_ids for o in rt.generate(prompts, params)]
    lean_runner, rt.runner.lean = rt.runner.lean, None
    assert lean_runner is not None
    assert [o.token_ids for o in rt.generate(prompts, params)] == lean


def test_other_models_run_hf_forward(smol_tokenizer):
    """Gemma2 and Phi-3 are not Llama-shaped: their decode steps stay HF's, and the reason
    is reported; cpu_kernels=False turns the lean step off with the kernels."""
    vocab = len(smol_tokenizer)
    for arch in ("gemma2", "phi3"):
        rt = cotrt.wrap(tiny_model(arch, vocab, seed=3), smol_tokenizer, max_batch=1, max_len=32)
        assert rt.runner.lean is None and "model type" in rt.runner.fused["lean_decode"]
    rt = cotrt.wrap(tiny_model("llama", vocab, seed=3), smol_tokenizer, max_batch=1, max_len=32, cpu_kernels=False)
    assert rt.runner.lean is None and "lean_decode" not in rt.runner.fused


def test_a_lean_step_that_differs_from_hf_is_refused(smol_tokenizer, monkeypatch):
    """The wrap-time check compares a decode step with HF's: a lean step computing
    something else (here: its hidden states off by 1%) is turned off, with the error
    reported."""
    from cotrt.model.lean_decode import LeanDecode

    real = LeanDecode.forward
    monkeypatch.setattr(LeanDecode, "forward", lambda self, *a, **k: (real(self, *a, **k)[0] * 1.01, {}))
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=4), smol_tokenizer, max_batch=1, max_len=32)
    assert rt.runner.lean is None and "differs from HF" in rt.runner.fused["lean_decode"]


def test_fp32_layers_run_in_one_native_call_each(smol_tokenizer, monkeypatch):
    """fp32 models run each layer through ``_cpu.decode_layer`` (a valve in use too:
    ``test_lean_decode_in_bf16_and_with_a_valve`` compares its tokens); bf16 weights run
    the module path."""
    from cotrt.ops import cpu_attention

    vocab = len(smol_tokenizer)
    rt = cotrt.wrap(tiny_model("qwen3", vocab, seed=6), smol_tokenizer, max_batch=2, max_len=48)
    assert rt.runner.lean.native
    real, calls = cpu_attention._cpu.decode_layer, []
    monkeypatch.setattr(cpu_attention._cpu, "decode_layer", lambda *a: calls.append(1) or real(*a), raising=False)
    rt.generate([[5, 6, 7]], cotrt.Params(max_new_tokens=5, ignore_eos=True))
    assert len(calls) == 4 * 2  # 4 decode steps x 2 layers
    bf = cotrt.wrap(tiny_model("llama", vocab, seed=6).to(torch.bfloat16), smol_tokenizer, max_batch=1, max_len=32)
    assert bf.runner.lean is not None and not bf.runner.lean.native


def test_kernels_are_off_outside_cotrt_after_a_wrap(smol_tokenizer):
    """Wrapping (whose check runs a forward inside another) leaves the CPU kernels off
    for the model's own calls; a CpuKernels context entered inside itself restores."""
    from cotrt.layers import cpu_linear as cl

    cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=5), smol_tokenizer, max_batch=1, max_len=32)
    assert not cl.active()
    ctx = cl.CpuKernels()
    with ctx:
        with ctx:
            assert cl.active()
        assert cl.active()
    assert not cl.active()


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_native_layer_equals_the_module_path(arch, smol_tokenizer):
    """``_cpu.decode_layer`` against its reference, the same layers through the model's
    modules and PyTorch ops: hidden states and a tapped residual at fp32 tolerance, for
    three rows at different lengths (Mistral's window of 12 cut in)."""
    from cotrt.testing import assert_close

    vocab = len(smol_tokenizer)
    rt = cotrt.wrap(tiny_model(arch, vocab, seed=21), smol_tokenizer, max_batch=3, max_len=64, page_size=4)
    runner, lean = rt.runner, rt.runner.lean
    assert lean.native
    g = torch.Generator().manual_seed(0)
    lens = [5, 17, 30]
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    with torch.inference_mode():
        for t, n in zip(tables, lens):
            runner._hf_forward(runner.make_meta([t], [n], starts=[0]), input_ids=torch.randint(3, vocab, (1, n), generator=g))
        meta = runner.make_meta(tables, [1, 1, 1], starts=lens)
        ids = torch.randint(3, vocab, (3, 1), generator=g)
        x = runner.decoder.embed_tokens(ids)[:, 0]
        cos, sin = runner.decoder.rotary_emb(x[:, None], meta.positions)
        with runner._cpu_kernels:
            ref, ref_taps = lean._modules(meta, x, cos, sin, taps=(0,))
            got, got_taps = lean._native(meta, x, cos[:, 0].contiguous(), sin[:, 0].contiguous(),
                                         lean._native_layers(), taps=(0,))
    assert_close(got, ref)
    assert_close(got_taps[0], ref_taps[0])


def test_native_pointers_follow_model_changes(smol_tokenizer, tmp_path):
    """The native layers' pointers are kept between steps while the model is unchanged
    (LeanDecode._native_layers); each kind of change is seen: a weight's storage swapped
    (``.data =``), a Parameter replaced, a valve loaded after the first steps, a valve
    turned on and off by the requests. After each, the native path gives the tokens of the
    HF path of the same runtime, and the weight changes do change the tokens."""
    pytest.importorskip("peft")
    from _peft import make_adapter

    vocab = len(smol_tokenizer)
    base = tiny_model("llama", vocab, seed=31)
    make_adapter(base, tmp_path / "v", seed=3, std=0.4, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    rt = cotrt.wrap(base, smol_tokenizer, max_batch=2, max_len=64)
    lean, prompts = rt.runner.lean, _prompts(vocab, n=2, seed=4)
    assert lean.native

    def both(params):
        got = [o.token_ids for o in rt.generate(prompts, params)]
        rt.runner.lean = None
        try:
            want = [o.token_ids for o in rt.generate(prompts, params)]
        finally:
            rt.runner.lean = lean
        assert got == want
        return got

    plain = cotrt.Params(max_new_tokens=12, ignore_eos=True)
    before = both(plain)
    cached = lean._native_cache
    assert cached is not None and lean._native_layers() is cached[4]  # unchanged: reused
    q = base.model.layers[0].self_attn.q_proj
    q.weight.data = torch.randn_like(q.weight) * 0.5  # new storage, same Parameter
    swapped = both(plain)
    assert swapped != before and lean._native_cache is not cached
    down = base.model.layers[1].mlp.down_proj
    down.weight = torch.nn.Parameter(torch.randn_like(down.weight) * 0.5)  # a new Parameter
    replaced = both(plain)
    assert replaced != swapped
    rt.load_valve(str(tmp_path / "v"), name="v")
    on = both([cotrt.Params(max_new_tokens=12, ignore_eos=True, valve={"v": a}) for a in (1.0, 2.0)])
    assert on != replaced
    assert both(plain) == replaced  # the valve off again
