"""What an in-place probe costs, against the plain run and against a deep-copy probe.

    python bench/bench_probes.py [--repeats 3]

One request on SmolLM2 (CPU, batch 1), 64 new tokens, at two context lengths. A policy
probes every 8 thinking tokens (a 12-token inducer + 8 greedy tokens) and always
continues, so the visible output is the plain run's. Reported per context length:

- cotrt plain vs cotrt probing: the extra time, the probe tokens decoded, and the extra
  time per probe token next to the time per visible token (the goal: close, and flat in the
  context length, since nothing is copied);
- HF with a deep-copied DynamicCache per probe (what DEER's HF driver does), same probes,
  same count: its extra time grows with the context it copies. HF's loop computes logits
  for the last position only (``logits_to_keep=1``, as ``generate`` does) and is warmed up
  like cotrt before timing.
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

NEW = 64
EVERY = 8
PROBE_NEW = 8
INDUCER = "\n\n**Final Answer**\nThe final answer is \\boxed{"


class ProbeAlways(cotrt.Policy):
    name = "bench-probe"
    on_boundary = False

    def __init__(self):
        self.every = EVERY

    def on_step(self, view):
        return cotrt.Probe(INDUCER, max_tokens=PROBE_NEW)


def cotrt_time(rt, prompt, policy):
    t0 = time.perf_counter()
    out = rt.generate([prompt], cotrt.Params(max_new_tokens=NEW, ignore_eos=True, exit=policy))[0]
    return time.perf_counter() - t0, out


@torch.inference_mode()
def hf_loop(model, prompt, inducer_ids, probes: bool):
    """Greedy decoding with HF's DynamicCache; with ``probes``, every EVERY tokens the cache
    is deep-copied and the probe decoded on the copy (then thrown away)."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    cache = DynamicCache()
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[0, -1].argmax()
    gen = [int(tok)]
    probe_tokens = 0
    for i in range(1, NEW):
        out = model(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        gen.append(int(tok))
        if probes and i % EVERY == 0:
            c = copy.deepcopy(cache)
            p_out = model(input_ids=torch.tensor([inducer_ids]), past_key_values=c, use_cache=True,
                          logits_to_keep=1)
            p_tok = p_out.logits[0, -1].argmax()
            for _ in range(PROBE_NEW - 1):
                p_out = model(input_ids=p_tok.view(1, 1), past_key_values=c, use_cache=True, logits_to_keep=1)
                p_tok = p_out.logits[0, -1].argmax()
            probe_tokens += len(inducer_ids) + PROBE_NEW
            del c
    return time.perf_counter() - t0, gen, probe_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model("default", quiet=True)
    rt = cotrt.wrap(model, tok, max_batch=1, max_len=2048)
    inducer_ids = tok.encode(INDUCER, add_special_tokens=False)
    base = "Let us think about the numbers carefully, one step at a time, and check each one. "
    table = []
    for ctx in (64, 1024):
        prompt = (tok.encode(base * 200)[:ctx])
        cotrt_time(rt, prompt, None)  # warm-up, both sides
        cotrt_time(rt, prompt, ProbeAlways())
        with plain_hf(model):
            hf_loop(model, prompt, inducer_ids, probes=True)
        plain_t, probe_t, hf_t, hfp_t = [], [], [], []
        for _ in range(args.repeats):
            t, plain = cotrt_time(rt, prompt, None)
            plain_t.append(t)
            t, probed = cotrt_time(rt, prompt, ProbeAlways())
            probe_t.append(t)
            assert probed.token_ids == plain.token_ids  # probes are invisible
            with plain_hf(model):
                t, hf_gen, _ = hf_loop(model, prompt, inducer_ids, probes=False)
                hf_t.append(t)
                t, _, hf_probe_tokens = hf_loop(model, prompt, inducer_ids, probes=True)
                hfp_t.append(t)
        m = statistics.median
        n_probe = probed.stats["probe_tokens"]
        extra = m(probe_t) - m(plain_t)
        hf_extra = m(hfp_t) - m(hf_t)
        table.append((ctx, m(plain_t), m(probe_t), n_probe, extra, extra / n_probe * 1e3,
                      m(plain_t) / NEW * 1e3, m(hf_t), m(hfp_t), hf_probe_tokens, hf_extra,
                      hf_extra / hf_probe_tokens * 1e3))
    print(header(model, f"batch 1, {NEW} new tokens, a probe every {EVERY} tokens "
                        f"({len(inducer_ids)} + {PROBE_NEW} tokens), median of {args.repeats}"))
    print("| context | cotrt plain s | cotrt probing s | probe tokens | extra s | extra ms / probe token "
          "| ms / visible token | HF plain s | HF deep-copy probing s | extra s | extra ms / probe token |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} "
              f"| {r[7]:.2f} | {r[8]:.2f} | {r[10]:.2f} | {r[11]:.1f} |")


if __name__ == "__main__":
    main()
