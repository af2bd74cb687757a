"""cpu_linear (the CPU decode-linear kernel) against the alternatives, in one run.

    python bench/bench_cpu_linear.py [--dtypes float32,bfloat16] [--rows 1,4,8] [--repeats 15] [--threads N]
                                     [--sweep shapes,calls,step,model|both] [--model default]

Providers, on SmolLM2-135M's weight shapes (N x K; the same x, W, bias for all):
  F.linear        torch's linear (MKL; at M=1 a GEMV that runs on one core here)
  mkldnn          oneDNN's linear with the weight prepacked once (torch.utils.mkldnn)
  cpu_linear      cotrt.ops.cpu_linear's kernel (csrc/cpu_linear.cpp), called as the model's
                  modules call it (arguments checked once, not per call)
  valve           cpu_linear with a valve: r=16, one adapter, per-row alphas (0.5..1.7)
  kernel, kernel+valve
                  the same two calls repeated back to back inside C++ (``_cpu.linear_repeat``):
                  the kernel as the native decoder layer (cpu_layer.cpp) calls it, without
                  the ~10 us of Python a call from Python pays on both sides; the valve's
                  cost is the ratio of these two (the acceptance figure of issue 12)
  valve_lora      cotrt.ops.valve_lora's torch path (what a valve cost before): F.linear + 2 GEMMs
  read            torch.sum over W (all threads): the measured read-bandwidth floor

The calls section times the calls the native decoder layer makes (q/k/v as one pool job,
o, gate/up as one job, down, and the LM head), kernel against kernel+valve with a valve on
every linear of the call, inside C++ (``_cpu.linears_repeat``): one call back to back, so
its weights stay in L2/L3. The step section makes the same calls in a decode step's order
(SmolLM2's 30 layers, each with its own weights, then the LM head; ``_cpu.linears_sequence``),
so each call reads its weights from memory as in a real step: the valve's cost as a decode
step pays it.

The model sweep then runs every linear of the model once, in order, at M=1 (F.linear,
cpu_linear, read): a batch-1 decode step's weight traffic, weights cold as in a real step.

Each figure is the median [p20, p80] of --repeats interleaved samples, a sample being as
many back-to-back calls as fill ~5 ms; the three ratio columns are the median [p20, p80]
of the per-round ratios (the two sides run next to each other in every round, so the
machine's load, which moved single figures by 20% here, lands on both). GB/s counts W
(plus A and B for valve rows) once.
Runtime: ~4 min for both dtypes on a 2-core machine (the step section ~1 min a dtype at 101 rounds).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import batched, header, interleave, quantiles  # noqa: E402
from cotrt.ops import cpu_linear as _cl  # noqa: E402
from cotrt.ops.cpu_linear import _launch  # noqa: E402
from cotrt.ops.valve_lora import valve_lora  # noqa: E402

SHAPES = [("q_proj/o_proj", 576, 576), ("k_proj/v_proj", 192, 576), ("gate/up_proj", 1536, 576),
          ("down_proj", 576, 1536), ("lm_head", 49152, 576)]
R = 16
_MKLDNN_FAILED = set()


def providers(M, N, K, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if N != 49152 else None  # the LM head has no bias
    a = (torch.randn(1, R, K, generator=g) * K**-0.5).to(dtype)
    lb = (torch.randn(N, 1, R, generator=g) * R**-0.5).to(dtype).permute(1, 0, 2)
    alpha = torch.linspace(0.5, 1.7, M)
    lin = torch.nn.Linear(K, N, bias=b is not None).to(dtype)
    lin.weight.data = w
    if b is not None:
        lin.bias.data = b
    out = {
        "F.linear": lambda: F.linear(x, w, b),
        # Without the argument checks, as the model's modules call the kernel.
        "cpu_linear": lambda: _launch(x, w, b, None, None, None, None, None, 0),
        "valve": lambda: _launch(x, w, b, a, lb, alpha, None, None, 0),
        "valve_lora": lambda: valve_lora(x, w, a, lb, alpha, None, b),
        "read": lambda: w.sum(),
    }
    for name, lora in (("kernel", (None, None, None)), ("kernel+valve", (a, lb, alpha))):
        y, xf, args = _cl._kernel_args(x, w, b, *lora, None, None, 0)
        out[name] = repeated([args], [y, xf])
    try:
        from torch.utils import mkldnn

        packed = mkldnn.to_mkldnn(lin, dtype)
        packed(x)
        out["mkldnn"] = lambda: packed(x)
    except Exception as e:  # noqa: BLE001 - a torch build without oneDNN, or no bf16 support
        if dtype not in _MKLDNN_FAILED:  # once per dtype, its last line (the reason)
            _MKLDNN_FAILED.add(dtype)
            print(f"# mkldnn unavailable for {dtype}: {str(e).strip().splitlines()[-1]}")
    bytes_w = N * K * w.element_size()
    bytes_lora = (R * K + N * R) * w.element_size()
    return out, bytes_w, bytes_lora


# The decoder layer's calls (csrc/cpu_layer.cpp): q/k/v as one pool job, o, gate/up as one
# job, down; then the LM head. Each group's weights as (N, K).
CALLS = [("q/k/v (one job)", [(576, 576), (192, 576), (192, 576)]), ("o_proj", [(576, 576)]),
         ("gate/up (one job)", [(1536, 576), (1536, 576)]), ("down_proj", [(576, 1536)]),
         ("lm_head", [(49152, 576)])]


class repeated:
    """Calls of the kernel repeated inside C++: calling it makes ``n`` of them (n fills
    ~5 ms, timed once up front), so it stands in for ``batched``'s ``(run, n)``. ``calls``
    are ``_kernel_args`` tuples: one is ``_cpu.linear_repeat``, several one pool job
    (``_cpu.linears_repeat``, as the decoder layer runs q/k/v and gate/up); ``keep`` holds
    the tensors they point into."""

    def __init__(self, calls, keep, target_s=0.005):
        self.calls, self.keep, self.n = calls, keep, 4
        self()
        t0 = time.perf_counter()
        self()
        self.n = max(4, int(4 * target_s / max(time.perf_counter() - t0, 1e-7)))

    def __call__(self):
        if len(self.calls) == 1:
            _cl._cpu.linear_repeat(*self.calls[0], self.n)
        else:
            _cl._cpu.linears_repeat(self.calls, self.n)


def job_pair(xs, group, alpha, g, dtype):
    """One of the decoder's calls as a pool job, twice over the same weights (drawn from
    ``g``): without a valve and with one on every linear (r=16, one adapter, per-row alphas
    ``alpha``). ``xs``: the input for each K. Returns (base args, valve args, tensors the
    args point into)."""
    base, valve, keep = [], [], []
    for N, K in group:
        w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if N != 49152 else None
        a = (torch.randn(1, R, K, generator=g) * K**-0.5).to(dtype)
        lb = (torch.randn(N, 1, R, generator=g) * R**-0.5).to(dtype).permute(1, 0, 2)
        y0, xf0, args0 = _cl._kernel_args(xs[K], w, b, None, None, None, None, None, 0)
        y1, xf1, args1 = _cl._kernel_args(xs[K], w, b, a, lb, alpha, None, None, 0)
        base.append(args0)
        valve.append(args1)
        keep += [w, b, a, lb, y0, xf0, y1, xf1]
    return base, valve, keep


def call_providers(M, group, dtype):
    """kernel / kernel+valve for one of the decoder's calls: its linears as one job, without
    and with a valve on every linear (r=16, one adapter, per-row alphas 0.5..1.7)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, group[0][1], generator=g).to(dtype)
    alpha = torch.linspace(0.5, 1.7, M)
    base, valve, keep = job_pair({group[0][1]: x}, group, alpha, g, dtype)
    keep += [x, alpha]
    return {"kernel": repeated(base, keep), "kernel+valve": repeated(valve, keep)}


