"""Command line: ``cotrt generate``, ``cotrt demo``, ``cotrt serve``.

Bad input (a model that is not there, an empty prompt, a prompt over ``--max-len``, a
size < 1, a busy port) prints one line naming the argument and exits 2, before the model
loads where it can be checked without it."""
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


class UsageError(ValueError):
    """Bad input to a command: one line on stderr, exit status 2 (no traceback)."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except None ones (their help says what None means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one)")
    p.add_argument("--think-budget", type=int, default=None, help="hard cap on thinking tokens")
    p.add_argument("--think-budget-cut", choices=("token", "step"), default="token",
                   help="where the hard cap ends thinking: at its last token, or at the last whole step within it")
    p.add_argument("--soft-budget", type=int, default=None, help="end thinking at the next step boundary past this")
    p.add_argument("--min-think", type=int, default=None, help="extend shorter thinking with 'Wait'")
    p.add_argument("--answer-budget", type=int, default=None, help="cap on answer tokens")
    p.add_argument("--max-steps", type=int, default=None, help="cap on reasoning steps (boundaries: blank lines)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _params(args):
    from .params import Params

    return Params(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), think_budget=args.think_budget,
                  think_budget_cut=args.think_budget_cut, soft_budget=args.soft_budget, min_think=args.min_think,
                  answer_budget=args.answer_budget, max_steps=args.max_steps)


def _check_int(args, name: str, low: int, allow_none: bool = False) -> None:
    v = getattr(args, name)
    if v is None and allow_none:
        return
    if v is None or v < low:
        raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")


def _check_model(model: str) -> None:
    """The model names a local directory or 'default' (whose package is installed): found
    before anything loads."""
    from .models import resolve_model_path

    try:
        resolve_model_path(model, quiet=True)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None


def _load(model: str, max_batch: int, max_len: int | None):
    from .api import wrap
    from .models import load_model

    t0 = time.perf_counter()
    try:
        m, tok = load_model(model, quiet=True)
    except (OSError, RuntimeError) as e:  # a directory that holds no loadable checkpoint
        raise UsageError(f"model {model!r}: {e}".splitlines()[0]) from None
    rt = wrap(m, tok, max_batch=max_batch, max_len=max_len)
    print(f"[cotrt] ready in {time.perf_counter() - t0:.1f}s ({type(m).__name__}, "
          f"think format: {rt.think_format})", file=sys.stderr, flush=True)
    return rt


def cmd_generate(args) -> int:
    if not args.prompt.strip():
        raise UsageError("prompt: empty")
    _check_int(args, "max_len", 2, allow_none=True)
    params = _params(args)
    _check_model(args.model)
    rt = _load(args.model, 1, args.max_len)
    prompt = rt.chat_prompt([{"role": "user", "content": args.prompt}]) if not args.raw else args.prompt
    rid = rt.engine.add(prompt, params)  # a prompt over --max-len is refused here
    t0 = time.perf_counter()
    out = None
    while out is None:
        for ev in rt.engine.step():
            if ev.request_id == rid:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                out = ev.output if ev.finished else None
    dt = time.perf_counter() - t0
    s = out.stats
    print(f"\n[cotrt] {len(out.token_ids)} tokens in {dt:.2f}s ({len(out.token_ids) / dt:.1f} tok/s); "
          f"think {s['think_tokens']}, answer {s['answer_tokens']}, forced {s['forced_tokens']}, "
          f"steps {s['steps']}, exit {s['exit_reason']}, think end {s['think_end']}", file=sys.stderr)
    return 0


class _Progress:
    """Requests done and tokens generated, on stderr: a tqdm bar when tqdm is installed,
    else a counter rewritten in place."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.tokens = total, desc, 0, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)

    def add(self, tokens: int, finished: bool) -> None:
        self.tokens += tokens
        self.done += finished
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens} tokens", refresh=False)
            self.bar.update(int(finished))
        else:
            print(f"\r[cotrt] {self.desc}: {self.done}/{self.total} requests, {self.tokens} tokens",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr, flush=True)


