"""End-to-end decoding throughput: cotrt against HF ``generate`` doing the same work, one run.

    python bench/bench_e2e.py [--model default] [--dtype float32] [--repeats 3] [--scale 1.0]
                              [--workloads batch1,mixed,reasoning]

Greedy, EOS ignored, so both sides generate exactly the tokens counted:

- batch1: 3 prompts of 30-60 tokens, 64 new tokens each, ONE REQUEST AT A TIME ON BOTH
  SIDES (cotrt gets one ``generate`` call per prompt).
- mixed: 16 requests, prompts 20..300 tokens, 16..128 new tokens. HF runs them as a user
  would, in left-padded batches of 8, each batch generating as many tokens as its longest
  request (tokens past a request's own count are not counted); cotrt gets all 16 at once
  (max_batch 8, continuous batching).
- reasoning: 16 requests, 200-token prompts, a hard think budget of 256..1024 tokens
  (times --scale) then a 32-token answer budget. cotrt enforces the budgets (forcing the
  answer cue); HF, batched as above, generates each request's token count from cotrt's
  warm-up run (what budgets enforced by a LogitsProcessor would cost it).

Providers per workload: HF generate, cotrt (CPU kernels on: wrap's default on CPU) and
cotrt with ``cpu_kernels=False`` (the scheduler alone). Each figure: useful tokens/s,
median [p20, p80] of --repeats interleaved rounds after one warm-up round; the ratio's
spread is over rounds. Runtime at --scale 1 on a quiet 2-core machine: ~70 min, the
reasoning workload ~55 of them (HF and cpu_kernels=False are the slow sides); --scale 0.25
cuts its think budgets 4x.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from _harness import cotrt_generate, header, hf_generate, interleave, quantiles, ratio  # noqa: E402
from cotrt.models import load_model  # noqa: E402

WORDS = ("the model thinks about numbers and steps then checks each result again before it "
         "writes a short answer with care").split()


def make_prompts(tok, n, lo, hi, seed):
    """n prompts of exactly lo..hi-1 tokens (hi = lo + 1: all of length lo)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randrange(lo, hi)
        text = " ".join(rng.choice(WORDS) for _ in range(length + 8))
        ids = tok.encode(text)[:length]
        assert len(ids) == length
        out.append(ids)
    return out


def workloads(tok, names, scale):
    rng = random.Random(3)
    out = {}
    if "batch1" in names:
        p = make_prompts(tok, 3, 30, 60, seed=1)
        out["batch 1, short prompt (one request at a time, both sides)"] = (
            p, [cotrt.Params(max_new_tokens=64, ignore_eos=True)] * 3, 1, 1)
    if "mixed" in names:
        p = make_prompts(tok, 16, 20, 300, seed=2)
        out["mixed: 16 requests (HF padded batches of 8)"] = (
            p, [cotrt.Params(max_new_tokens=rng.randrange(16, 129), ignore_eos=True) for _ in p], 8, None)
    if "reasoning" in names:
        p = make_prompts(tok, 16, 200, 201, seed=4)
        budgets = [max(8, int(rng.randrange(256, 1025) * scale)) for _ in p]
        out[f"reasoning: 16 x (200-token prompt, think budget {min(budgets)}-{max(budgets)}, answer 32)"] = (
            p, [cotrt.Params(max_new_tokens=b + 64, think_budget=b, answer_budget=32, ignore_eos=True)
                for b in budgets], 8, None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the reasoning think budgets")
    ap.add_argument("--workloads", default="batch1,mixed,reasoning")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for both sides (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), quiet=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rt = cotrt.wrap(model, tok, max_batch=8, max_len=1536)
    rt_plain = cotrt.wrap(model, tok, max_batch=8, max_len=1536, cpu_kernels=False)
    assert "cpu_linear" in rt.runner.fused and "cpu_linear" not in rt_plain.runner.fused
    print(header(model, f"median [p20, p80] of {args.repeats} interleaved rounds"), flush=True)
    print("| workload | tokens | HF generate tok/s | cotrt tok/s | cotrt / HF | cotrt, cpu_kernels=False tok/s "
          "| its / HF |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (prompts, params, hf_batch, co_batch) in workloads(tok, args.workloads.split(","), args.scale).items():
        # Warm-up round (also yields each request's token count for HF's side).
        counts = [len(o.token_ids) for o in rt.generate(prompts, params)]
        total = sum(counts)
        runs = {
            "hf": lambda: hf_generate(model, prompts, counts, pad, hf_batch),
            "cotrt": lambda: cotrt_generate(rt, prompts, params, co_batch),
            "plain": lambda: cotrt_generate(rt_plain, prompts, params, co_batch),
        }
        t = interleave(runs, args.repeats, warmup=1)
        tps = {k: [total / s for s in v] for k, v in t.items()}

        def cell(k):
            m, lo, hi = quantiles(tps[k])
            return f"{m:.1f} [{lo:.1f}, {hi:.1f}]"
        print(f"| {name} | {total} | {cell('hf')} | {cell('cotrt')} | {ratio(t['hf'], t['cotrt'])} "
              f"| {cell('plain')} | {ratio(t['hf'], t['plain'])} |", flush=True)


if __name__ == "__main__":
    main()
