"""Drive the testbed models through cotrt: accuracy vs think tokens for each control.

    python -m cotrt.testbed.evaluate --models DIR [--n 200] [--out bench/testbed_results.md]

Every setting runs the same held-out problems (``task.held_out(seed, n)``, never trained
on) greedily through ``cotrt.wrap``; a row is correct when the number after ``</think>``
equals the exact answer (no answer after ``</think>``, e.g. thinking never closed, is
wrong). Reported per setting: accuracy, mean think tokens (the tokens the model chose
while thinking, its own end marker included; a forced marker is counted apart, as
``stats["forced_tokens"]``), think tokens saved against plain decoding, mean probe tokens (decoded by exit
policies, then rolled back), and the wall time of the whole batch.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cotrt
from cotrt.control.policies import DEER, EAT, Dynasor
from cotrt.control.profiles import ModelProfile
from cotrt.control.think import ThinkFormat
from cotrt.models import quiet_loading

from .task import END, INDUCER, THINK, held_out, parse_answer

MAX_NEW = 256  # a LONG chain is ~60-140 think tokens; 256 leaves room for a runaway one
BUDGETS = (16, 32, 48, 64, 96)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
LATENT_KS = (0, 2, 4, 6)

# The exit policies' model knowledge for this task. Probes close thinking and ask for the
# answer exactly as the training chains do ("</think>\nAnswer:"), a probe's answer ends at
# the newline after the number, and re-checks start with "Wait" (DEER's cue).
PROFILE = ModelProfile("testbed", ThinkFormat(THINK, END), answer_inducer=INDUCER, probe_close="\n",
                       probe_max_tokens=6, dynasor_inducer=INDUCER, dynasor_ending="\n",
                       step_cues=("Wait",), answer_methods=("last_number",))


@dataclass
class Setting:
    control: str
    setting: str
    params: cotrt.Params
    no_cot: bool = False  # prompt with thinking already closed
    needs_valve: bool = False


def settings(budgets=BUDGETS, alphas=ALPHAS) -> list[Setting]:
    """The evaluated controls. Exit policies run at their published defaults (threshold,
    every, k, alpha), with this task's inducer and cue; Dynasor and EAT also with a probe
    interval that fits these short chains: at their defaults Dynasor (every 64, k=3) cannot
    exit before 192 think tokens and EAT (every 32, 4 probes) before 128, while a LONG
    chain here has ~80-140."""
    P = lambda **kw: cotrt.Params(max_new_tokens=MAX_NEW, **kw)
    out = [Setting("plain", "-", P()), Setting("no-CoT", "think closed in prompt", P(), no_cot=True)]
    out += [Setting("think_budget", str(b), P(think_budget=b)) for b in budgets]
    # A forced "</think>" mid-chain is never seen in training: the base model goes on
    # computing after it (the answer tokens show it). Capping the answer phase as well
    # measures the budget with that escape closed ("\nAnswer: NN\n" + eos is 7-8 tokens).
    out += [Setting("think_budget + answer_budget 8", str(b), P(think_budget=b, answer_budget=8))
            for b in budgets[1::2]]
    out += [Setting("DEER", "threshold 0.95, cue Wait", P(exit=DEER(profile=PROFILE, cues=("Wait",))))]
    # "regenerate": end thinking and let the model write "Answer: N" itself. The template
    # ending would inject the inducer, whose "</think>" follows the forced one.
    out += [Setting("Dynasor", f"every {e}, k 3", P(exit=Dynasor(every=e, k=3, max_tokens=6, profile=PROFILE,
                                                                   ending="regenerate")))
            for e in (64, 16)]
    # EAT reads the entropy of the token after its end text: after "Answer: " that is the
    # answer's first digit (after "Answer:" it would be the space, always ~0 nats).
    out += [Setting("EAT", f"every {e}", P(exit=EAT(every=e, end_text=INDUCER + " "))) for e in (32, 8)]
    out += [Setting("valve", f"alpha {a:g}", P(valve={"short": a}), needs_valve=True) for a in alphas]
    return out


def _first_answer(text: str) -> str:
    """``text`` up to the end of its first "Answer:" line (all of it if there is none)."""
    text = text or ""
    i = text.find("Answer:")
    if i < 0:
        return text
    j = text.find("\n", i)
    return text if j < 0 else text[:j]


def run_setting(rt, problems, s: Setting) -> dict:
    prompts = [p.no_cot_prompt if s.no_cot else p.prompt for p in problems]
    t0 = time.perf_counter()
    outs = rt.generate(prompts, s.params)
    wall = time.perf_counter() - t0
    n = len(problems)
    # The answer is the first "Answer: N" line after thinking: what a reader takes. A model
    # that goes on writing after it (an early exit leaves it in a context it was not trained
    # on, and it does not always stop) is graded on that line, not on what follows.
    correct = sum(parse_answer(_first_answer(o.answer)) == p.answer for o, p in zip(outs, problems))
    think = [o.stats.get("think_tokens", 0) for o in outs]
    probe = [o.stats.get("probe_tokens", 0) for o in outs]
    latent = [o.stats.get("latent_steps", 0) for o in outs]
    answer = [o.stats.get("answer_tokens", 0) for o in outs]
    return {"control": s.control, "setting": s.setting, "n": n, "accuracy": correct / n,
            "think_tokens": sum(think) / n, "probe_tokens": sum(probe) / n,
            "latent_steps": sum(latent) / n, "answer_tokens": sum(answer) / n, "wall_s": wall,
            "errors": sum(o.finish_reason == "error" for o in outs),
            "example": outs[0].text}


def _report(r: dict, log: bool) -> None:
    if log:
        print(f"{r['control']:>12} {r['setting']:<28} acc {r['accuracy']:.3f}  think {r['think_tokens']:6.1f}"
              f"  probe {r['probe_tokens']:5.1f}  {r['wall_s']:6.1f}s", file=sys.stderr, flush=True)


def evaluate_latent(models: Path, problems, ks=LATENT_KS, max_batch: int = 32, log=True) -> list[dict]:
    """The Coconut-style model of stage k with k thoughts, loaded onto a fresh base by
    ``cotrt.latent.load_coconut``; stages not trained are skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cotrt.latent import load_coconut

    rows = []
    for k in ks:
        ckpt = Path(models) / "coconut" / f"stage_{k}.pt"
        if not ckpt.exists():
            continue
        base = Path(models) / "base"
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model, tok, latent = load_coconut(model, AutoTokenizer.from_pretrained(base), str(ckpt), steps=k)
        rt = cotrt.wrap(model, tok, max_batch=max_batch, max_len=512)
        s = Setting("latent (Coconut)", f"k {k} (stage {k} model)", cotrt.Params(max_new_tokens=MAX_NEW, latent=latent))
        r = run_setting(rt, problems, s)
        rows.append(r)
        _report(r, log)
    return rows