def _chat(rt, convs, params, progress: _Progress) -> list:
    """``rt.chat(convs, params)``, reporting each step's tokens to ``progress``."""
    ids = {rt.engine.add(rt.chat_prompt(c), params): i for i, c in enumerate(convs)}
    outs = [None] * len(convs)
    while any(o is None for o in outs):
        for ev in rt.engine.step():
            if ev.request_id in ids:
                progress.add(len(ev.token_ids), ev.finished)
                if ev.finished:
                    outs[ids[ev.request_id]] = ev.output
    return outs


def cmd_demo(args) -> int:
    from .params import Params

    _check_int(args, "max_batch", 1)
    _check_int(args, "max_len", 2)
    _check_int(args, "max_new_tokens", 1)
    _check_int(args, "testbed_n", 1)
    _check_model(args.model)
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
    progress = _Progress(len(configs) * len(convs), "demo")
    try:
        for name, params in configs:
            t0 = time.perf_counter()
            outs = _chat(rt, convs, params, progress)
            dt = time.perf_counter() - t0
            n = sum(len(o.token_ids) for o in outs)
            rows.append((name, outs, dt, n))
    finally:
        progress.close()
    print(f"\nSmolLM2-135M-Instruct on this CPU, {len(convs)} questions batched (max_batch={args.max_batch}); "
          "the model has no think markers: its reply is the answer, unless a budget forces the answer cue "
          "'\\nFinal answer:' (then the text before it is thinking).\n")
    head = f"{'control':<16} {'tokens':>6} {'think':>6} {'answer':>6} {'forced':>6} {'steps':>5} {'time s':>7} {'tok/s':>6}"
    print(head)
    print("-" * len(head))
    for name, outs, dt, n in rows:
        think = sum(o.stats["think_tokens"] for o in outs)
        ans = sum(o.stats["answer_tokens"] for o in outs)
        forced = sum(o.stats["forced_tokens"] for o in outs)
        steps = sum(o.stats["steps"] for o in outs)
        print(f"{name:<16} {n:>6} {think:>6} {ans:>6} {forced:>6} {steps:>5} {dt:>7.2f} {n / dt:>6.1f}")
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

    models = cache_dir() / "testbed" / "seed0"  # bench_testbed.py trains seeds 0..2 side by side
    if not (models / "base" / "config.json").exists():
        print("\nTestbed (a tiny model trained here to reason in long, re-checking chains): not built; "
              "`python3 bench/bench_testbed.py` trains it (~13 CPU min a training seed) and evaluates every control.")
        return
    from .testbed.evaluate import evaluate, settings

    quick = _testbed_is_quick(models)
    print(f"\nTestbed model ({models}), {n} held-out arithmetic problems, greedy:")
    if quick:
        print("(a --quick build: a reduced model trained for <1 min to test the pipeline, not to reason; "
              "its accuracy means nothing. `python3 -m cotrt.testbed.train --out "
              f"{models}` trains the real one, ~13 CPU min.)")
    print()
    keep = {("plain", "-"), ("no-CoT", "think closed in prompt"), ("think_budget", "64"),
            ("DEER", "threshold 0.95, cue Wait"), ("valve", "alpha 0.5"), ("valve", "alpha 1")}
    todo = [s for s in settings() if (s.control, s.setting) in keep]
    print(f"[cotrt] testbed: evaluating {len(todo)} settings on {n} problems (one line each when done)",
          file=sys.stderr, flush=True)
    rows = evaluate(models, n=n, only=sorted({c for c, _ in keep}), todo=todo, log=True)
    head = f"{'control':<14} {'setting':<26} {'accuracy':>8} {'think tok':>9} {'time s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if (r["control"], r["setting"]) in keep:
            print(f"{r['control']:<14} {r['setting']:<26} {r['accuracy']:>8.2f} {r['think_tokens']:>9.1f} "
                  f"{r['wall_s']:>7.1f}")


