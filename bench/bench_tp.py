"""The cost of a tensor-parallel decode step on CPU (gloo, 2 ranks) against one process.

    python3 bench/bench_tp.py [--tokens 32] [--repeats 5] [--layers 12]

A correctness path, not a speed claim: two ranks on one CPU machine share its cores and
its memory bandwidth and pay gloo's TCP all-reduces (two per layer, plus the vocab-sharded
embedding and the LM head's gather); on GPUs with NVLink the trade is another one. The
script makes a random Llama (hidden 512, 8 heads, 4 KV heads, so that 2 ranks divide
them; SmolLM2-135M's 3 KV heads do not split over 2), then times the same greedy
generation (batch 1 and batch 8, ``--tokens`` new tokens each, EOS ignored):

- one process, 2 torch threads (all of this machine's cores), cpu_linear kernel on;
- one process, 1 thread (what each rank has);
- ``torchrun --nproc-per-node 2``, ``tp_plan="auto"``, 1 thread a rank: SPMD (every rank
  calls ``generate``), and lockstep (rank 0 drives, rank 1 follows: the server's way,
  one broadcast and one digest all-reduce more per step).

It launches torchrun itself (``--worker`` is that side). Per-step time = wall time of the
generate call / engine steps; median and p20/p80 of ``--repeats`` calls after a warm-up;
ratios are times (above 1: slower), against one process with 1 thread (what each rank
has) and with all threads. Tokens are checked equal across all four runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from _harness import header, quantiles  # noqa: E402

BATCHES = (1, 8)


def make_model(path: Path, layers: int):
    import transformers as tf

    from cotrt.testing import byte_tokenizer

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model


def prompts(n):
    g = torch.Generator().manual_seed(n)
    return [torch.randint(3, 32000, (12 + 3 * i,), generator=g).tolist() for i in range(n)]


def measure(rt, tokens: int, repeats: int, engine=None) -> dict:
    """Per-step seconds of greedy generation at each batch, and the tokens."""
    out = {}
    eng = engine or rt.engine
    for b in BATCHES:
        ps = prompts(b)
        params = cotrt.Params(max_new_tokens=tokens, temperature=0, ignore_eos=True)
        rt.generate(ps, params)  # warm-up
        per_step, toks = [], None
        for _ in range(repeats):
            s0 = eng.stats["steps"]
            t0 = time.perf_counter()
            outs = rt.generate(ps, params)
            dt = time.perf_counter() - t0
            per_step.append(dt / (eng.stats["steps"] - s0))
            toks = [o.token_ids for o in outs]
        out[b] = {"per_step": per_step, "tokens": toks}
    return out


def worker(args) -> None:
    import cotrt.parallel

    group = cotrt.parallel.init(tp=2, timeout=300)
    model, tok = cotrt.load_model(args.worker, quiet=True, tp_plan="auto")
    rt = cotrt.wrap(model, tok, max_batch=8, max_len=256)
    res = {"threads": torch.get_num_threads(), "spmd": measure(rt, args.tokens, args.repeats)}
    if group.rank == 0:
        eng = cotrt.parallel.lockstep(rt, group)
        res["lockstep"] = measure(rt, args.tokens, args.repeats, engine=eng._engine)
        eng.close()
        Path(args.out).write_text(json.dumps(res))
    else:
        cotrt.parallel.follow(rt, group)


def fmt(ts):
    m, lo, hi = quantiles(ts)
    return f"{m * 1e3:.1f} ms [{lo * 1e3:.1f}, {hi * 1e3:.1f}]"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "llama-tp-bench"
        model = make_model(path, args.layers)
        model, tok = cotrt.load_model(str(path), quiet=True)
        rt = cotrt.wrap(model, tok, max_batch=8, max_len=256)
        threads = torch.get_num_threads()
        one = {}
        for n in (threads, 1):
            torch.set_num_threads(n)
            one[n] = measure(rt, args.tokens, args.repeats)
        torch.set_num_threads(threads)
        out = Path(d) / "tp.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
                        "--worker", str(path), "--out", str(out), "--tokens", str(args.tokens),
                        "--repeats", str(args.repeats)], env=env, check=True)
        tp = json.loads(out.read_text())
        launch_s = time.monotonic() - t0
    print(header(model, f"random Llama {args.layers} layers (hidden 512, 8 heads, 4 KV heads, vocab 32000); "
                        f"greedy, {args.tokens} new tokens a request, median [p20, p80] of {args.repeats}; "
                        f"torchrun launch {launch_s:.0f} s"))
    print(f"| run | batch | per step | vs one process, 1 thread | vs one process, {threads} threads |")
    print("|---|---:|---:|---:|---:|")
    base = {n: {b: quantiles(one[n][b]["per_step"])[0] for b in BATCHES} for n in (1, threads)}
    rows = [(f"one process, {threads} threads", one[threads]),
            ("one process, 1 thread", one[1]),
            (f"TP 2 ranks x {tp['threads']} thread, SPMD", {b: tp["spmd"][str(b)] for b in BATCHES}),
            (f"TP 2 ranks x {tp['threads']} thread, lockstep", {b: tp["lockstep"][str(b)] for b in BATCHES})]
    ref = {b: one[threads][b]["tokens"] for b in BATCHES}
    for name, res in rows:
        for b in BATCHES:
            assert res[b]["tokens"] == ref[b], f"{name}, batch {b}: tokens differ from one process"
            m = quantiles(res[b]["per_step"])[0]
            print(f"| {name} | {b} | {fmt(res[b]['per_step'])} | {m / base[1][b]:.2f}x | "
                  f"{m / base[threads][b]:.2f}x |")
    print("(tokens equal in every run)")


if __name__ == "__main__":
    main()
