"""End-to-end decoding throughput: cotrt against HF ``generate``, in one run.

    python bench/bench_e2e.py [--model default] [--dtype float32] [--repeats 3]

Two workloads on the same model and the same prompts (greedy, EOS ignored so both sides
generate exactly the tokens asked for):

- batch 1: each prompt alone, 64 new tokens;
- mixed: 16 requests with prompt lengths 20..300 tokens and 16..128 new tokens. HF runs
  them as a user would, in batches of 8, left-padded, each batch generating as many tokens
  as its longest request (tokens past a request's own limit are not counted). cotrt gets
  all 16 at once with max_batch=8 and continuous batching.

Reported: useful tokens/s of each and the ratio cotrt / HF (median of ``--repeats`` runs).
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from cotrt.models import load_model  # noqa: E402

WORDS = ("the model thinks about numbers and steps then checks each result again before it "
         "writes a short answer with care").split()


def make_prompts(tok, n, lo, hi, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randrange(lo, hi)
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        out.append(tok.encode(text)[:length])
    return out


def hf_run(model, prompts, new_tokens, batch, pad_id):
    """HF generate in padded batches of ``batch``; returns (useful tokens, seconds)."""
    t0 = time.perf_counter()
    useful = 0
    for i in range(0, len(prompts), batch):
        ps, ns = prompts[i:i + batch], new_tokens[i:i + batch]
        T = max(map(len, ps))
        ids = torch.full((len(ps), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(ps), T, dtype=torch.long)
        for j, p in enumerate(ps):
            ids[j, T - len(p):] = torch.tensor(p)
            mask[j, T - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(ns), min_new_tokens=max(ns),
                                 do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] - T == max(ns)
        useful += sum(ns)
    return useful, time.perf_counter() - t0


def cotrt_run(rt, prompts, new_tokens):
    t0 = time.perf_counter()
    outs = rt.generate(prompts, [cotrt.Params(max_new_tokens=n, ignore_eos=True) for n in new_tokens])
    dt = time.perf_counter() - t0
    got = sum(len(o.token_ids) for o in outs)
    assert got == sum(new_tokens), (got, sum(new_tokens))
    return got, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype, quiet=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rt = cotrt.wrap(model, tok, max_batch=8, max_len=512)

    b1_prompts = make_prompts(tok, 3, 30, 60, seed=1)
    b1_new = [64] * len(b1_prompts)
    mixed_prompts = make_prompts(tok, 16, 20, 300, seed=2)
    rng = random.Random(3)
    mixed_new = [rng.randrange(16, 129) for _ in mixed_prompts]

    # Warm-up (first calls allocate and pick kernels); excluded from the figures.
    hf_run(model, b1_prompts[:1], [8], 1, pad)
    cotrt_run(rt, b1_prompts[:1], [8])

    rows = []
    for name, prompts, new, hf_batch in [("batch 1", b1_prompts, b1_new, 1),
                                         ("mixed 16 (HF batches of 8)", mixed_prompts, mixed_new, 8)]:
        hf_tps, co_tps = [], []
        for _ in range(args.repeats):
            n, dt = hf_run(model, prompts, new, hf_batch, pad)
            hf_tps.append(n / dt)
            n, dt = cotrt_run(rt, prompts, new)
            co_tps.append(n / dt)
        hf_m, co_m = statistics.median(hf_tps), statistics.median(co_tps)
        rows.append((name, hf_m, co_m, co_m / hf_m))

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    print(f"\nSmolLM2-135M-Instruct {args.dtype}, {cpu}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, median of {args.repeats}")
    print(f"| workload | HF generate tok/s | cotrt tok/s | cotrt / HF |")
    print(f"|---|---:|---:|---:|")
    for name, hf_m, co_m, r in rows:
        print(f"| {name} | {hf_m:.1f} | {co_m:.1f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