def decoder_calls(args):
    """The valve's cost on the calls the native decoder layer makes (q/k/v and gate/up each
    one pool job of several linears) and on the LM head: kernel+valve / kernel per round."""
    print("\nThe decoder layer's calls (cpu_layer.cpp), each timed inside C++ (_cpu.linears_repeat),"
          f" a valve (r={R}) on every linear of the call")
    print("| dtype | call | M | kernel us | kernel+valve us | kernel+valve / kernel |")
    print("|---|---|---:|---:|---:|---:|")
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for name, group in CALLS:
            for M in map(int, args.rows.split(",")):
                fns = call_providers(M, group, dtype)
                times = interleave(fns, args.repeats, warmup=1)
                per = {k: [t / fns[k].n for t in ts] for k, ts in times.items()}
                (kb, _, _), (kv, _, _) = quantiles(per["kernel"]), quantiles(per["kernel+valve"])
                m, lo, hi = quantiles([a / b for a, b in zip(per["kernel+valve"], per["kernel"])])
                print(f"| {dt} | {name} | {M} | {kb * 1e6:.1f} | {kv * 1e6:.1f} | {m:.2f}x [{lo:.2f}, {hi:.2f}] |",
                      flush=True)


LAYERS = 30  # SmolLM2-135M's


def step_jobs(M, dtype, layers=LAYERS):
    """A decode step's linears in the decoder's order and jobs (CALLS for each of ``layers``
    layers, each layer its own weights, then the LM head), twice over the same weights:
    without a valve and with one on every linear (r=16, one adapter, per-row alphas
    0.5..1.7). Returns (base jobs, valve jobs, each job's call name, tensors to keep)."""
    g = torch.Generator().manual_seed(0)
    xs = {K: torch.randn(M, K, generator=g).to(dtype) for K in (576, 1536)}
    alpha = torch.linspace(0.5, 1.7, M)
    base, valve, names, keep = [], [], [], [alpha, *xs.values()]
    for name, group in [call for _ in range(layers) for call in CALLS[:-1]] + [CALLS[-1]]:
        jb, jv, kept = job_pair(xs, group, alpha, g, dtype)
        base.append(jb)
        valve.append(jv)
        names.append(name)
        keep += kept
    return base, valve, names, keep


