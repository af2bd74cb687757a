"""Train the testbed's models on this CPU, from a seed.

    python -m cotrt.testbed.train --out DIR [--steps N] [--valve-steps N] [--budget-steps N]
                                  [--stage-steps N] [--stages S] [--seed S] [--quick]
                                  [--no-coconut] [--no-budget] [--budget-only]

Writes
    DIR/base/    an ordinary HF checkpoint (config.json, model.safetensors, tokenizer.json):
                 a tiny LlamaForCausalLM trained on LONG chains (think, re-check twice, answer);
    DIR/valve/   a CoT-Valve LoRA (PEFT, r=8) trained from the base on SHORT chains, so that
                 alpha in [0, 1] moves between the two lengths (``rt.load_valve``);
    DIR/budget/  the budget model: the base fine-tuned to answer from a chain cut early
                 (``train_budget``), an ordinary HF checkpoint like the base;
    DIR/coconut/stage_{s}.pt  a Coconut-style latent model after curriculum stage s (s
                 thoughts replacing the first s chain lines; coconut.py), in Coconut's
                 checkpoint format for ``cotrt.latent.load_coconut``;
    DIR/train_log.json  settings, losses and times.

The loss covers the completion only (think, answer, eos): the question's numbers are
random, so predicting them teaches nothing. ``--quick`` trains a 2-layer, 64-wide model
for a few dozen steps (well under a minute on 2 cores): enough for the pipeline tests.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .coconut import train_coconut
from .optim import optimizer
from .task import EOS, TEST_SIZE, VAL_SIZE, VALVE_LEVELS, build_tokenizer, check_tokenizer, excluded, train_stream

SPLIT_SEED = 0  # the test and validation splits every training seed excludes (evaluate.py's)

# FULL: ~0.8 CPU s a base step at batch 24 on one CPU thread (fp32): 690 CPU s for the base's 850
# steps, 99 for the valve, 827 for the budget model, 1620 in all (seed 0; the Coconut stages, off
# in the bench, ~3 min more).
# 560 steps (a quarter of the rows truncated) left plain decoding at 0.71 (first-pass arithmetic
# errors); 850 steps, 30% truncated, reach 0.945-0.98 on validation (3 seeds). Truncated rows are what an exit
# or a budget leaves, so a larger share teaches answering from a cut chain.
# The budget stage (``train_budget``), chosen on the validation split (seeds 1 and 2, hard
# think budgets 8-64 with the answer bounded): 150 steps left the floor at chance (0.025-0.05
# from 8 to 20 tokens); 400 raised it to 0.09-0.145; 1000 (~825 CPU s) to 0.195-0.23 (no-CoT
# 0.21, plain 1.00 on both seeds against the base's 0.98 and 0.945).
FULL = {"hidden": 128, "layers": 4, "heads": 4, "inter": 384, "steps": 850, "valve_steps": 180, "batch": 24,
        "lr": 3e-3, "stages": 6, "stage_steps": 100, "truncate": 0.3,
        "budget_steps": 1000, "budget_lr": 1e-3, "budget_whole": 0.3, "budget_early": 0.5}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "inter": 128, "steps": 60, "valve_steps": 21, "batch": 16,
         "lr": 3e-3, "stages": 2, "stage_steps": 5, "truncate": 0.25,
         "budget_steps": 6, "budget_lr": 1e-3, "budget_whole": 0.3, "budget_early": 0.5}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(tok, hidden: int, layers: int, heads: int, inter: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_batch(problems, tok, style: str, cuts=None):
    """input_ids / labels / attention_mask ``[B, T]``, right-padded; labels are -100 on the
    prompt and padding. ``cuts[i]`` (None: a whole chain) makes row i a TRUNCATED chain: the
    LONG chain cut after that many think tokens, then ``</think>\nAnswer: N``; the forced
    ``</think>`` is no target (a budget puts it there, the model is not taught to stop)."""
    rows, masks, forced = [], [], []
    for i, p in enumerate(problems):
        prompt = tok.encode(p.prompt, add_special_tokens=False)
        cut = None if cuts is None else cuts[i]
        if cut is None:
            comp = tok.encode(p.completion(style), add_special_tokens=False)
        else:
            comp, at = p.truncated_completion(cut, tok)
            forced.append((i, len(prompt) + at))
        rows.append(prompt + comp + [tok.eos_token_id])
        masks.append(len(prompt))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, m: len(r)] = torch.tensor(r[m:])
        attn[i, : len(r)] = 1
    for i, j in forced:
        labels[i, j] = -100
    return ids, labels, attn


def long_think_tokens(p, tok) -> int:
    return len(tok.encode(p.think("long"), add_special_tokens=False))


def lm_loss(logits, labels):
    """Next-token cross-entropy, -100 ignored (``logits [B, T, V]``, ``labels [B, T]``).
    Computed here rather than with ``labels=``: one forward with labels took 0.57 s against
    0.015 s without on the quick model (16 x 210 tokens), on a machine shared with another
    job, so the cause is unconfirmed; this path costs milliseconds either way."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def first_pass_tokens(p, tok) -> int:
    return len(tok.encode(p.first_pass(), add_special_tokens=False))


