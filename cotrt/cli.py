"""Command line: ``cotrt generate``, ``cotrt demo``."""
from __future__ import annotations

import argparse
import sys
import time

DEMO_QUESTIONS = [
    "What is 17 + 25? Think step by step.",
    "A train travels 60 km in 1.5 hours. What is its average speed?",
    "Name the three states of matter and give one example of each.",
    "If I have 3 apples and buy 2 more bags of 4 apples each, how many apples do I have?",
]


def _budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--think-budget", type=int, default=None, help="hard cap on thinking tokens")
    p.add_argument("--soft-budget", type=int, default=None, help="end thinking at the next step boundary past this")
    p.add_argument("--min-think", type=int, default=None, help="extend shorter thinking with 'Wait'")
    p.add_argument("--answer-budget", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _params(args):
    from .params import Params

    return Params(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), think_budget=args.think_budget,
                  soft_budget=args.soft_budget, min_think=args.min_think, answer_budget=args.answer_budget,
                  max_steps=args.max_steps)


def _load(model: str, max_batch: int, max_len: int):
    from .api import wrap
    from .models import load_model

    t0 = time.perf_counter()
    m, tok = load_model(model)
    rt = wrap(m, tok, max_batch=max_batch, max_len=max_len)
    print(f"[cotrt] ready in {time.perf_counter() - t0:.1f}s ({type(m).__name__}, "
          f"think format: {rt.think_format})", file=sys.stderr, flush=True)
    return rt


def cmd_generate(args) -> int:
    try:
        params = _params(args)
    except ValueError as e:
        print(f"cotrt generate: {e}", file=sys.stderr)
        return 2
    rt = _load(args.model, 1, args.max_len)
    prompt = rt.chat_prompt([{"role": "user", "content": args.prompt}]) if not args.raw else args.prompt
    t0 = time.perf_counter()
    out = None
    for ev in rt.stream(prompt, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        out = ev.output
    dt = time.perf_counter() - t0
    s = out.stats
    print(f"\n[cotrt] {len(out.token_ids)} tokens in {dt:.2f}s ({len(out.token_ids) / dt:.1f} tok/s); "
          f"think {s['think_tokens']}, answer {s['answer_tokens']}, steps {s['steps']}, "
          f"exit {s['exit_reason']}, think end {s['think_end']}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .params import Params

    rt = _load(args.model, args.max_batch, args.max_len)
    convs = [[{"role": "user", "content": q}] for q in DEMO_QUESTIONS]
    configs = [
        ("free", Params(max_new_tokens=args.max_new_tokens)),
        ("think_budget=48", Params(max_new_tokens=args.max_new_tokens, think_budget=48, answer_budget=24)),
        ("soft_budget=32", Params(max_new_tokens=args.max_new_tokens, soft_budget=32, soft_grace=32,
                                  answer_budget=24, step_cues=("\n\n", "\n"))),
        ("think_budget=16", Params(max_new_tokens=args.max_new_tokens, think_budget=16, answer_budget=24)),
    ]
    rows = []
    for name, params in configs:
        t0 = time.perf_counter()
        outs = rt.chat(convs, params)
        dt = time.perf_counter() - t0
        n = sum(len(o.token_ids) for o in outs)
        rows.append((name, outs, dt, n))
    print(f"\nSmolLM2-135M-Instruct on this CPU, {len(convs)} questions batched (max_batch={args.max_batch}); "
          "the model has no think markers, so budgets force the answer cue '\\nFinal answer:'.\n")
    head = f"{'control':<16} {'tokens':>6} {'think':>6} {'answer':>6} {'steps':>5} {'time s':>7} {'tok/s':>6}"
    print(head)
    print("-" * len(head))
    for name, outs, dt, n in rows:
        think = sum(o.stats["think_tokens"] for o in outs)
        ans = sum(o.stats["answer_tokens"] for o in outs)
        steps = sum(o.stats["steps"] for o in outs)
        print(f"{name:<16} {n:>6} {think:>6} {ans:>6} {steps:>5} {dt:>7.2f} {n / dt:>6.1f}")
    print()
    for q, free, short in zip(DEMO_QUESTIONS, rows[0][1], rows[3][1]):
        print(f"Q: {q}")
        print(f"  free ({len(free.token_ids)} tokens): {_one_line(free.text)}")
        print(f"  think_budget=16 ({len(short.token_ids)} tokens): {_one_line(short.reasoning, 70)}"
              f" | Final answer: {_one_line(short.answer, 80)}")
    if args.testbed:
        _demo_testbed(args.testbed_n)
    return 0


def _demo_testbed(n: int) -> None:
    """The same controls on the testbed's trained reasoning model, when it is built."""
    from .models import cache_dir

    models = cache_dir() / "testbed"
    if not (models / "base" / "config.json").exists():
        print("\nTestbed (a tiny model trained here to reason in long, re-checking chains): not built; "
              "`python3 bench/bench_testbed.py` trains it (~12 min on 2 cores) and evaluates every control.")
        return
    from .testbed.evaluate import evaluate

    print(f"\nTestbed model ({models}), {n} held-out arithmetic problems, greedy:\n")
    rows = evaluate(models, n=n, only=["plain", "no-CoT", "think_budget", "DEER", "valve"], log=False)
    keep = {("plain", "-"), ("no-CoT", "think closed in prompt"), ("think_budget", "64"),
            ("DEER", "threshold 0.95, cue Wait"), ("valve", "alpha 0.5"), ("valve", "alpha 1")}
    head = f"{'control':<14} {'setting':<26} {'accuracy':>8} {'think tok':>9} {'time s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if (r["control"], r["setting"]) in keep:
            print(f"{r['control']:<14} {r['setting']:<26} {r['accuracy']:>8.2f} {r['think_tokens']:>9.1f} "
                  f"{r['wall_s']:>7.1f}")


def _one_line(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cotrt", description="Compressed chain-of-thought decoding runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate from a prompt, streaming to the terminal")
    g.add_argument("prompt")
    g.add_argument("--model", default="default", help="local HF checkpoint directory, or 'default' (SmolLM2)")
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text (no chat template)")
    g.add_argument("--max-len", type=int, default=2048)
    _budget_args(g)
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("demo", help="the default model on a few questions, with and without budgets")
    d.add_argument("--model", default="default")
    d.add_argument("--max-batch", type=int, default=8)
    d.add_argument("--max-len", type=int, default=1024)
    d.add_argument("--max-new-tokens", type=int, default=160)
    d.add_argument("--no-testbed", dest="testbed", action="store_false",
                   help="skip the testbed part (the trained tiny reasoning model)")
    d.add_argument("--testbed-n", type=int, default=50, help="testbed problems to run")
    d.set_defaults(fn=cmd_demo)
    s = sub.add_parser("serve", help="OpenAI-compatible server (loopback by default)")
    from .server import add_serve_arguments, run_serve

    add_serve_arguments(s)
    s.set_defaults(fn=run_serve)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