def _testbed_is_quick(models) -> bool:
    import json

    try:
        return bool(json.loads((models / "train_log.json").read_text()).get("quick"))
    except (OSError, ValueError):
        return False


def _one_line(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def cmd_serve(args) -> int:
    """`cotrt serve`: what can be checked without the model is checked first (the extra
    installed, sizes, host and port free), so a mistake costs no model load."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"needs {' and '.join(missing)}: pip install 'cotrt[serve]'")
    for name in ("max_batch", "max_queue", "page_size"):
        if hasattr(args, name):
            _check_int(args, name, 1)
    _check_int(args, "max_len", 2, allow_none=True)
    _check_int(args, "kv_tokens", 2, allow_none=True)
    if getattr(args, "kv_tokens", None) and args.max_len and args.kv_tokens < args.max_len:
        raise UsageError(f"--kv-tokens {args.kv_tokens} is below --max-len {args.max_len}: one request must fit")
    _check_int(args, "max_body_bytes", 1)
    for name in ("header_timeout", "body_timeout"):
        v = getattr(args, name)
        if not (v > 0 and v != float("inf")):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {v}")
    _check_tp(args)
    _check_bind(args.host, args.port)
    _check_model(args.model)
    from .server import run_serve

    return run_serve(args)


def _check_tp(args) -> None:
    """``--tp`` equals the number of ranks torchrun started (1 without torchrun)."""
    from .parallel.group import available, check_tp

    try:
        check_tp(args.tp)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.tp > 1 and not available():
        raise UsageError("--tp needs torch.distributed with gloo, which this torch build lacks")
    if not (args.tp_timeout > 0 and args.tp_timeout != float("inf")):
        raise UsageError(f"--tp-timeout must be a positive number of seconds, got {args.tp_timeout}")


def _check_bind(host: str, port: int) -> None:
    """Bind ``host:port`` once as uvicorn will (SO_REUSEADDR), then let it go."""
    import socket

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host!r}: not an address of this machine ({e})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise UsageError(f"--host/--port {host}:{port}: cannot listen there ({e.strerror}); "
                             "another server on that port?") from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="cotrt", description="Compressed chain-of-thought decoding runtime",
                                 formatter_class=_Help)
    ap.add_argument("--version", action="version", version=f"cotrt {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{generate,demo,serve}")
    g = sub.add_parser("generate", help="generate from a prompt, streaming to the terminal", formatter_class=_Help,
                       description="Generate from one prompt, streaming to the terminal; stats on stderr.")
    g.add_argument("prompt", help="the user message (or raw text with --raw)")
    g.add_argument("--model", default="default", help="local HF checkpoint directory, or 'default' (SmolLM2)")
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text (no chat template)")
    g.add_argument("--max-len", type=int, default=None,
                   help="prompt + output tokens (default: the model's limit, at most 2048)")
    _budget_args(g)
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("demo", help="the default model on a few questions, with and without budgets",
                       formatter_class=_Help,
                       description="SmolLM2 on a few questions with and without budgets, then the testbed's "
                                   "trained reasoning model if it is built; progress on stderr.")
    d.add_argument("--model", default="default", help="local HF checkpoint directory, or 'default' (SmolLM2)")
    d.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    d.add_argument("--max-len", type=int, default=1024, help="prompt + output tokens per request")
    d.add_argument("--max-new-tokens", type=int, default=160, help="cap on generated tokens per request")
    d.add_argument("--no-testbed", dest="testbed", action="store_false",
                   help="skip the testbed part (the trained tiny reasoning model)")
    d.add_argument("--testbed-n", type=int, default=50, help="testbed problems to run")
    d.set_defaults(fn=cmd_demo)
    s = sub.add_parser("serve", help="OpenAI-compatible server (loopback by default)", formatter_class=_Help,
                       description="OpenAI-compatible server; needs the serve extra: pip install 'cotrt[serve]'.")
    from .server import add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(fn=cmd_serve)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:  # bad input (UsageError, Params, a prompt too long): one line, exit 2
        print(f"cotrt {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