def evaluate(models: Path, n: int = 200, seed: int = 0, max_batch: int = 32, only=None, log=True) -> list[dict]:
    """Run every setting (or those whose control is in ``only``; "latent" for the Coconut
    model); returns result rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(models) / "base"
    tok = AutoTokenizer.from_pretrained(base)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rt = cotrt.wrap(model, tok, max_batch=max_batch, max_len=512)
    problems = held_out(seed, n)
    todo = [s for s in settings() if only is None or s.control in only]
    # Settings without a valve run first, before the LoRA is loaded: loading swaps the
    # target linears for ValveLinear, and their timings should be the base model's.
    todo.sort(key=lambda s: s.needs_valve)
    rows = []
    for s in todo:
        if s.needs_valve and rt.valves is None:
            rt.load_valve(str(Path(models) / "valve"), name="short")
        r = run_setting(rt, problems, s)
        rows.append(r)
        _report(r, log)
    if only is None or "latent" in only:
        rows += evaluate_latent(models, problems, max_batch=max_batch, log=log)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    plain = next((r for r in rows if r["control"] == "plain"), None)
    lines = [
        "# Testbed: accuracy vs think tokens through cotrt",
        "",
        (f"{meta.get('n')} held-out problems (seed {meta.get('seed')}), greedy, batch {meta.get('max_batch')}; "
         f"{meta.get('device')}; torch {torch.__version__}; model: {meta.get('model')}."),
        ("Think tokens: tokens of the think phase per problem (the end marker included); saved: "
         "against plain decoding; answer tokens: after the end marker (a model cut off mid-chain may "
         "go on reasoning there, which the answer tokens show); probe "
         "tokens: decoded by exit-policy probes, then rolled back."),
        "",
        "| control | setting | accuracy | think tokens | saved | answer tokens | probe tokens | latent steps | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        saved = "" if not plain or not plain["think_tokens"] else f"{1 - r['think_tokens'] / plain['think_tokens']:+.0%}"
        lines.append(f"| {r['control']} | {r['setting']} | {r['accuracy']:.3f} | {r['think_tokens']:.1f} | {saved} "
                     f"| {r.get('answer_tokens', 0):.1f} | {r['probe_tokens']:.1f} | {r.get('latent_steps', 0):.1f} "
                     f"| {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """Accuracy vs think tokens, one curve per control; False when matplotlib is missing
    (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for control in dict.fromkeys(r["control"] for r in rows):
        pts = sorted((r["think_tokens"], r["accuracy"]) for r in rows if r["control"] == control)
        ax.plot(*zip(*pts), marker="o", label=control)
    ax.set_xlabel("mean think tokens")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def svg_plot(rows: list[dict], path: Path, width: int = 640, height: int = 420) -> None:
    """Accuracy vs mean think tokens, one polyline per control, as a self-contained SVG
    (no plotting dependency)."""
    left, right, top, bottom = 56, 190, 20, 44
    xmax = max(1.0, max(r["think_tokens"] for r in rows)) * 1.05
    X = lambda v: left + (width - left - right) * v / xmax
    Y = lambda a: top + (height - top - bottom) * (1 - a)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{Y(a):.1f}" y2="{Y(a):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{Y(a) + 4:.1f}" text-anchor="end">{a:g}</text>')
    step = max(10, round(xmax / 5, -1))
    v = 0.0
    while v <= xmax:
        out.append(f'<text x="{X(v):.1f}" y="{height - bottom + 16}" text-anchor="middle">{v:g}</text>')
        v += step
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">mean think tokens</text>'
               f'<text x="14" y="{(top + height - bottom) / 2}" transform="rotate(-90 14 {(top + height - bottom) / 2})" '
               'text-anchor="middle">accuracy</text>')
    for i, control in enumerate(dict.fromkeys(r["control"] for r in rows)):
        color = _COLORS[i % len(_COLORS)]
        pts = sorted((r["think_tokens"], r["accuracy"]) for r in rows if r["control"] == control)
        xy = " ".join(f"{X(t):.1f},{Y(a):.1f}" for t, a in pts)
        out.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out += [f'<circle cx="{X(t):.1f}" cy="{Y(a):.1f}" r="3" fill="{color}"/>' for t, a in pts]
        ly = top + 14 * i + 6
        out.append(f'<rect x="{width - right + 12}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{width - right + 26}" y="{ly + 1}">{control}</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out))


def device_line() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m cotrt.testbed.evaluate")
    ap.add_argument("--models", required=True, type=Path, help="the --out of cotrt.testbed.train")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="the seed the models were trained with")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="markdown table (a .png plot beside it)")
    ap.add_argument("--only", nargs="*", default=None, help="controls to run (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); "
                    "1 because a ~1M-parameter model's decode steps are Python-bound, see train.py")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = evaluate(args.models, args.n, args.seed, args.max_batch, only=args.only)
    log_path = args.models / "train_log.json"
    model = "?"
    if log_path.exists():
        c = json.loads(log_path.read_text())
        b = c["base"]
        model = (f"Llama {c['config']['layers']}x{c['config']['hidden']}, {b['params'] / 1e6:.2f}M params, "
                 f"{c['config']['steps']} steps ({b['seconds']:.0f} s); valve LoRA r=8, "
                 f"{c['config']['valve_steps']} steps ({c['valve']['seconds']:.0f} s)")
    meta = {"n": args.n, "seed": args.seed, "max_batch": args.max_batch, "device": device_line(), "model": model}
    text = markdown(rows, meta)
    print(text)
    (args.models / "eval_results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.out:
        args.out.write_text(text)
        svg_plot(rows, args.out.with_suffix(".svg"))
        if not plot(rows, args.out.with_suffix(".png")):
            print("matplotlib is not installed: the plot is the SVG only", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
