"""Latent (contemplation) decoding on SmolLM2 (CPU), in one run.

    python bench/bench_latent.py [--repeats 3]

1. A latent step against a token step: one request, 48 steps of each kind, batch 1. A
   latent step skips the LM head (49152 x 576 of SmolLM2's 135M weights) and sampling.
2. Coconut end to end: k=6 latent steps + 32 answer tokens, against Coconut's own
   generate (the whole sequence recomputed at every token, no KV cache), which is what a
   Coconut user runs today: batch 1 against batch 1, and a batch of 8 against Coconut's
   generate on the same 8 requests as one batch of 8 (equal work on both sides; before
   this, cotrt's batch of 8 was compared with Coconut at batch 1).

The latent tokens are added to SmolLM2's vocabulary with fresh embeddings: the weights do
not matter for timing.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from _harness import header, plain_hf  # noqa: E402
from cotrt.models import load_model  # noqa: E402

TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]
K, ANSWER = 6, 32


@torch.inference_mode()
def coconut_naive(model, prompt, begin, end, k, n, batch=1):
    """Coconut's generate for ``batch`` copies of one prompt (same length: no padding).
    Returns the first row's answer tokens."""
    emb = model.get_input_embeddings()
    x = emb(torch.tensor([prompt + [begin]] * batch))
    for _ in range(k):
        h = model.model(inputs_embeds=x).last_hidden_state[:, -1:]
        x = torch.cat([x, h], 1)
    x = torch.cat([x, emb(torch.tensor([[end]] * batch))], 1)
    out = []
    for _ in range(n):
        t = model(inputs_embeds=x).logits[:, -1].argmax(-1)  # [batch]
        out.append(int(t[0]))
        x = torch.cat([x, emb(t.view(batch, 1))], 1)
    return out


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model("default", quiet=True)
    tok = copy.deepcopy(tok)
    tok.add_tokens(TOKENS, special_tokens=True)
    model.resize_token_embeddings(len(tok))
    begin, end, _ = tok.convert_tokens_to_ids(TOKENS)
    rt = cotrt.wrap(model, tok, max_batch=8, max_len=512)
    prompt = tok.encode("Question: a farmer has 12 cows and buys 7 more, then sells 5. How many cows?")
    steps = 48
    # Both run steps + 2 forwards: prefill, `steps` token / latent steps, one more token step
    # (max_new_tokens counts a latent request's answer tokens only: <end-latent>, then 1).
    tok_p = cotrt.Params(max_new_tokens=steps + 2, ignore_eos=True)
    lat_p = cotrt.Params(max_new_tokens=1, ignore_eos=True, latent=cotrt.Latent(steps=steps))
    rt.generate([prompt], tok_p)  # warm-up
    rt.generate([prompt], lat_p)
    t_tok, t_lat = [], []
    for _ in range(args.repeats):
        t_tok.append(timed(lambda: rt.generate([prompt], tok_p))[0])
        t_lat.append(timed(lambda: rt.generate([prompt], lat_p))[0])
    m = statistics.median

    co_p = cotrt.Params(max_new_tokens=ANSWER, ignore_eos=True, latent=cotrt.Latent(steps=K))
    naive_t, naive8_t, co1_t, co8_t, same = [], [], [], [], []
    with plain_hf(model):  # warm-up of Coconut's side, both shapes
        coconut_naive(model, prompt, begin, end, K, 4)
        coconut_naive(model, prompt, begin, end, K, 4, batch=8)
    rt.generate([prompt] * 8, co_p)
    for _ in range(args.repeats):
        with plain_hf(model):
            dt, ref = timed(lambda: coconut_naive(model, prompt, begin, end, K, ANSWER))
            naive_t.append(dt)
            dt, ref8 = timed(lambda: coconut_naive(model, prompt, begin, end, K, ANSWER, batch=8))
            naive8_t.append(dt)
        dt, outs = timed(lambda: rt.generate([prompt], co_p))
        co1_t.append(dt)
        same.append(outs[0].token_ids[K + 1:] == ref)  # Coconut's own algorithm, same answer?
        dt, outs8 = timed(lambda: rt.generate([prompt] * 8, co_p))
        co8_t.append(dt)
    n_tok = K + 1 + ANSWER
    print(header(model, f"median of {args.repeats} (after a warm-up of each)"))
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| token step, batch 1 (ms) | {m(t_tok) / (steps + 2) * 1e3:.1f} |")
    print(f"| latent step, batch 1 (ms) | {m(t_lat) / (steps + 2) * 1e3:.1f} |")
    print(f"| latent / token step | {m(t_lat) / m(t_tok):.2f}x |")
    print(f"| Coconut naive generate, k={K} + {ANSWER} tokens, batch 1 (tok/s) | {n_tok / m(naive_t):.1f} |")
    print(f"| cotrt, same request, batch 1 (tok/s) | {n_tok / m(co1_t):.1f} ({m(naive_t) / m(co1_t):.1f}x) |")
    print(f"| cotrt's answer tokens equal Coconut generate's (batch 1) | {all(same)} |")
    print(f"| Coconut naive generate, 8 such requests as one batch (tok/s) | {8 * n_tok / m(naive8_t):.1f} |")
    print(f"| cotrt, the same 8 requests batched (tok/s) | {8 * n_tok / m(co8_t):.1f} "
          f"({m(naive8_t) / m(co8_t):.1f}x) |")


if __name__ == "__main__":
    main()
