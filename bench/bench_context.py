"""Per-step decode time against context length and batch: cotrt vs HF ``generate``, one run.

    python bench/bench_context.py [--contexts 64,1024,3000,4096] [--batches 1,4,8] [--new 32]
                                  [--repeats 3] [--svg bench/context.svg]

For each (context C, batch B): B prompts of exactly C tokens (no padding on either side),
greedy, EOS ignored, --new tokens. Both sides time every decode step the same way, from one
step's end to the next (HF: a LogitsProcessor stamps each step; cotrt: each
``engine.step()``), and report the median interval over the second half of the steps
(prefill and the first steps excluded on both sides). Rounds interleave HF and cotrt;
each cell is the median over rounds of those medians, [p20, p80] over rounds.

Batch 1 rows also give the share of the read-bandwidth limit: bytes a step must read
(every weight once, plus the K/V cache of C tokens) over the step time, against the
bandwidth of a plain all-threads read of the same weights. That read runs in every round
next to both sides and the limit is the best rate seen over the whole run (a single
probe at the start moved by a third between runs on the shared 2-core machine, and the
share with it); the table is printed once the run ends, each cell's line before.

The SVG plots decode tokens/s (B / step time) against context for each batch and side.
Runtime on a quiet 2-core machine: ~10 min for the default grid (prefill of 8 x 4096 tokens
dominates); each cell's line is printed as it completes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from _harness import header, interleave, plain_hf, quantiles, timed  # noqa: E402
from cotrt.models import load_model  # noqa: E402


def prompts_of(tok, C, B):
    base = tok.encode("Let us think about the numbers carefully, one step at a time, and check each one. " * (C // 8 + 8))
    return [base[i:i + C] for i in range(B)]  # B different prompts of exactly C tokens


def hf_steps(model, prompts, new, pad):
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    with torch.inference_mode(), plain_hf(model):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([Stamp()]))
    return stamps


def cotrt_steps(rt, prompts, new):
    params = cotrt.Params(max_new_tokens=new, ignore_eos=True)
    for p in prompts:
        rt.engine.add(p, params)
    stamps = []
    while rt.engine.has_unfinished():
        rt.engine.step()
        stamps.append(time.perf_counter())
    return stamps


def step_time(stamps):
    """Median interval over the second half of the steps."""
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(d[len(d) // 2:])


def read_weights(params):
    """One all-threads read (torch.sum) of every parameter."""
    with torch.inference_mode():
        for p in params:
            p.sum()


def write_svg(path, rows, contexts):
    """rows: (C, B, hf_tps, co_tps). Log-x line plot, hand-written SVG (no matplotlib)."""
    import math

    W, H, L, R, T, Bm = 640, 400, 70, 150, 30, 50
    xs = sorted(set(contexts))
    ymax = max(max(r[2], r[3]) for r in rows) * 1.1
    lx = [math.log(c) for c in xs]

    def px(c):
        return L + (math.log(c) - lx[0]) / max(lx[-1] - lx[0], 1e-9) * (W - L - R)

    def py(v):
        return H - Bm - v / ymax * (H - T - Bm)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H - Bm}" x2="{W - R}" y2="{H - Bm}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - Bm}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">context (tokens, log scale)</text>',
           f'<text x="16" y="{(T + H - Bm) / 2}" transform="rotate(-90 16 {(T + H - Bm) / 2})" '
           'text-anchor="middle">decode tokens/s</text>']
    for c in xs:
        out.append(f'<text x="{px(c):.1f}" y="{H - Bm + 16}" text-anchor="middle">{c}</text>')
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<text x="{L - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        out.append(f'<line x1="{L}" y1="{py(v):.1f}" x2="{W - R}" y2="{py(v):.1f}" stroke="#ddd"/>')
    colors = {1: "#1f77b4", 4: "#2ca02c", 8: "#d62728"}
    legend_y = T + 10
    for B in sorted({r[1] for r in rows}):
        pts = sorted((r[0], r[2], r[3]) for r in rows if r[1] == B)
        col = colors.get(B, "#555")
        for k, dash, label in ((2, "", "cotrt"), (1, ' stroke-dasharray="5,4"', "HF")):
            points = " ".join(f"{px(q[0]):.1f},{py(q[k]):.1f}" for q in pts)
            out.append(f'<polyline points="{points}" fill="none" stroke="{col}" stroke-width="2"{dash}/>')
            out.append(f'<line x1="{W - R + 10}" y1="{legend_y}" x2="{W - R + 35}" y2="{legend_y}" '
                       f'stroke="{col}" stroke-width="2"{dash}/>')
            out.append(f'<text x="{W - R + 40}" y="{legend_y + 4}">{label}, batch {B}</text>')
            legend_y += 18
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="64,1024,3000,4096")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--svg", default="")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for both sides (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    model, tok = load_model("default", quiet=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rt = cotrt.wrap(model, tok, max_batch=max(batches), max_len=max(contexts) + args.new + 8)
    params = list(model.parameters())
    wbytes = sum(p.numel() * p.element_size() for p in params)
    reads = [timed(lambda: read_weights(params)) for _ in range(args.repeats + 1)]
    cfg = model.config
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * next(model.parameters()).element_size()
    rows, cells = [], []
    for C in contexts:
        for B in batches:
            prompts = prompts_of(tok, C, B)
            res = {"hf": [], "co": [], "bw": []}
            # repeats + 1 rounds: the first warms this shape up on both sides and is dropped.
            interleave({"hf": lambda: res["hf"].append(step_time(hf_steps(model, prompts, args.new, pad))),
                        "co": lambda: res["co"].append(step_time(cotrt_steps(rt, prompts, args.new))),
                        "bw": lambda: res["bw"].append(timed(lambda: read_weights(params)))},
                       args.repeats + 1, warmup=0)
            reads += res["bw"]
            hf, co = res["hf"][1:], res["co"][1:]
            cells.append((C, B, quantiles(hf), quantiles(co)))
            rows.append((C, B, B / quantiles(hf)[0], B / quantiles(co)[0]))
            print(f"# done: context {C}, batch {B}: HF {quantiles(hf)[0] * 1e3:.1f} ms, cotrt {quantiles(co)[0] * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
    gbps = wbytes / min(reads) / 1e9
    print(header(model, f"{args.new} new tokens, median [p20, p80] over {args.repeats} interleaved rounds; "
                        f"read bandwidth {gbps:.1f} GB/s (all-threads sum over the {wbytes / 1e6:.0f} MB of weights, "
                        f"best of {len(reads)} reads spread over the run; median {wbytes / statistics.median(reads) / 1e9:.1f})"),
          flush=True)
    print("| context | batch | HF ms/step | cotrt ms/step | cotrt / HF speed | HF tok/s | cotrt tok/s "
          "| cotrt % of read-bandwidth limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for C, B, (mh, lh, hh), (mc, lc, hc) in cells:
        share = ""
        if B == 1:
            need = wbytes + C * kv_per_token  # bytes one step must read (tied head counted once)
            share = f"{need / mc / 1e9 / gbps * 100:.0f}%"
        print(f"| {C} | {B} | {mh * 1e3:.1f} [{lh * 1e3:.1f}, {hh * 1e3:.1f}] | {mc * 1e3:.1f} "
              f"[{lc * 1e3:.1f}, {hc * 1e3:.1f}] | {mh / mc:.2f}x | {B / mh:.1f} | {B / mc:.1f} | {share} |",
              flush=True)
    if args.svg:
        write_svg(args.svg, rows, contexts)
        print(f"# plot: {args.svg}")


if __name__ == "__main__":
    main()
