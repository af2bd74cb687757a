"""Drive the testbed models through cotrt: accuracy vs think tokens for each control.

    python -m cotrt.testbed.evaluate --models DIR [--n 200] [--split test|validation] [--out FILE.md]

Every setting runs the same held-out problems (``task.held_out(0, n)``, or the validation
split ``task.validation(0, n)`` on which settings are chosen; neither is trained on) greedily through ``cotrt.wrap``; a row is correct when the number after ``</think>``
equals the exact answer (no answer after ``</think>``, e.g. thinking never closed, is
wrong). Reported per setting: accuracy, mean think tokens (the tokens the model chose
while thinking, its own end marker included; a forced marker is counted apart, as
``stats["forced_tokens"]``), think tokens saved against plain decoding, mean probe tokens (decoded by exit
policies, then rolled back), and the wall time of the whole batch.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import cotrt
from cotrt.control.policies import DEER, EAT, Dynasor
from cotrt.control.profiles import ModelProfile
from cotrt.control.think import ThinkFormat
from cotrt.models import quiet_loading

from .task import END, INDUCER, THINK, held_out, parse_answer, validation

MAX_NEW = 256  # a LONG chain is ~60-140 think tokens; 256 leaves room for a runaway one
BUDGETS = (8, 16, 32, 48, 64, 96)
ANSWER_BUDGET = 8  # "\nAnswer: NN\n" + eos is 7-8 tokens
# The valve's trained levels are 0, 1/3, 2/3 and 1 (task.VALVE_LEVELS); the points between
# them and 1.25 show what alpha does off the trained scales.
ALPHAS = (0.0, 1 / 6, 1 / 3, 0.5, 2 / 3, 5 / 6, 1.0, 1.25)
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
    model: str = "base"  # the checkpoint under the models' folder: "base" or "budget" (train.py)


def deer(threshold: float = 0.95) -> Setting:
    return Setting("DEER", f"threshold {threshold:g}, cue Wait",
                   _P(exit=DEER(threshold=threshold, profile=PROFILE, cues=("Wait",))))


def dynasor(every: int, k: int = 3) -> Setting:
    # "regenerate": end thinking and let the model write "Answer: N" itself. The template
    # ending would inject the inducer, whose "</think>" follows the forced one.
    return Setting("Dynasor", f"every {every}, k {k}",
                   _P(exit=Dynasor(every=every, k=k, max_tokens=6, profile=PROFILE, ending="regenerate")))


def eat(every: int, threshold: float = 1e-3, alpha: float = 0.2, min_probes: int = 4) -> Setting:
    # EAT reads the entropy of the token after its end text: after "Answer: " that is the
    # answer's first digit (after "Answer:" it would be the space, always ~0 nats).
    # alpha is the EMA's timescale; min_probes the warm-up (the authors' code,
    # github.com/xidulu/EAT early_stopping_utils.py, waits min_distance=25 readings).
    return Setting("EAT", f"every {every}, alpha {alpha:g}, threshold {threshold:g}, warm-up {min_probes}",
                   _P(exit=EAT(every=every, threshold=threshold, alpha=alpha, min_probes=min_probes,
                               end_text=INDUCER + " ")))


def _P(**kw) -> cotrt.Params:
    return cotrt.Params(max_new_tokens=MAX_NEW, **kw)


EXIT_CONTROLS = ("DEER", "Dynasor", "EAT")


def exit_grid() -> list[Setting]:
    """The exit settings tried on the validation split (``choose`` picks one per policy).

    A LONG chain here has ~80-150 think tokens and its first pass, which fixes the answer,
    ends at about a third of it. At their published defaults Dynasor (every 64, k 3) cannot
    exit before 192 think tokens and EAT (every 32, 4 probes) before 128, so the grid holds
    intervals that fit these chains:

    - DEER: thresholds around its 0.95.
    - Dynasor: k consistent probes, k * every between 48 and 96 tokens. Shorter spans exit
      on answers that agree while the first pass is still running (a wrong guess repeated):
      offline, on 40 validation problems of seed 0, every 8 k 3 scored 0.65 at -61%.
    - EAT: the entropy of the answer's first digit sits near 2 nats, nearly constant, until
      the first pass ends, then falls to ~0.01. A variance rule with a short warm-up exits
      on that early plateau (every 4, 4 probes: 0.13 offline); with alpha 0.2 the variance
      the fall adds decays by 0.8 a probe and needs ~30 probes to pass 1e-3, past the end
      of the chain. So: alpha 0.5, warm-ups of 12-16 probes (48-64 tokens at every 4), and
      the former setting (every 8, alpha 0.2, 1e-3) as the reference. On validation (3
      seeds, plain 0.968) a 12-probe warm-up scored 0.697 and a 16-probe one 0.960.
    """
    return ([deer(t) for t in (0.9, 0.95, 0.99)]
            + [dynasor(e, k) for e, k in ((12, 4), (16, 3), (16, 4), (24, 2), (32, 2), (32, 3))]
            + [eat(4, t, 0.5, 16) for t in (0.1, 0.03, 0.01)]
            + [eat(4, 0.1, 0.5, 12), eat(8, 0.1, 0.5, 8), eat(8, 1e-3, 0.2, 4)])


def choose(rows: list[dict], tolerance: float = 0.01) -> dict:
    """Per exit control, the setting chosen on validation rows (several training seeds'
    rows pooled by their mean): the fewest mean think tokens among settings whose mean
    accuracy is within ``tolerance`` of plain decoding's; the most accurate when none is.
    Returns {control: setting label}."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    agg = aggregate(rows)
    plain = next((r for r in agg if r["control"] == "plain"), None)
    if plain is None:
        raise ValueError("rows: choose needs the plain rows (the accuracy to hold)")
    out = {}
    for control in EXIT_CONTROLS:
        cands = [r for r in agg if r["control"] == control]
        if not cands:
            continue
        ok = [r for r in cands if r["accuracy"] >= plain["accuracy"] - tolerance]
        best = (min(ok, key=lambda r: (r["think_tokens"], -r["accuracy"])) if ok
                else max(cands, key=lambda r: (r["accuracy"], -r["think_tokens"])))
        out[control] = best["setting"]
    return out


