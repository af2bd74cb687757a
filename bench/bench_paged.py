"""Paged KV cache against the slot layout at equal KV memory, and the cost of a paged step.

    python bench/bench_paged.py [--model default] [--part mix,step] [--requests 32] [--kv-tokens 4096]
                                [--max-len 1024] [--steps 24] [--repeats 3]

The slot layout is the same engine with ``page_size = max_len``: one page per request,
reserved whole at admission, so ``kv_tokens / max_len`` requests fit (what cotrt did before
paging). Paged: pages of 16 tokens, allocated as a request grows and freed when it ends.

- mix: ``--requests`` requests of 40-token prompts with a reasoning-length mix: new-token
  counts drawn from a log-normal (median 96, long tail, clipped to [16, max_len - 64]),
  and a third of them cut short by a think budget at a random half of their length (the
  answer cue forced, then a 16-token answer budget): the engine knows neither length in
  advance. Greedy, EOS ignored, so both sides decode exactly the same tokens. Slot:
  ``max_batch = kv_tokens / max_len``; paged: ``max_batch = --requests`` in the same
  ``kv_tokens``. Reported: mean and peak requests in flight per step, steps, tokens/s,
  preemptions. One timed run each after a warm-up run.
- step: the cost of one decode step, paged over slot, at batch 1 and 8: every row holds a
  120-token prompt and decodes ``--steps`` tokens; the step is timed after 4 warm-up
  steps (median and spread of steps; the two layouts hold their rows at once and step in
  turn, so the machine's drifting speed falls on both alike). At batch 8 the paged rows'
  pages interleave (they grew together), so attention reads them by table (or gathers
  them); at batch 1 they are consecutive and read as one view, like a slot.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from _harness import header, quantiles  # noqa: E402
from cotrt.models import load_model  # noqa: E402

WORDS = ("the model thinks about numbers and steps then checks each result again before it "
         "writes a short answer with care").split()


def prompt_of(tok, n, rng):
    ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(n * 2)), add_special_tokens=False)
    return ids[:n]


def mix(tok, n, max_len, seed=0):
    """(prompts, params) of the reasoning-length mix."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append(prompt_of(tok, 40, rng))
        length = int(min(max(16, rng.lognormvariate(math.log(96), 0.9)), max_len - 64))
        if i % 3 == 0:  # a think budget cuts it at a random half, then a short answer
            budget = max(8, int(length * rng.uniform(0.3, 0.7)))
            params.append(cotrt.Params(max_new_tokens=length, think_budget=budget, answer_budget=16,
                                       ignore_eos=True))
        else:
            params.append(cotrt.Params(max_new_tokens=length, ignore_eos=True))
    return prompts, params


def run_mix(rt, prompts, params) -> dict:
    eng = rt.engine
    steps0, pre0 = eng.stats["steps"], eng.stats["preempted"]
    ids = [eng.add(p, q) for p, q in zip(prompts, params)]
    inflight, tokens = [], 0
    t0 = time.perf_counter()
    done = set()
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                done.add(ev.request_id)
                tokens += len(ev.output.token_ids)
        inflight.append(eng.num_running)
    dt = time.perf_counter() - t0
    assert done == set(ids)
    return {"steps": eng.stats["steps"] - steps0, "mean_inflight": statistics.mean(inflight),
            "peak_inflight": max(inflight), "tok_s": tokens / dt, "time_s": dt, "tokens": tokens,
            "preempted": eng.stats["preempted"] - pre0}


def step_times(rts: dict, tok, batch: int, steps: int, repeats: int) -> dict:
    """Seconds per decode step of each runtime. Both hold their rows at once and step in
    turn (the order alternating each step), so the VM's drifting speed falls on both alike."""
    rng = random.Random(1)
    prompts = [prompt_of(tok, 120, rng) for _ in range(batch)]
    out = {k: [] for k in rts}
    engines = {name: rt.engine for name, rt in rts.items()}
    for _ in range(repeats):
        for eng in engines.values():
            for p in prompts:
                eng.add(p, cotrt.Params(max_new_tokens=steps + 5, ignore_eos=True))
            for _ in range(5):  # prefill, then 4 warm-up steps
                eng.step()
        for i in range(steps):
            for name in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
                t0 = time.perf_counter()
                engines[name].step()
                out[name].append(time.perf_counter() - t0)
        for eng in engines.values():
            while eng.has_unfinished():
                eng.step()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--part", default="mix,step")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model(args.model, quiet=True)
    print(header(model=model))
    parts = args.part.split(",")
    L, kv = args.max_len, args.kv_tokens
    if "mix" in parts:
        prompts, params = mix(tok, args.requests, L)
        slot = cotrt.wrap(model, tok, max_batch=kv // L, max_len=L, kv_tokens=kv, page_size=L)
        paged = cotrt.wrap(model, tok, max_batch=args.requests, max_len=L, kv_tokens=kv, page_size=16)
        print(f"\n## reasoning-length mix: {args.requests} requests, kv_tokens {kv}, max_len {L}, "
              f"new tokens median {statistics.median(p.max_new_tokens for p in params):.0f}, "
              f"max {max(p.max_new_tokens for p in params)}")
        print("| layout | max_batch | mean in flight | peak in flight | steps | tokens | tokens/s | preempted |")
        print("|---|---|---|---|---|---|---|---|")
        res = {}
        for name, rt in (("slot", slot), ("paged 16", paged)):
            run_mix(rt, prompts[:4], params[:4])  # warm-up
            r = res[name] = run_mix(rt, prompts, params)
            print(f"| {name} | {rt.engine.max_batch} | {r['mean_inflight']:.1f} | {r['peak_inflight']} | "
                  f"{r['steps']} | {r['tokens']} | {r['tok_s']:.1f} | {r['preempted']} |")
        print(f"paged / slot: tokens/s {res['paged 16']['tok_s'] / res['slot']['tok_s']:.2f}x, "
              f"mean in flight {res['paged 16']['mean_inflight'] / res['slot']['mean_inflight']:.2f}x")
        del slot, paged
    if "step" in parts:
        print(f"\n## decode step, paged (16) / slot ({L}); 120-token prompts, {args.steps} steps x "
              f"{args.repeats} rounds")
        print("| batch | backend | slot step | paged step | paged / slot |")
        print("|---|---|---|---|---|")
        for batch in (1, 8):
            rts = {"slot": cotrt.wrap(model, tok, max_batch=8, max_len=L, page_size=L),
                   "paged": cotrt.wrap(model, tok, max_batch=8, max_len=L, page_size=16)}
            backend = rts["paged"].runner.decode_backend
            t = step_times(rts, tok, batch, args.steps, args.repeats)
            (ms, ls, hs), (mp, lp, hp) = quantiles(t["slot"]), quantiles(t["paged"])
            print(f"| {batch} | {backend} | {ms * 1e3:.1f} ms [{ls * 1e3:.1f}, {hs * 1e3:.1f}] | "
                  f"{mp * 1e3:.1f} ms [{lp * 1e3:.1f}, {hp * 1e3:.1f}] | {mp / ms:.3f}x |")
            del rts
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