def decode_order(args):
    """The valve's cost on the decoder's calls made in a decode step's order: every layer's
    own weights (SmolLM2's 30 layers, 430 MB fp32, then the LM head), so each call finds
    its weights evicted since its last run (the L3 here is 32 MB), as in a decode step; the
    calls section repeats one call back to back, which keeps its weights in L2/L3. Each
    round runs the step once without and once with the valves (the order alternating), and
    sums each call's time over the layers: kernel+valve / kernel per round."""
    print(f"\nThe decoder's calls in a decode step's order, {LAYERS} layers' own weights (cold, as in a"
          f" step), timed inside C++ (_cpu.linears_sequence), a valve (r={R}) on every linear")
    print("| dtype | call | M | kernel us | kernel+valve us | kernel+valve / kernel |")
    print("|---|---|---:|---:|---:|---:|")
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for M in map(int, args.rows.split(",")):
            base, valve, names, keep = step_jobs(M, dtype)
            runs = {"kernel": base, "kernel+valve": valve}
            for jobs in runs.values():  # warm-up: the pool, page faults
                _cl._cpu.linears_sequence(jobs, 1)
            per = {k: [] for k in runs}
            for i in range(args.repeats):
                for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                    per[k].append(_cl._cpu.linears_sequence(runs[k], 1))
            for name in dict.fromkeys(names):
                idx = [j for j, n in enumerate(names) if n == name]
                tot = {k: [sum(r[j] for j in idx) / len(idx) for r in rs] for k, rs in per.items()}
                (kb, _, _), (kv, _, _) = quantiles(tot["kernel"]), quantiles(tot["kernel+valve"])
                m, lo, hi = quantiles([a / b for a, b in zip(tot["kernel+valve"], tot["kernel"])])
                print(f"| {dt} | {name} | {M} | {kb * 1e6:.1f} | {kv * 1e6:.1f} | {m:.2f}x [{lo:.2f}, {hi:.2f}] |",
                      flush=True)
            del keep