def uniform_cuts(tok, share: float, rng: random.Random):
    """A row's cut for ``fit``: with probability ``share`` a uniform think token of the LONG
    chain, else None (the whole chain)."""
    return lambda p: rng.randint(0, long_think_tokens(p, tok)) if rng.random() < share else None


def budget_cuts(tok, whole: float, early: float, rng: random.Random):
    """The budget stage's cuts: with probability ``whole`` none (the whole chain), with
    probability ``early`` a uniform token of the first pass (where budgets below the answer's
    line end), else a uniform token of the LONG chain."""
    def cut(p):
        u = rng.random()
        if u < whole:
            return None
        if u < whole + early:
            return rng.randint(0, first_pass_tokens(p, tok))
        return rng.randint(0, long_think_tokens(p, tok))
    return cut


def fit(model, tok, stream, style, steps: int, batch: int, lr: float, log_every: int = 25,
        label: str = "", cuts=None, before_step=None) -> list[float]:
    """Train on chains from ``stream``; returns the loss of every step. ``style`` is a chain
    style or a function of the step giving one; ``before_step(style)`` runs before each step
    (the valve sets its LoRA scale there). ``cuts(problem)`` (``uniform_cuts``,
    ``budget_cuts``) gives each row's cut: an int makes it a TRUNCATED chain, None a whole one."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer(params, lr, steps)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        st = style(step) if callable(style) else style
        if before_step is not None:
            before_step(st)
        problems = [next(stream) for _ in range(batch)]
        ids, labels, attn = make_batch(problems, tok, st, None if cuts is None else [cuts(p) for p in problems])
        loss = lm_loss(model(input_ids=ids, attention_mask=attn).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[{label}] step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s",
                  file=sys.stderr, flush=True)
    model.eval()
    return losses


def train_base(out: Path, seed: int, cfg: dict) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer()
    check_tokenizer(tok)
    model = LlamaForCausalLM(model_config(tok, cfg["hidden"], cfg["layers"], cfg["heads"], cfg["inter"]))
    stream = train_stream(seed, exclude=excluded(SPLIT_SEED))
    t0, c0 = time.perf_counter(), time.process_time()
    losses = fit(model, tok, stream, "long", cfg["steps"], cfg["batch"], cfg["lr"], label="base",
                 cuts=uniform_cuts(tok, cfg["truncate"], random.Random(seed + 2)))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "base")
    tok.save_pretrained(str(out / "base"))
    n_params = sum(p.numel() for p in model.parameters())
    return {"losses": losses, "seconds": secs, "cpu_seconds": cpu, "params": n_params}


def _set_lora_scale(model, beta: float) -> None:
    """Every LoRA layer's scale to ``beta`` times its configured one (lora_alpha / r)."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", beta)


def train_valve(out: Path, seed: int, cfg: dict) -> dict:
    """A LoRA trained from the saved base on MixChain data (CoT-Valve++): the steps cycle
    through the shorter styles of ``VALVE_LEVELS``, each trained at theta + beta * delta
    with its beta, so that alpha = 0 serves the base (LONG chains), alpha = 1/3 one
    re-check, 2/3 the first pass alone and 1 the compact first pass (``rt.load_valve``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed + 1)
    tok = AutoTokenizer.from_pretrained(out / "base")
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lcfg)
    stream = train_stream(seed + 1, exclude=excluded(SPLIT_SEED))
    styles = list(VALVE_LEVELS)
    t0, c0 = time.perf_counter(), time.process_time()
    losses = fit(model, tok, stream, lambda step: styles[step % len(styles)], cfg["valve_steps"], cfg["batch"],
                 cfg["lr"], label="valve", before_step=lambda st: _set_lora_scale(model, VALVE_LEVELS[st]))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    _set_lora_scale(model, 1.0)
    model.save_pretrained(out / "valve")
    return {"losses": losses, "seconds": secs, "cpu_seconds": cpu, "levels": VALVE_LEVELS}


def train_budget(out: Path, seed: int, cfg: dict) -> dict:
    """The budget model: the saved base fine-tuned (``budget_steps`` at ``budget_lr``) on
    ``budget_cuts`` rows, saved to ``out/budget``.

    A hard think budget below the answer's line leaves a chain cut inside its first pass.
    The base sees few such rows (a uniform cut lands below token 16 in ~4% of them) and
    answers them by copying the last value written: with one intermediate value it scored
    below its no-CoT guess (think_budget 16 under 8, every seed). Qwen3's thinking budget
    rests on the same ability, answering from unfinished thinking, which its training
    gives it. Half of this stage's rows are cut inside the first pass, 30% are whole chains
    so that plain decoding is kept. A stage after the base, not early cuts mixed into the
    base's own training: that mix (bench/RESULTS.md, sessions 6 and 8) cost EAT and Dynasor
    their savings and one seed's plain accuracy, where this stage keeps both (session 10:
    the exit grid run on the budget model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed + 3)
    tok = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    stream = train_stream(seed + 3, exclude=excluded(SPLIT_SEED))
    cuts = budget_cuts(tok, cfg["budget_whole"], cfg["budget_early"], random.Random(seed + 4))
    t0, c0 = time.perf_counter(), time.process_time()
    losses = fit(model, tok, stream, "long", cfg["budget_steps"], cfg["batch"], cfg["budget_lr"],
                 label="budget", cuts=cuts)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.save_pretrained(out / "budget")
    tok.save_pretrained(str(out / "budget"))
    return {"losses": losses, "seconds": secs, "cpu_seconds": cpu}


