"""The latent testbed end to end: train Coconut and CCoT (and their base) from 3 seeds if
needed, evaluate every seed through cotrt on its 200 held-out problems, and report means and
spreads over seeds.

    python bench/bench_testbed_latent.py [--seeds 0 1 2] [--n 200] [--retrain]

Models go to ``$COTRT_CACHE/testbed_latent/seed{S}`` (default ``~/.cache/cotrt/...``),
trained by ``python -m cotrt.testbed.latent_train`` when absent. Writes
bench/testbed_latent.md (table), bench/testbed_latent.svg (accuracy vs think positions) and
bench/testbed_latent.json (every seed's rows).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cotrt.models import cache_dir  # noqa: E402
from cotrt.testbed import hops, latent_eval, latent_train  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = ("base", "coconut", "ccot")


def trained(d: Path) -> bool:
    return ((d / "train_log.json").exists() and (d / "ccot" / "cotrt_bundle.json").exists()
            and (d / "coconut" / f"stage_{hops.MAX_HOPS}.pt").exists())


def aggregate(per_seed: dict) -> list[dict]:
    """One row per (control, setting): mean and sample std over seeds of each figure, and the
    binomial standard error of the mean accuracy on n problems."""
    keys = list(dict.fromkeys((r["control"], r["setting"]) for rows in per_seed.values() for r in rows))
    out = []
    for control, setting in keys:
        rs = [r for rows in per_seed.values() for r in rows if (r["control"], r["setting"]) == (control, setting)]
        row = {"control": control, "setting": setting, "seeds": len(rs), "n": rs[0]["n"]}
        for f in ("accuracy", "think_tokens", "latent_steps", "think_positions", "answer_tokens", "wall_s"):
            v = [r[f] for r in rs]
            row[f] = statistics.fmean(v)
            row[f + "_sd"] = statistics.stdev(v) if len(v) > 1 else 0.0
            row[f + "_all"] = v
        p = row["accuracy"]
        row["binom_se"] = math.sqrt(p * (1 - p) / row["n"])
        out.append(row)
    return out


def markdown(agg: list[dict], meta: dict) -> str:
    cot = next(r for r in agg if r["control"] == "CoT")
    nocot = next(r for r in agg if r["control"] == "no-CoT")
    lines = [
        "# Latent testbed: Coconut and CCoT trained here, through cotrt",
        "",
        (f"Task: cotrt/testbed/hops.py (apply 3-5 of 4 fixed permutations of 16 nodes in turn, ops written "
         f"with hop-tagged tokens; CoT: one step a hop, 6 tokens, the last 2, then `</think>`; chance 1/16). "
         f"{meta['n']} held-out test problems per seed, seeds {meta['seeds']}; greedy, batch {meta['max_batch']}; "
         f"{meta['device']}; torch {torch.__version__}."),
        f"Models: {meta['model']}.",
        ("Figures: mean ± sample std over the training seeds (per-seed values in brackets for accuracy); "
         "binomial SE: sqrt(p(1-p)/n) of the mean accuracy on one seed's n problems. Think tokens: tokens "
         "the model chose while thinking (its own `</think>` included); latent steps: continuous thoughts; "
         "think positions: their sum, the cost compared with plain CoT."),
        "",
        "| method | setting | accuracy | per seed | binom. SE | think tokens | latent steps | think positions "
        "| vs CoT | answer tokens | wall s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in agg:
        ratio = r["think_positions"] / cot["think_positions"] if cot["think_positions"] else float("nan")
        per = ", ".join(f"{a:.3f}" for a in r["accuracy_all"])
        lines.append(
            f"| {r['control']} | {r['setting']} | {r['accuracy']:.3f} ± {r['accuracy_sd']:.3f} | {per} "
            f"| {r['binom_se']:.3f} | {r['think_tokens']:.1f} ± {r['think_tokens_sd']:.1f} "
            f"| {r['latent_steps']:.2f} ± {r['latent_steps_sd']:.2f} | {r['think_positions']:.1f} | {ratio:.0%} "
            f"| {r['answer_tokens']:.1f} | {r['wall_s']:.1f} ± {r['wall_s_sd']:.1f} |")
    lines += ["", "Acceptance (issue 18): accuracy >= no-CoT + 0.15 at <= 25% of plain CoT's think positions.", ""]
    for r in agg:
        if r["control"] not in ("Coconut", "CCoT"):
            continue
        gain = r["accuracy"] - nocot["accuracy"]
        ratio = r["think_positions"] / cot["think_positions"]
        ok = gain >= 0.15 and ratio <= 0.25
        lines.append(f"- {r['control']} {r['setting']}: {gain:+.3f} vs no-CoT, {ratio:.0%} of CoT's think "
                     f"positions: {'met' if ok else 'not met'}")
    return "\n".join(lines) + "\n"


_COLORS = {"CoT": "#1f77b4", "no-CoT": "#7f7f7f", "Coconut": "#ff7f0e", "CCoT": "#2ca02c"}


def svg(agg: list[dict], path: Path, width: int = 640, height: int = 420) -> None:
    """Accuracy (mean, with ±1 sd bars over seeds) vs mean think positions; Coconut's stages
    as one curve, labelled by stage."""
    left, right, top, bottom = 56, 150, 20, 44
    xmax = max(r["think_positions"] for r in agg) * 1.1 + 1
    X = lambda v: left + (width - left - right) * v / xmax
    Y = lambda a: top + (height - top - bottom) * (1 - a)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
         'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        o.append(f'<line x1="{left}" x2="{width - right}" y1="{Y(a):.1f}" y2="{Y(a):.1f}" stroke="#ddd"/>'
                 f'<text x="{left - 6}" y="{Y(a) + 4:.1f}" text-anchor="end">{a:g}</text>')
    for v in range(0, int(xmax) + 1, 5):
        o.append(f'<text x="{X(v):.1f}" y="{height - bottom + 16}" text-anchor="middle">{v}</text>')
    o.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">mean think positions '
             '(think tokens + latent steps)</text>'
             f'<text x="14" y="{(top + height - bottom) / 2}" transform="rotate(-90 14 {(top + height - bottom) / 2})" '
             'text-anchor="middle">accuracy (held-out)</text>')
    for i, control in enumerate(dict.fromkeys(r["control"] for r in agg)):
        color = _COLORS.get(control, "#9467bd")
        rs = sorted((r for r in agg if r["control"] == control), key=lambda r: r["think_positions"])
        if len(rs) > 1:
            pts = " ".join(f"{X(r['think_positions']):.1f},{Y(r['accuracy']):.1f}" for r in rs)
            o.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for r in rs:
            x, y = X(r["think_positions"]), Y(r["accuracy"])
            lo, hi = Y(r["accuracy"] - r["accuracy_sd"]), Y(r["accuracy"] + r["accuracy_sd"])
            o.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="{color}"/>'
                     f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
            if control == "Coconut":
                o.append(f'<text x="{x + 4:.1f}" y="{y - 5:.1f}" fill="{color}" font-size="9">'
                         f'{r["setting"].split(" (")[0]}</text>')
        ly = top + 16 * i + 6
        o.append(f'<rect x="{width - right + 12}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                 f'<text x="{width - right + 26}" y="{ly + 1}">{control}</text>')
    o.append("</svg>")
    path.write_text("\n".join(o) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=cache_dir() / "testbed_latent")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "testbed_latent.md")
    args = ap.parse_args(argv)
    per_seed, train_logs = {}, {}
    for seed in args.seeds:
        d = args.root / f"seed{seed}"
        if args.retrain or not trained(d):
            latent_train.main(["--out", str(d), "--seed", str(seed)])
        train_logs[seed] = json.loads((d / "train_log.json").read_text())
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        per_seed[seed] = latent_eval.evaluate(d, hops.held_out(seed, args.n), args.max_batch)
        print(f"seed {seed}: evaluated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    agg = aggregate(per_seed)
    lg = train_logs[args.seeds[0]]
    cfg = lg["config"]
    cpu = lambda part: [sum(tl[part]["cpu_seconds"].values()) if isinstance(tl[part]["cpu_seconds"], dict)
                        else tl[part]["cpu_seconds"] for tl in train_logs.values()]
    model = (f"Llama {cfg['layers']}x{cfg['hidden']} ({lg['base']['params'] / 1e6:.2f}M params), base "
             f"{cfg['base_steps']} steps x {cfg['batch']} ({statistics.fmean(cpu('base')):.0f} CPU-s); Coconut c={cfg['c']}, "
             f"stages 0-{hops.MAX_HOPS} x {cfg['stage_steps']} steps (last {cfg['final_stage_steps']}) "
             f"({statistics.fmean(cpu('coconut')):.0f} CPU-s); CCoT {latent_eval.feedback_label(cfg['feedback'])} feedback, LoRA "
             f"r={cfg['lora_r']}, curriculum stages 0-{hops.MAX_HOPS} x {cfg['ccot_stage_steps']} steps (last "
             f"{cfg['ccot_final_steps']}) ({statistics.fmean(cpu('ccot')):.0f} CPU-s); "
             "CPU seconds: mean over seeds, one thread")
    meta = {"n": args.n, "seeds": args.seeds, "max_batch": args.max_batch, "model": model,
            "device": f"CPU ({platform.processor() or platform.machine()}, 1 thread)"}
    text = markdown(agg, meta)
    print(text)
    args.out.write_text(text)
    svg(agg, args.out.with_suffix(".svg"))
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "per_seed": per_seed, "aggregate": agg,
                                                         "train_cpu_seconds": {p: cpu(p) for p in PARTS}}, indent=1))
    return {"aggregate": agg, "per_seed": per_seed}


if __name__ == "__main__":
    main()