def model_sweep(args):
    """Every linear of the model once, in the model's order, M=1: a decode step's weight
    traffic with cold weights (540 MB for SmolLM2 fp32; the per-shape rows above reuse one
    weight that stays in cache)."""
    from cotrt.models import load_model

    model, _ = load_model(args.model)
    ws = [m.weight.data for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() * w.element_size() for w in ws)
    xs = {(w.shape[1], w.dtype): torch.randn(1, w.shape[1]).to(w.dtype) for w in ws}
    sweeps = {
        "F.linear": lambda: [F.linear(xs[w.shape[1], w.dtype], w) for w in ws],
        "cpu_linear": lambda: [_launch(xs[w.shape[1], w.dtype], w, None, None, None, None, None, None, 0)
                               for w in ws],
        "read": lambda: [w.sum() for w in ws],
    }
    times = interleave(sweeps, args.repeats, warmup=1)
    print(f"\n{len(ws)} linears of the model, {total / 1e6:.0f} MB, M=1, in order (one decode step's weights)")
    print("| provider | ms [p20, p80] | GB/s | vs F.linear |")
    print("|---|---:|---:|---:|")
    base = quantiles(times["F.linear"])[0]
    for k, ts in times.items():
        m, lo, hi = quantiles(ts)
        print(f"| {k} | {m * 1e3:.1f} [{lo * 1e3:.1f}, {hi * 1e3:.1f}] | {total / m / 1e9:.1f} | {base / m:.2f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default", help="the model whose linears --sweep reads")
    ap.add_argument("--sweep", default="shapes,calls,step,model",
                    help="comma-separated sections: shapes (per weight shape), calls (the decoder "
                         "layer's calls, valve cost), step (those calls in a decode step's order, "
                         "weights cold), model (the whole-model sweep); 'both': shapes,model")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    order = ["F.linear", "mkldnn", "cpu_linear", "valve", "kernel", "kernel+valve", "valve_lora", "read"]
    print(header(note=f"median [p20, p80] of {args.repeats} interleaved samples"))
    sweeps = {"both": {"shapes", "model"}}.get(args.sweep, set(args.sweep.split(",")))
    if not sweeps or sweeps - {"shapes", "calls", "step", "model"}:
        ap.error(f"--sweep: sections are shapes, calls, step, model (or both), got {args.sweep!r}")
    if "shapes" in sweeps:
        shapes(args, order)
    with torch.inference_mode():
        if "calls" in sweeps:
            decoder_calls(args)
        if "step" in sweeps:
            decode_order(args)
        if "model" in sweeps:
            model_sweep(args)


def shapes(args, order):
    print("| dtype | weight (N x K) | M | " + " | ".join(f"{p} us (GB/s)" for p in order)
          + " | F.linear / cpu_linear | valve / cpu_linear | kernel+valve / kernel |")
    print("|---|---|---:|" + "---:|" * (len(order) + 3))
    with torch.inference_mode():
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            for name, N, K in SHAPES:
                for M in map(int, args.rows.split(",")):
                    fns, bw, bl = providers(M, N, K, dtype)
                    runs = {k: (f, f.n) if isinstance(f, repeated) else batched(f) for k, f in fns.items()}
                    times = interleave({k: r for k, (r, _) in runs.items()}, args.repeats, warmup=1)
                    per = {k: [t / runs[k][1] for t in ts] for k, ts in times.items()}
                    cells = []
                    for p in order:
                        if p not in per:
                            cells.append("n/a")
                            continue
                        m, lo, hi = quantiles(per[p])
                        moved = bw + (bl if p in ("valve", "kernel+valve", "valve_lora") else 0)
                        cells.append(f"{m * 1e6:.0f} [{lo * 1e6:.0f}, {hi * 1e6:.0f}] ({moved / m / 1e9:.1f})")
                    # Ratios round by round (both calls of a pair adjacent in time, so load that
                    # comes and goes lands on both), then their median [p20, p80].
                    ratio = {k: quantiles([a / b for a, b in zip(per[k], per[base])])
                             for k, base in (("F.linear", "cpu_linear"), ("valve", "cpu_linear"),
                                             ("kernel+valve", "kernel"))}
                    print(f"| {dt} | {name} {N}x{K} | {M} | " + " | ".join(cells)
                          + "".join(f" | {m:.2f}x [{lo:.2f}, {hi:.2f}]" for m, lo, hi in ratio.values()) + " |",
                          flush=True)


if __name__ == "__main__":
    main()