def run(args, cfg: dict) -> dict:
    random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget_only:
        return run_budget_only(args, cfg)
    c0 = time.process_time()
    base = train_base(args.out, args.seed, cfg)
    valve = train_valve(args.out, args.seed, cfg)
    budget = None if args.no_budget else train_budget(args.out, args.seed, cfg)
    coconut = None
    if not args.no_coconut:
        coconut = train_coconut(args.out, args.seed, cfg["stages"], cfg["stage_steps"], cfg["batch"], cfg["lr"])
    log = {"seed": args.seed, "quick": args.quick, "config": cfg, "test_size": TEST_SIZE, "val_size": VAL_SIZE,
           "split_seed": SPLIT_SEED, "torch": torch.__version__, "threads": torch.get_num_threads(), "eos": EOS,
           "base": base, "valve": valve, "budget": budget, "coconut": coconut,
           "cpu_seconds": time.process_time() - c0}
    (args.out / "train_log.json").write_text(json.dumps(log))
    print(f"base: {base['params']} params, loss {base['losses'][0]:.3f} -> {base['losses'][-1]:.3f} "
          f"in {base['seconds']:.0f}s; valve: loss {valve['losses'][0]:.3f} -> {valve['losses'][-1]:.3f} "
          f"in {valve['seconds']:.0f}s; {log['cpu_seconds']:.0f} CPU s in all; saved to {args.out}", file=sys.stderr)
    return log


def run_budget_only(args, cfg: dict) -> dict:
    """``--budget-only``: the budget stage alone, from the base already in ``args.out``
    (trained by an earlier run with the same seed), added to its train_log.json."""
    log_path = args.out / "train_log.json"
    if not (args.out / "base" / "config.json").exists() or not log_path.exists():
        raise SystemExit(f"--budget-only: no trained base in {args.out} (run without --budget-only first)")
    log = json.loads(log_path.read_text())
    if log.get("seed") != args.seed:
        raise SystemExit(f"--budget-only: {args.out} was trained with --seed {log.get('seed')}, not {args.seed}")
    if bool(log.get("quick")) != args.quick:
        raise SystemExit(f"--budget-only: {args.out} was trained {'with' if log.get('quick') else 'without'} "
                         "--quick; give --budget-only the same")
    budget = train_budget(args.out, args.seed, cfg)
    log["budget"] = budget
    log["config"] = {**log["config"], **{k: v for k, v in cfg.items() if k.startswith("budget_")}}
    log["cpu_seconds"] = log.get("cpu_seconds", 0) + budget["cpu_seconds"]
    log_path.write_text(json.dumps(log))
    print(f"budget: loss {budget['losses'][0]:.3f} -> {budget['losses'][-1]:.3f} in {budget['seconds']:.0f}s; "
          f"saved to {args.out / 'budget'}", file=sys.stderr)
    return log


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cotrt.testbed.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=None, help="base model steps")
    ap.add_argument("--valve-steps", type=int, default=None)
    ap.add_argument("--budget-steps", type=int, default=None, help="budget-model steps (train_budget)")
    ap.add_argument("--stage-steps", type=int, default=None, help="steps per Coconut stage")
    ap.add_argument("--stages", type=int, default=None, help="last Coconut stage (thoughts)")
    ap.add_argument("--no-coconut", action="store_true", help="skip the latent model")
    ap.add_argument("--no-budget", action="store_true", help="skip the budget model")
    ap.add_argument("--budget-only", action="store_true",
                    help="train only the budget model, from the base already in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a reduced model and run (pipeline tests)")
    # One thread by default: on 2 cores shared with another torch process, 2 threads made
    # the quick base run 51 s instead of 4 s (OpenMP workers spinning against each other).
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.valve_steps is not None:
        cfg["valve_steps"] = args.valve_steps
    if args.budget_steps is not None:
        cfg["budget_steps"] = args.budget_steps
    if args.budget_only and args.no_budget:
        raise SystemExit("--budget-only and --no-budget contradict each other")
    for k in ("stage_steps", "stages"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    for k in ("steps", "valve_steps", "stage_steps", "budget_steps"):
        if cfg[k] < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1")
    threads, determ = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Deterministic on one machine: fixed threads, deterministic kernels, seeded init and
    # data order (train_stream and the truncation draws are seeded random.Randoms).
    torch.use_deterministic_algorithms(True)
    try:  # both settings are process-wide: give them back (main() also runs inside tests)
        log = run(args, cfg)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(determ)
    return log


if __name__ == "__main__":
    main()
