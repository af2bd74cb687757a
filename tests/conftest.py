"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models of several architectures."""
from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter vs compiler when first imported (peft and transformers may
    # import it): choose the interpreter before anything does, so kernel tests run on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from cotrt.models import load_tokenizer

    return load_tokenizer("default", quiet=True)


@pytest.fixture(scope="session")
def byte_tokenizer():
    """bench/gpu_suite.py's byte-level tokenizer (256 bytes + EOS + 3 latent tokens, built
    in memory): for GPU tests, which run where the embedded model is not installed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("_gpu_suite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_tokenizer()


@pytest.fixture(scope="session")
def think_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer with <think>/</think> added as single tokens (R1/Qwen3 style)."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(["<think>", "</think>"], special_tokens=False)
    return tok


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


def pytest_collection_modifyitems(config, items):
    """Tests that load the embedded SmolLM2 (through the smol_model fixture) carry the
    ``slow`` marker; they still run by default (``-m "not slow"`` leaves them out)."""
    for item in items:
        if "smol_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smol_model():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer."""
    from cotrt.models import load_model

    return load_model("default", quiet=True)
