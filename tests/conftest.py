"""Shared fixtures: the real SmolLM2 tokenizer, the byte tokenizer and the embedded model; the
tiny random models and tolerances live in cotrt.testing (benchmarks use them too)."""
from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter vs compiler when first imported (peft and transformers may
    # import it): choose the interpreter before anything does, so kernel tests run on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smol_tokenizer():
    from cotrt.models import load_tokenizer

    return load_tokenizer("default", quiet=True)


@pytest.fixture(scope="session")
def byte_tokenizer():
    """The byte-level tokenizer of cotrt.testing (256 bytes + EOS + 3 latent tokens, built
    in memory): for GPU tests, which run where the embedded model is not installed."""
    from cotrt.testing import byte_tokenizer as build

    return build()


LATENT_TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]


@pytest.fixture(scope="module")
def latent_tok(smol_tokenizer):
    """SmolLM2's tokenizer with Coconut's three latent tokens added (begin, end, latent)."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(LATENT_TOKENS, special_tokens=True)
    return tok


@pytest.fixture(scope="session")
def think_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer with <think>/</think> added as single tokens (R1/Qwen3 style)."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(["<think>", "</think>"], special_tokens=False)
    return tok


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
