"""Every ```python block of README.md runs as written.

The blocks run in order in one namespace (a later block may use the ``rt`` of an earlier
one, as a reader would), in a temporary working directory, on the embedded SmolLM2 where
they load it. The one liberty taken: placeholders that name the reader's own files or
server are replaced, as literal strings, by things made here (PLACEHOLDERS below); a block
is otherwise run exactly as the README prints it. A block with a placeholder not listed
here fails: list it (and make its fixture) rather than skipping the block.
"""
from __future__ import annotations

import copy
import re
import threading
import time
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.slow


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block tagged python."""
    out = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def test_blocks_are_found():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 8 and any("cotrt.wrap" in code for _, code in blocks)
    assert all("```" not in code for _, code in blocks)


# -- what the placeholders stand for ---------------------------------------------------------------

def _smol_lora(tmp: Path) -> str:
    """A PEFT LoRA folder for SmolLM2 (rank 4 on q_proj and v_proj, random A and B)."""
    from peft import LoraConfig, get_peft_model

    from cotrt.models import load_model, quiet_loading

    base, _ = load_model("default", quiet=True)
    with quiet_loading():
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    pm.save_pretrained(str(tmp / "smol_lora"))
    return str(tmp / "smol_lora")


def _gpt2_base(tmp: Path) -> str:
    """A small random GPT-2 (1024 positions, as GPT-2's own config) with SmolLM2's tokenizer."""
    import transformers as tf

    from cotrt.models import load_tokenizer

    tok = load_tokenizer("default", quiet=True)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "gpt2_base")
    tok.save_pretrained(tmp / "gpt2_base")
    return str(tmp / "gpt2_base")


def _coconut_checkpoint(tmp: Path) -> str:
    """The GPT-2 base with Coconut's three tokens added, saved as Coconut's training loop
    saves its wrapper: the model under ``base_causallm.``, the input embedding again as
    ``embedding.weight``."""
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cotrt.loaders import COCONUT_TOKENS

    base = _gpt2_base(tmp) if not (tmp / "gpt2_base").exists() else str(tmp / "gpt2_base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(list(COCONUT_TOKENS))
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    wrapper = nn.Module()
    wrapper.base_causallm = model
    wrapper.embedding = model.get_input_embeddings()
    torch.save(wrapper.state_dict(), tmp / "checkpoint_25")
    return str(tmp / "checkpoint_25")


class _Server:
    """The OpenAI-compatible app on the default model, in a thread, on a free port."""

    def __init__(self):
        import socket

        import uvicorn

        import cotrt
        from cotrt.async_engine import AsyncEngine
        from cotrt.server import create_app

        engine = AsyncEngine(cotrt.wrap(*cotrt.load_model("default", quiet=True), max_batch=2), max_queue=8)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, "SmolLM2-135M-Instruct"),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 60, "server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# literal placeholder -> (how to make its stand-in, how the stand-in is written into the code)
PLACEHOLDERS = {
    '"path/to/peft_lora_folder"': lambda tmp, ctx: repr(ctx.get("lora") or ctx.setdefault("lora", _smol_lora(tmp))),
    "peft_model_or_folder": lambda tmp, ctx: repr(ctx.get("lora") or ctx.setdefault("lora", _smol_lora(tmp))),
    '"/path/to/base"': lambda tmp, ctx: repr(_gpt2_base(tmp)),
    '"checkpoint_25"': lambda tmp, ctx: repr(_coconut_checkpoint(tmp)),
    "http://127.0.0.1:8000/v1": lambda tmp, ctx: (ctx.get("server") or ctx.setdefault("server", _Server())).url
    + "/v1",
}


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("openai")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    ctx: dict = {}
    try:
        for line, code in python_blocks(README.read_text()):
            for placeholder, make in PLACEHOLDERS.items():
                if placeholder in code:
                    code = code.replace(placeholder, make(tmp_path, ctx))
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - name the block that failed
                raise AssertionError(f"README.md block at line {line} failed: {type(e).__name__}: {e}") from e
    finally:
        if "server" in ctx:
            ctx["server"].close()
    # What the blocks printed went to stdout; a glance that they did run.
    assert "|" in capsys.readouterr().out  # the Quickstart's print(o.reasoning, "|", ...)
