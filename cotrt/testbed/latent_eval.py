"""Evaluate the latent testbed's models (latent_train.py) through cotrt.

    python -m cotrt.testbed.latent_eval --models DIR --seed S [--split test|val] [--n 200]

Every setting runs the same held-out problems (``hops.held_out(seed, n)``, or the
validation split) greedily through ``cotrt.wrap``:

- plain CoT: the base model writes its chain (``prompt``);
- no-CoT: the same model with thinking closed in the prompt (a trained mode: a quarter of
  its training examples answer at once);
- Coconut stage s: the stage-s checkpoint loaded with ``cotrt.loaders.load_coconut``, each
  question with its own k = c * min(s, hops) latent steps (``Latent(steps=k)``, final-norm
  feedback, no begin or end token: latent_train.coconut_latent);
- CCoT: the bundle loaded with ``cotrt.loaders.load_ccot_bundle``; the END head decides
  when contemplation stops (the bundle's feedback, contemplation LoRA during, answer LoRA
  after).

A row is correct when the node after the first "Answer:" following thinking is the answer.
Reported: accuracy, think tokens (``stats["think_tokens"]``: tokens the model chose while
thinking, its own ``</think>`` included), latent steps, think positions (their sum: what
the comparison with plain CoT counts), answer tokens, wall time of the whole batch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import cotrt
from cotrt.models import quiet_loading

from . import hops

MAX_NEW = 40  # a chain is 6 tokens a hop, the last 2 (at most 27 think tokens with </think>), then "\nAnswer: X\n"


def _answer_text(o, prompt: str) -> str:
    """The text after thinking (the prompt's tail included when the prompt closed thinking
    itself, as no-CoT's does); empty when thinking never closed."""
    text = prompt + (o.text or "")
    i = text.rfind(hops.END)
    return text[i + len(hops.END):] if i >= 0 else ""


def score(outs, problems, prompts, control: str, setting: str, wall: float) -> dict:
    n = len(problems)
    correct = [hops.parse_answer(_answer_text(o, q)) == p.answer for o, p, q in zip(outs, problems, prompts)]
    think = [o.stats.get("think_tokens", 0) for o in outs]
    latent = [o.stats.get("latent_steps", 0) for o in outs]
    answer = [o.stats.get("answer_tokens", 0) for o in outs]
    return {"control": control, "setting": setting, "n": n, "accuracy": sum(correct) / n,
            "think_tokens": sum(think) / n, "latent_steps": sum(latent) / n,
            "think_positions": (sum(think) + sum(latent)) / n, "answer_tokens": sum(answer) / n,
            "wall_s": wall, "errors": sum(o.finish_reason == "error" for o in outs),
            "example": outs[0].text}


def _run(rt, prompts, params, problems, control, setting, log) -> dict:
    t0 = time.perf_counter()
    outs = rt.generate(prompts, params)
    r = score(outs, problems, prompts, control, setting, time.perf_counter() - t0)
    if log:
        print(f"{control:>8} {setting:<22} acc {r['accuracy']:.3f}  think {r['think_tokens']:5.1f}"
              f"  latent {r['latent_steps']:4.1f}  {r['wall_s']:5.1f}s", file=sys.stderr, flush=True)
    return r


def feedback_label(feedback) -> str:
    """"final-norm" or "layer l": what a CCoT row's contemplation feeds back."""
    return "final-norm" if feedback == "final_norm" else f"layer {feedback}"


def _load_base(models: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(models / "base")


def evaluate(models: Path, problems, max_batch: int = 64, stages=None, log=True) -> list[dict]:
    """Plain CoT, no-CoT, Coconut per stage, CCoT on ``problems``; returns result rows."""
    from cotrt.loaders import load_ccot_bundle, load_coconut

    from .latent_train import coconut_latent, stage_thoughts

    models = Path(models)
    model, tok = _load_base(models)
    rt = cotrt.wrap(model, tok, max_batch=max_batch)
    P = cotrt.Params(max_new_tokens=MAX_NEW)
    rows = [_run(rt, [p.prompt for p in problems], P, problems, "CoT", "plain", log),
            _run(rt, [p.no_cot_prompt for p in problems], P, problems, "no-CoT", "think closed in prompt", log)]
    cfg = json.loads((models / "train_log.json").read_text())["config"]
    c = cfg["c"]
    stages = range(hops.MAX_HOPS + 1) if stages is None else stages
    for s in stages:
        ckpt = models / "coconut" / f"stage_{s}.pt"
        if not ckpt.exists():
            continue
        model, tok = _load_base(models)
        model, tok, _ = load_coconut(model, tok, str(ckpt), steps=0)
        rt = cotrt.wrap(model, tok, max_batch=max_batch)
        # k = c * min(s, hops) thoughts: one request batch per k, results in problem order.
        ks = [stage_thoughts(s, p.hops, c) for p in problems]
        params = [cotrt.Params(max_new_tokens=MAX_NEW, latent=coconut_latent(k)) for k in ks]
        rows.append(_run(rt, [p.prompt for p in problems], params, problems, "Coconut", f"stage {s} (c={c})", log))
    if (models / "ccot").exists():
        model, tok, latent = load_ccot_bundle(models / "ccot")
        rt = cotrt.wrap(model.eval(), tok, max_batch=max_batch)
        rows.append(_run(rt, [p.prompt for p in problems], cotrt.Params(max_new_tokens=MAX_NEW, latent=latent),
                         problems, "CCoT", f"END head, {feedback_label(latent.feedback)} feedback", log))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m cotrt.testbed.latent_eval")
    ap.add_argument("--models", required=True, type=Path, help="the --out of cotrt.testbed.latent_train")
    ap.add_argument("--seed", type=int, required=True, help="the seed the models were trained with")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    torch.set_num_threads(1)
    problems = (hops.held_out if args.split == "test" else hops.validation)(args.seed, args.n)
    rows = evaluate(args.models, problems, args.max_batch)
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "split": args.split, "n": args.n, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
