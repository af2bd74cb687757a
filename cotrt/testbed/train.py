"""Train the testbed's models on this CPU, from a seed.

    python -m cotrt.testbed.train --out DIR [--steps N] [--valve-steps N] [--stage-steps N]
                                  [--stages S] [--seed S] [--quick] [--no-coconut]

Writes
    DIR/base/    an ordinary HF checkpoint (config.json, model.safetensors, tokenizer.json):
                 a tiny LlamaForCausalLM trained on LONG chains (think, re-check twice, answer);
    DIR/valve/   a CoT-Valve LoRA (PEFT, r=8) trained from the base on SHORT chains, so that
                 alpha in [0, 1] moves between the two lengths (``rt.load_valve``);
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
# steps, 99 for the valve, 793 in all (seed 0; the Coconut stages, off in the bench, ~3 min more).
# 560 steps (a quarter of the rows truncated) left plain decoding at 0.71 (first-pass arithmetic
# errors); 850 steps, 30% truncated, reach 0.945-0.98 on validation (3 seeds). Truncated rows are what an exit
# or a budget leaves, so a larger share teaches answering from a cut chain.
FULL = {"hidden": 128, "layers": 4, "heads": 4, "inter": 384, "steps": 850, "valve_steps": 180, "batch": 24,
        "lr": 3e-3, "stages": 6, "stage_steps": 100, "truncate": 0.3}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "inter": 128, "steps": 60, "valve_steps": 21, "batch": 16,
         "lr": 3e-3, "stages": 2, "stage_steps": 5, "truncate": 0.25}
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


def fit(model, tok, stream, style, steps: int, batch: int, lr: float, log_every: int = 25,
        label: str = "", truncate: float = 0.0, rng: random.Random | None = None, before_step=None) -> list[float]:
    """Train on chains from ``stream``; returns the loss of every step. ``style`` is a chain
    style or a function of the step giving one; ``before_step(style)`` runs before each step
    (the valve sets its LoRA scale there). With ``truncate`` > 0 each row is, with that
    probability (drawn from ``rng``), a TRUNCATED chain cut at a uniform think token."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer(params, lr, steps)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        st = style(step) if callable(style) else style
        if before_step is not None:
            before_step(st)
        problems = [next(stream) for _ in range(batch)]
        cuts = None
        if truncate > 0:
            cuts = [rng.randint(0, long_think_tokens(p, tok)) if rng.random() < truncate else None for p in problems]
        ids, labels, attn = make_batch(problems, tok, st, cuts)
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
                 truncate=cfg["truncate"], rng=random.Random(seed + 2))
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


def run(args, cfg: dict) -> dict:
    random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    c0 = time.process_time()
    base = train_base(args.out, args.seed, cfg)
    valve = train_valve(args.out, args.seed, cfg)
    coconut = None
    if not args.no_coconut:
        coconut = train_coconut(args.out, args.seed, cfg["stages"], cfg["stage_steps"], cfg["batch"], cfg["lr"])
    log = {"seed": args.seed, "quick": args.quick, "config": cfg, "test_size": TEST_SIZE, "val_size": VAL_SIZE,
           "split_seed": SPLIT_SEED, "torch": torch.__version__, "threads": torch.get_num_threads(), "eos": EOS,
           "base": base, "valve": valve, "coconut": coconut, "cpu_seconds": time.process_time() - c0}
    (args.out / "train_log.json").write_text(json.dumps(log))
    print(f"base: {base['params']} params, loss {base['losses'][0]:.3f} -> {base['losses'][-1]:.3f} "
          f"in {base['seconds']:.0f}s; valve: loss {valve['losses'][0]:.3f} -> {valve['losses'][-1]:.3f} "
          f"in {valve['seconds']:.0f}s; {log['cpu_seconds']:.0f} CPU s in all; saved to {args.out}", file=sys.stderr)
    return log


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cotrt.testbed.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=None, help="base model steps")
    ap.add_argument("--valve-steps", type=int, default=None)
    ap.add_argument("--stage-steps", type=int, default=None, help="steps per Coconut stage")
    ap.add_argument("--stages", type=int, default=None, help="last Coconut stage (thoughts)")
    ap.add_argument("--no-coconut", action="store_true", help="skip the latent model")
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
    for k in ("stage_steps", "stages"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    for k in ("steps", "valve_steps", "stage_steps"):
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
