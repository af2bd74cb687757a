"""Host cost of one engine step: everything but the model forward.

On a GPU with captured decode steps, the device runs a step in roughly the time it takes
to read the weights (~0.9 ms for a 1B model in bf16 on an H100), and the host work
around it (planning, input buffers, gathering logits, sampling launches, the automaton,
budgets, output events and streaming text) runs while the device waits for the next
step's inputs. This measures that host work on its own: the engine runs with
``decode_graph="static"`` and the static forward replaced by its cached outputs, on a
1-layer tiny Llama with SmolLM2's tokenizer (so argmax/sampling over a real 49152-token
vocabulary are included: on CPU they are compute, on a GPU a launch each).

    python3 bench/bench_step_host.py [--batches 1 8 32] [--steps 200] [--temperature 0]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import cotrt
    from cotrt.models import load_tokenizer
    from cotrt.testing import tiny_model

    tok = load_tokenizer("default", quiet=True)
    model = tiny_model("llama", len(tok), seed=0, num_hidden_layers=1)
    rt = cotrt.wrap(model, tok, max_batch=max(args.batches), max_len=args.steps * (args.repeats + 1) + 64,
                    decode_graph="static")
    eng, graphs = rt.engine, rt.engine.graphs
    forward, cached = graphs._forward, {}

    def stub(key):  # the model's outputs for this key, computed once
        if key not in cached:
            cached[key] = forward(key)
        return cached[key]

    graphs._forward = stub
    params = cotrt.Params(max_new_tokens=10**6, ignore_eos=True, temperature=args.temperature, seed=1)
    print(f"host time per engine step, forward stubbed; {torch.__version__}, 1 thread, "
          f"temperature {args.temperature}")
    print("| batch | us per step | us per row |")
    print("|---:|---:|---:|")
    for B in args.batches:
        ids = [eng.add([5 + i, 6, 7], params) for i in range(B)]
        for _ in range(3):
            eng.step()  # prefill, then warm decode steps
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            times.append((time.perf_counter() - t) / args.steps)
        for rid in ids:
            eng.abort(rid)
        eng.step()
        us = statistics.median(times) * 1e6
        print(f"| {B} | {us:.0f} | {us / B:.0f} |")


if __name__ == "__main__":
    main()
