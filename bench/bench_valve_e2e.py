"""End-to-end decoding with a valve active at mixed alphas, against no valve, in one run.

    python bench/bench_valve_e2e.py [--repeats 3] [--rank 16]

SmolLM2 (CPU), a random PEFT LoRA on every linear layer (rank 16) loaded as a valve;
8 requests x 64 tokens, max_batch 8, greedy, EOS ignored. Three runs of the same work:
no valve loaded; valve loaded but every request at alpha 0 (base rows: exact F.linear);
requests at alphas {0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2} in one batch. The three run in
turn, round after round (medians of ``--repeats`` rounds).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from _harness import header  # noqa: E402
from cotrt.models import load_model  # noqa: E402

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def make_valve(model, path, rank):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                                         target_modules="all-linear"))
    pm.save_pretrained(path)
    del pm


def run(rt, prompts, params):
    t0 = time.perf_counter()
    outs = rt.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt, outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    model, tok = load_model("default", quiet=True)
    prompts = [tok.encode(f"Question {i}: what is {i} times {i + 3}? Let us think.") for i in range(8)]
    new = 64
    plain_rt = cotrt.wrap(model, tok, max_batch=8, max_len=512)
    p0 = [cotrt.Params(max_new_tokens=new, ignore_eos=True)] * 8

    vmodel = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as d:
        make_valve(vmodel, d, args.rank)
        rt = cotrt.wrap(vmodel, tok, max_batch=8, max_len=512)
        rt.load_valve(d, name="v")
    base_rows = [cotrt.Params(max_new_tokens=new, ignore_eos=True, valve={"v": 0.0})] * 8
    mixed = [cotrt.Params(max_new_tokens=new, ignore_eos=True, valve={"v": a}) for a in ALPHAS]
    run(plain_rt, prompts, p0)  # warm-up
    run(rt, prompts, mixed)
    # The three runs in turn each round, so the machine's drifting speed falls on all alike.
    plain, zero, mix = [], [], []
    for _ in range(args.repeats):
        plain.append(run(plain_rt, prompts, p0)[0])
        zero.append(run(rt, prompts, base_rows)[0])
        mix.append(run(rt, prompts, mixed)[0])
    m = statistics.median
    print(header(model, f"LoRA r={args.rank} on all linears but the LM head; 8 requests x {new} tokens, "
                        f"median of {args.repeats}"))
    print("| run | tok/s | vs no valve |")
    print("|---|---:|---:|")
    print(f"| no valve loaded | {m(plain):.1f} | 1.00x |")
    print(f"| valve loaded, all rows alpha 0 | {m(zero):.1f} | {m(zero) / m(plain):.2f}x |")
    print(f"| valve at 8 mixed alphas in one batch | {m(mix):.1f} | {m(mix) / m(plain):.2f}x |")


if __name__ == "__main__":
    main()
