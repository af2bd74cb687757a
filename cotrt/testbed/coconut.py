"""A Coconut-style latent model for the testbed (Hao et al. 2024, "Training Large Language
Models to Reason in a Continuous Latent Space", arXiv 2412.06769).

Curriculum from the trained base, on SHORT chains: at stage s the first s lines of the
chain are replaced by s continuous thoughts (c = 1 thought per line), the last hidden state
(final-norm output) fed back as the next input embedding:

    question \\n <think> \\n <|start-latent|> [h] [h] ... <|end-latent|> remaining lines </think> \\nAnswer: N

A problem with fewer lines than s loses all of them and still gets s thoughts, so k is
fixed per stage (cotrt's ``Latent(steps=k)`` is fixed per request). The optimizer is reset
at each stage, as in Coconut. Each stage's weights are saved in Coconut's checkpoint
format (the wrapper's state dict: ``base_causallm.*`` plus ``embedding.weight``), which
``cotrt.latent.load_coconut`` reads onto the base model.

Batches hold problems with the same number of lines, so every row's question has the same
token length and the latent positions line up without left padding (the question's values
are single digits: its length depends only on the line count).
"""
from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .optim import optimizer
from .task import END, THINK, excluded, train_stream

LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")  # Coconut's order


def _lines(p) -> list[str]:
    return p.first_pass().splitlines(keepends=True)


def same_length_batches(stream, batch: int):
    """Batches of ``batch`` problems that share a line count (so a question length)."""
    buckets: dict[int, list] = {}
    for p in stream:
        b = buckets.setdefault(len(_lines(p)), [])
        b.append(p)
        if len(b) == batch:
            yield b
            buckets[len(_lines(p))] = []


def encode_stage(problems, tok, stage: int, ids: dict):
    """(prefix ``[B, P]``, suffix ``[B, S]``, labels ``[B, S]``) for ``stage`` thoughts.

    prefix: question, ``<think>``, ``<|start-latent|>``. suffix: ``<|end-latent|>``, the
    lines not replaced, ``</think>``, the answer, eos (right-padded). labels[t] is the
    token suffix[t] predicts (suffix[t+1]), -100 on padding."""
    prefix = [tok.encode(f"{p.question}\n{THINK}\n", add_special_tokens=False) + [ids["start"]] for p in problems]
    if len({len(x) for x in prefix}) != 1:
        raise ValueError("encode_stage: problems of one batch must share a question length")
    suffix = []
    for p in problems:
        rest = "".join(_lines(p)[stage:]) + f"{END}\nAnswer: {p.answer}\n"
        suffix.append([ids["end"]] + tok.encode(rest, add_special_tokens=False) + [tok.eos_token_id])
    S = max(len(s) for s in suffix)
    suf = torch.full((len(problems), S), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(problems), S), -100, dtype=torch.long)
    for i, s in enumerate(suffix):
        suf[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s) - 1] = torch.tensor(s[1:])
    return torch.tensor(prefix), suf, labels


def _cache_kw(decoder) -> str:
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns).
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class _Tap:
    """Records the output of decoder layer ``layer`` (the residual after it, before any final
    norm: what the runtime feeds back for ``Latent(feedback=layer)``; transformers'
    ``hidden_states[L]`` is the final-normed state instead, so the last layer needs the hook)."""

    def __init__(self, dec, layer: int):
        self.out = None
        self._h = dec.layers[layer].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.out = output[0] if isinstance(output, tuple) else output

    def close(self) -> None:
        self._h.remove()


def thought_rollout(model, prefix, k: int, feedback="final_norm"):
    """The prefix, then ``k`` continuous thoughts, each feeding a state of the last position
    back as the next input: the final norm's output (Coconut's thought), or the residual
    after decoder layer ``feedback`` (an int; CCoT's). Gradients flow through the thoughts;
    ``model`` may be a PEFT model. Returns (the cache, the final-norm states ``[B, k + 1, H]``
    after the prefix and after each thought)."""
    dec = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    kw = _cache_kw(dec)
    tap = None if feedback == "final_norm" else _Tap(dec, feedback)
    try:
        out = dec(input_ids=prefix, use_cache=True)
        past, finals = out[1], [out.last_hidden_state[:, -1]]  # out[1]: the cache
        for _ in range(k):
            x = out.last_hidden_state[:, -1:] if tap is None else tap.out[:, -1:]
            out = dec(inputs_embeds=x, use_cache=True, **{kw: past})
            past = out[1]
            finals.append(out.last_hidden_state[:, -1])
    finally:
        if tap is not None:
            tap.close()
    return past, torch.stack(finals, 1)


def next_token_loss(model, past, h, suffix):
    """Cross-entropy of ``suffix`` ``[B, S]`` read after ``past``. ``h`` ``[B, 1, H]``: the
    final-norm state of the cache's last position, which predicts ``suffix[:, 0]`` (no end
    token after the thoughts); None: ``suffix[:, 0]`` is given (a forced token), the loss
    starts after it."""
    dec = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = dec.model(input_ids=suffix[:, :-1], use_cache=True, **{_cache_kw(dec.model): past})
    states = out.last_hidden_state if h is None else torch.cat([h, out.last_hidden_state], 1)
    target = suffix[:, 1:] if h is None else suffix
    return F.cross_entropy(dec.lm_head(states).flatten(0, 1).float(), target.flatten())


def latent_loss(model, prefix, suffix, labels, k: int):
    """Loss of the suffix after ``k`` continuous thoughts (gradients flow through them)."""
    past, _ = thought_rollout(model, prefix, k)
    out = model.model(input_ids=suffix, use_cache=True, **{_cache_kw(model.model): past})
    logits = model.lm_head(out.last_hidden_state)  # [B, S, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def add_latent_tokens(model, tok) -> dict:
    tok.add_tokens([t for t in LATENT_TOKENS if t not in tok.get_vocab()])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    s, e, l = tok.convert_tokens_to_ids(list(LATENT_TOKENS))
    return {"start": s, "end": e, "latent": l}


def coconut_state_dict(model) -> dict:
    """The state dict of Coconut's wrapper module around ``model``."""
    sd = {"base_causallm." + k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["embedding.weight"] = model.get_input_embeddings().weight.detach().clone()
    return sd


def train_coconut(out: Path, seed: int, stages: int, stage_steps: int, batch: int, lr: float,
                  log_every: int = 25) -> dict:
    """Stages 0..``stages`` from ``out/base``; writes ``out/coconut/stage_{s}.pt``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed + 2)
    tok = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    ids = add_latent_tokens(model, tok)
    (out / "coconut").mkdir(parents=True, exist_ok=True)
    batches = same_length_batches(train_stream(seed + 2, exclude=excluded(0)), batch)
    log = {"stages": stages, "stage_steps": stage_steps, "losses": {}, "seconds": {}}
    model.train()
    for stage in range(stages + 1):
        opt, sched = optimizer(list(model.parameters()), lr, stage_steps)  # reset each stage
        losses, t0 = [], time.perf_counter()
        for step in range(stage_steps):
            prefix, suffix, labels = encode_stage(next(batches), tok, stage, ids)
            loss = latent_loss(model, prefix, suffix, labels, stage)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == stage_steps - 1):
                print(f"[coconut {stage}] step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s",
                      file=sys.stderr, flush=True)
        torch.save(coconut_state_dict(model), out / "coconut" / f"stage_{stage}.pt")
        log["losses"][stage], log["seconds"][stage] = losses, time.perf_counter() - t0
    model.eval()
    return log
