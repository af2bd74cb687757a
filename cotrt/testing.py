"""What cotrt's tests and benchmarks share: tiny random models, a byte-level tokenizer, and
the one tolerance helper.

- ``tiny_config(arch, vocab_size)`` / ``tiny_model(arch, vocab_size)``: 2-layer random
  models of the architectures in ``ARCHS``, with GQA; small enough for CPU tests.
- ``byte_tokenizer()``: 256 byte tokens + EOS + the three latent tokens, built in memory
  (no hub): for GPU runs and benchmarks where the embedded model is not installed.
- ``tolerance(dtype) -> (rtol, atol)``: the table every comparison uses, for outputs of
  order 1 (scale inputs so that they are: e.g. weights ~ N(0, 1/K)).
- ``assert_close(actual, expected, dtype=...)``: allclose with that table; on failure it
  prints the max absolute / relative error and the first mismatching elements.
- ``assert_flash_rule(out, ref, baseline)``: flash-attention's rule for accumulating
  kernels in low precision: the kernel's max error against an fp32 reference is at most
  ``factor`` (2) times that of plain PyTorch run in the same low precision.

transformers and tokenizers are imported only by the functions that need them.
"""
from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")
LATENT_TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]

# ---------------------------------------------------------------------------- tiny models


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A 2-layer random config of ``arch`` with GQA; small enough for CPU tests."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(head_dim=16, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(sliding_window=12, **common)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(head_dim=16, sliding_window=12, attn_logit_softcapping=20.0,
                              final_logit_softcapping=15.0, query_pre_attn_scalar=16, **common)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**common)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, vocab_size: int, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size, **overrides)
    impl = "eager" if arch == "gemma2" else "sdpa"  # HF refuses SDPA for Gemma2 (softcap)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    # Random init is near-uniform; sharpen the logits so greedy decoding is not a string of
    # numerical ties (which would test nothing).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE with no merges: 256 byte tokens (ids 0-255), EOS (256) and the three
    latent tokens (257-259). Builds in milliseconds, needs no hub, and token_bytes /
    the automaton see real bytes for every id it has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    char = {b: chr(b if b in printable else next(extra)) for b in range(256)}  # GPT-2's byte map
    tk = Tokenizer(models.BPE(vocab={char[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>")
    tok.add_special_tokens({"additional_special_tokens": LATENT_TOKENS})
    return tok


# ----------------------------------------------------------------------------- tolerances

# fp32: K-long fp32 dot products in a different order differ by ~sqrt(K)·eps (K=1536: ~3e-6).
# fp16/bf16: one rounding of the output (2**-11, 2**-8) plus accumulation-order noise.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results computed in ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}") from None


def _report(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int) -> str:
    err = (actual - expected).abs()
    rel = err / expected.abs().clamp_min(1e-12)
    lines = [f"max abs err {err.max().item():.3e}, max rel err {rel.max().item():.3e}, "
             f"{int(bad.sum())} of {bad.numel()} elements out of tolerance; first:"]
    for idx in bad.nonzero()[:limit].tolist():
        i = tuple(idx)
        lines.append(f"  {i}: actual {actual[i].item():.7g}, expected {expected[i].item():.7g}")
    return "\n".join(lines)


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, msg: str = "", limit: int = 5):
    """Assert ``|actual - expected| <= atol + rtol·|expected|`` elementwise (computed in fp64).

    ``dtype`` picks (rtol, atol) from the table (default: ``actual.dtype``); explicit
    ``rtol``/``atol`` override it. NaNs must match positions."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    t_rtol, t_atol = tolerance(dtype or actual.dtype)
    rtol = t_rtol if rtol is None else rtol
    atol = t_atol if atol is None else atol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        raise AssertionError(f"{msg} (rtol={rtol}, atol={atol})\n" + _report(a, e, bad, limit))


def assert_flash_rule(out, ref, baseline, *, factor: float = 2.0, floor: float = 1e-6, msg: str = ""):
    """max|out - ref| <= factor · max|baseline - ref| + floor, with ref in fp32 (or better) and
    baseline the same computation in plain low-precision PyTorch."""
    r = ref.detach().double()
    err = (out.detach().double() - r).abs().max().item()
    base_err = (baseline.detach().double() - r).abs().max().item()
    if not err <= factor * base_err + floor:
        raise AssertionError(
            f"{msg}: max error {err:.3e} vs fp32 reference exceeds {factor} x plain-PyTorch error "
            f"{base_err:.3e} (+{floor:g})")