def settings(budgets=BUDGETS, alphas=ALPHAS, exits=None) -> list[Setting]:
    """The evaluated controls. ``exits``: the exit-policy settings to run (default: DEER at
    its published threshold, Dynasor every 16 k 4, EAT every 4 with a 16-probe warm-up);
    bench_testbed.py passes those chosen on the validation split."""
    references = [Setting("plain", "-", _P()), Setting("no-CoT", "think closed in prompt", _P(), no_cot=True)]
    out = list(references)
    # The budget forces "</think>" after b think tokens; the model (trained on truncated
    # chains) then writes "\nAnswer: N". Alone, nothing stops a model that reasons on in
    # its answer; with the answer phase capped as well, the budget bounds the whole output.
    out += [Setting("think_budget", str(b), _P(think_budget=b)) for b in budgets]
    capped = [Setting(f"think_budget + answer_budget {ANSWER_BUDGET}", str(b),
                      _P(think_budget=b, answer_budget=ANSWER_BUDGET)) for b in budgets]
    out += capped
    # The same budgets ended at a step boundary (``soft_budget``: past b tokens, thinking
    # ends at the next line's end, so the model answers from whole lines, never from a
    # half-written "b=a*4=3*"); the think tokens then exceed b by the rest of that line.
    out += [Setting(f"soft_budget + answer_budget {ANSWER_BUDGET}", str(b),
                    _P(soft_budget=b, step_cues=("\n",), answer_budget=ANSWER_BUDGET)) for b in budgets]
    # The hard cap cut back to the last line's end (``think_budget_cut="step"``): never more
    # than b think tokens kept, never a half-written line; the unfinished line's tokens
    # are decoded, then rolled back (counted with the probe tokens).
    out += [Setting(f"think_budget cut at line end + answer_budget {ANSWER_BUDGET}", str(b),
                    _P(think_budget=b, think_budget_cut="step", step_cues=("\n",), answer_budget=ANSWER_BUDGET))
            for b in budgets]
    # Plain, no-CoT and the bounded hard cap again on the budget model (train.py's
    # train_budget: the base fine-tuned on chains cut inside the first pass).
    out += [replace(s, control=f"{s.control}, budget model", model="budget") for s in references + capped]
    out += exits if exits is not None else [deer(), dynasor(16, 4), eat(4, 0.03, 0.5, 16)]
    out += [Setting("valve", f"alpha {a:.2g}", _P(valve={"short": a}), needs_valve=True) for a in alphas]
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
    # Decoded, then rolled back: exit-policy probes, and a step-cut budget's unfinished step.
    probe = [o.stats.get("probe_tokens", 0) + o.stats.get("rolled_back", 0) for o in outs]
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


def split_problems(split: str, n: int, seed: int = 0):
    if split == "test":
        return held_out(seed, n)
    if split == "validation":
        return validation(seed, n)
    raise ValueError(f"split must be 'test' or 'validation', got {split!r}")


def evaluate(models: Path, n: int = 200, seed: int = 0, max_batch: int = 32, only=None, log=True,
             split: str = "test", todo=None) -> list[dict]:
    """Run every setting of ``todo`` (default ``settings()``; or those whose control is in
    ``only``; "latent" for the Coconut model) on ``n`` problems of ``split`` (of the split
    seed ``seed``); returns result rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems = split_problems(split, n, seed)
    todo = [s for s in (settings() if todo is None else todo) if only is None or s.control in only]
    runtimes = {}

    def runtime(name: str):
        if name not in runtimes:
            path = Path(models) / name
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"models: no {name} model in {models} (python -m cotrt.testbed.train "
                                        f"--out {models} --seed S{' --budget-only' if name == 'budget' else ''})")
            tok = AutoTokenizer.from_pretrained(path)
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            runtimes[name] = cotrt.wrap(model, tok, max_batch=max_batch, max_len=512)
        return runtimes[name]

    # The base's settings without a valve run first, before the LoRA is loaded: loading
    # swaps the target linears for ValveLinear, and their timings should be the base model's.
    todo.sort(key=lambda s: (s.model != "base", s.needs_valve))
    for name in dict.fromkeys(s.model for s in todo):
        runtime(name)  # a missing checkpoint fails before any setting runs
    rows = []
    for s in todo:
        rt = runtime(s.model)
        if s.needs_valve and rt.valves is None:
            rt.load_valve(str(Path(models) / "valve"), name="short")
        r = run_setting(rt, problems, s)
        rows.append(r)
        _report(r, log)
    if only is None or "latent" in only:
        rows += evaluate_latent(models, problems, max_batch=max_batch, log=log)
    return rows


_MEANED = ("accuracy", "think_tokens", "answer_tokens", "probe_tokens", "latent_steps", "wall_s")


def _sd(xs) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows of one (control, setting) from several training seeds, pooled: the mean of each
    figure, the sample standard deviation over seeds of accuracy and think tokens (0 for one
    seed), the per-seed accuracies, and the binomial standard error of the mean accuracy on
    the split, sqrt(p (1 - p) / n). Order: first appearance."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["control"], r["setting"]), []).append(r)
    out = []
    for (control, setting), rs in groups.items():
        ns = {r["n"] for r in rs}
        if len(ns) != 1:
            raise ValueError(f"rows: {control} {setting} pools splits of different sizes {sorted(ns)}")
        n = ns.pop()
        agg = {"control": control, "setting": setting, "n": n, "seeds": len(rs)}
        for k in _MEANED:
            agg[k] = sum(r.get(k, 0) for r in rs) / len(rs)
        agg["accuracy_sd"] = _sd([r["accuracy"] for r in rs])
        agg["think_sd"] = _sd([r["think_tokens"] for r in rs])
        agg["per_seed"] = [round(r["accuracy"], 4) for r in rs]
        p = agg["accuracy"]
        agg["binomial_se"] = math.sqrt(p * (1 - p) / n)
        agg["errors"] = sum(r.get("errors", 0) for r in rs)
        out.append(agg)
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    """The table of ``aggregate(rows)``-style rows (plain rows from one seed work too)."""
    plain = next((r for r in rows if r["control"] == "plain"), None)
    lines = [
        "# Testbed: accuracy vs think tokens through cotrt",
        "",
        (f"{meta.get('n')} held-out problems (split seed {meta.get('seed')}), greedy, batch {meta.get('max_batch')}; "
         f"{meta.get('device')}; torch {torch.__version__}; model: {meta.get('model')}."),
        ("Each figure is the mean over the training seeds; ± is the standard deviation over seeds; "
         "SE is the binomial standard error of the mean accuracy on the split, sqrt(p(1-p)/n). "
         "Think tokens: tokens of the think phase per problem (the end marker included); saved: "
         "against plain decoding; answer tokens: after the end marker; probe "
         "tokens: decoded, then rolled back (exit-policy probes; the unfinished line a budget cut "
         "at line end takes back)."),
        "",
        "| control | setting | accuracy | per seed | SE | think tokens | saved | answer tokens | probe tokens "
        "| latent steps | wall s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        # (+ 0.0: a row a hair above plain's tokens would print "-0%")
        saved = "" if not plain or not plain["think_tokens"] else \
            f"{round(1 - r['think_tokens'] / plain['think_tokens'], 2) + 0.0:+.0%}"
        per = " ".join(f"{a:.3f}" for a in r.get("per_seed", [r["accuracy"]]))
        se = r.get("binomial_se", math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / r["n"]))
        lines.append(f"| {r['control']} | {r['setting']} | {r['accuracy']:.3f} ± {r.get('accuracy_sd', 0):.3f} | {per} "
                     f"| {se:.3f} | {r['think_tokens']:.1f} ± {r.get('think_sd', 0):.1f} | {saved} "
                     f"| {r.get('answer_tokens', 0):.1f} | {r['probe_tokens']:.1f} | {r.get('latent_steps', 0):.1f} "
                     f"| {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


# Sixteen distinct colours: the token table has 13 controls, so none repeats there.
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#e7969c", "#637939", "#7b4173", "#ad494a", "#3182bd")


def svg_plot(rows: list[dict], path: Path, width: int = 640, height: int = 420) -> None:
    """Accuracy vs mean think tokens, one polyline per control, as a self-contained SVG
    (no plotting dependency); a vertical bar marks ``accuracy_sd`` where a row has one."""
    controls = list(dict.fromkeys(r["control"] for r in rows))
    # The legend's column fits its longest label (~6.5 px a character at 11 px).
    left, right, top, bottom = 56, max(190, 40 + round(6.5 * max(map(len, controls)))), 20, 44
    width += right - 190
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
    for i, control in enumerate(controls):
        color = _COLORS[i % len(_COLORS)]
        pts = sorted((r["think_tokens"], r["accuracy"]) for r in rows if r["control"] == control)
        xy = " ".join(f"{X(t):.1f},{Y(a):.1f}" for t, a in pts)
        out.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out += [f'<circle cx="{X(t):.1f}" cy="{Y(a):.1f}" r="3" fill="{color}"/>' for t, a in pts]
        for r in rows:  # the spread over seeds (standard deviation), where there is one
            if r["control"] == control and r.get("accuracy_sd"):
                t, a, d = r["think_tokens"], r["accuracy"], r["accuracy_sd"]
                out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{Y(min(1, a + d)):.1f}" '
                           f'y2="{Y(max(0, a - d)):.1f}" stroke="{color}"/>')
        ly = top + 14 * i + 6
        out.append(f'<rect x="{width - right + 12}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{width - right + 26}" y="{ly + 1}">{control}</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out))


def device_line() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_line(models: Path) -> str:
    log_path = Path(models) / "train_log.json"
    if not log_path.exists():
        return "?"
    c = json.loads(log_path.read_text())
    b, v, bud = c["base"], c["valve"], c.get("budget")
    cpu = lambda d: d.get("cpu_seconds", d["seconds"])
    line = (f"Llama {c['config']['layers']}x{c['config']['hidden']}, {b['params'] / 1e6:.2f}M params, "
            f"{c['config']['steps']} steps ({cpu(b):.0f} CPU s); valve LoRA r=8, "
            f"{c['config']['valve_steps']} steps ({cpu(v):.0f} CPU s)")
    if bud:
        line += f"; budget model: the base + {c['config']['budget_steps']} steps ({cpu(bud):.0f} CPU s)"
    return line


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m cotrt.testbed.evaluate")
    ap.add_argument("--models", required=True, type=Path, help="the --out of cotrt.testbed.train")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--split", default="test", choices=("test", "validation"))
    ap.add_argument("--seed", type=int, default=0, help="the split seed (training excludes seed 0's splits)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="markdown table (an .svg plot beside it)")
    ap.add_argument("--only", nargs="*", default=None, help="controls to run (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); "
                    "1 because a ~1M-parameter model's decode steps are Python-bound, see train.py")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = evaluate(args.models, args.n, args.seed, args.max_batch, only=args.only, split=args.split)
    meta = {"n": args.n, "seed": args.seed, "split": args.split, "max_batch": args.max_batch,
            "device": device_line(), "model": model_line(args.models)}
    text = markdown(rows, meta)
    print(text)
    (args.models / f"eval_{args.split}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.out:
        args.out.write_text(text)
        svg_plot(rows, args.out.with_suffix(".svg"))
    return rows


if __name__ == "__main__":
    main()
