"""One rank of tests/test_tp.py's torchrun launch (not collected: no test_ prefix).

    torchrun --nproc-per-node 2 tests/_tp_worker.py MODELS_DIR OUT_DIR PORT

Three phases, one launch (each launch costs two processes' imports):

1. checks: every rank loads each tiny model in MODELS_DIR twice, with ``tp_plan="auto"``
   (sharded over the ranks) and whole (the single-process reference, run locally on each
   rank: no collective); each check runs the same requests through both and records both
   sides' tokens (and what else it compares) in OUT_DIR/rank<r>.json, from which the test
   asserts TP == single and rank 0 == rank 1;
2. serve: ``cotrt serve --model MODELS_DIR/llama --tp 2 --port PORT`` through the CLI's own
   entry point (what ``torchrun -m cotrt serve`` runs): rank 0 serves until the test
   sends it SIGINT, rank 1 follows until rank 0 releases it;
3. lockstep: rank 0 drives ``cotrt.parallel.lockstep`` while rank 1 follows (an abort and a
   valve change replayed), then rank 1 exits mid-generation and rank 0 must raise
   TPGroupError at once (a clear error, not a hang).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import cotrt
import cotrt.parallel
from cotrt.control.policies import DEER
from cotrt.latent import Latent

MODELS, OUT, PORT = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
TIMEOUT = 20.0
group = cotrt.parallel.init(tp=2, timeout=TIMEOUT)
RANK = group.rank
results: dict = {"checks": {}, "times": {}}


def load(arch, tp):
    return cotrt.load_model(str(MODELS / arch), quiet=True, tp_plan="auto" if tp else None)


def outs(rt, prompts, params):
    return rt.generate(prompts, params)


def record(name, tp_outs, ref_outs, extra=None):
    results["checks"][name] = {
        "tp": [o.token_ids for o in tp_outs], "ref": [o.token_ids for o in ref_outs],
        "tp_stats": [_stable_stats(o.stats) for o in tp_outs],
        "ref_stats": [_stable_stats(o.stats) for o in ref_outs], **(extra or {})}


def _stable_stats(s):
    keep = ("think_tokens", "answer_tokens", "forced_tokens", "probe_tokens", "think_end", "exit_reason",
            "rolled_back", "latent_steps")
    out = {k: s.get(k) for k in keep}
    out["probes"] = [{k: p.get(k) for k in ("position", "tokens", "decision", "answer")} for p in s.get("probes", [])]
    return out


def prompts_for(tok):
    think = tok.encode("Q: what is 6*7?\nA: <think>\n", add_special_tokens=False)
    return ["Once upon a time", "The capital of France is", [5, 17, 33, 90, 101, 7, 250, 200]], think


def check_arch(arch):
    t0 = time.monotonic()
    model, tok = load(arch, tp=True)
    ref_model, _ = load(arch, tp=False)
    rt = cotrt.wrap(model, tok, max_batch=4, max_len=96)
    ref = cotrt.wrap(ref_model, tok, max_batch=4, max_len=96)
    results["kv_heads"] = {**results.get("kv_heads", {}), arch: [rt.runner.cache.keys_[0].shape[2],
                                                               ref.runner.cache.keys_[0].shape[2]]}
    results.setdefault("cpu_linear", {})[arch] = len(rt.runner.fused.get("cpu_linear", []))
    prompts, think = prompts_for(tok)

    greedy = cotrt.Params(max_new_tokens=12, temperature=0, ignore_eos=True)
    record(f"{arch}/greedy", outs(rt, prompts, greedy), outs(ref, prompts, greedy))
    sampled = [cotrt.Params(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    record(f"{arch}/seeded", outs(rt, prompts, sampled), outs(ref, prompts, sampled))
    # No seed: each rank's engine draws one; the ranks must draw the same (rank 0 vs 1).
    unseeded = rt.generate(prompts, cotrt.Params(max_new_tokens=8, temperature=1.0, ignore_eos=True))
    results["checks"][f"{arch}/unseeded"] = {"tp": [o.token_ids for o in unseeded]}

    end = tok.convert_tokens_to_ids("</think>")  # the model may not end thinking itself: the budget does
    budget = cotrt.Params(max_new_tokens=16, think_budget=5, temperature=1.0, seed=4, ignore_eos=True,
                          logit_bias={end: -100.0})
    record(f"{arch}/think_budget", outs(rt, [think], budget), outs(ref, [think], budget))

    # Transitions at the letter "e" (a byte model says "Wait" too rarely): probes, rolled back.
    deer = [cotrt.Params(max_new_tokens=24, temperature=1.0, seed=s, ignore_eos=True,
                         exit=DEER(threshold=0.05, max_tokens=4, cues=("e",), inducer="\n**Final Answer**\n\\boxed{",
                                   require_end=False)) for s in (5, 6)]
    record(f"{arch}/deer", outs(rt, [think, think], deer), outs(ref, [think, think], deer))

    rt.load_valve(MODELS / f"{arch}-lora", name="v")
    ref.load_valve(MODELS / f"{arch}-lora", name="v")
    results.setdefault("valve_modules", {})[arch] = sorted({type(m).__name__ for m in rt.model.modules()
                                                            if "Valve" in type(m).__name__})
    valve = [cotrt.Params(max_new_tokens=12, temperature=0, ignore_eos=True, valve={"v": a}) for a in (1.0, 0.5, 0.0)]
    record(f"{arch}/valve", outs(rt, prompts, valve), outs(ref, prompts, valve))
    results["times"][arch] = time.monotonic() - t0
    return rt, ref, tok


def check_latent(rt, ref, tok):
    t0 = time.monotonic()
    p = tok.encode("Q: 3 + 4 * 2 = ?", add_special_tokens=False)
    for name, spec in (("final_norm", Latent(steps=3)), ("layer0", Latent(steps=3, feedback=0))):
        params = cotrt.Params(max_new_tokens=8, temperature=0, ignore_eos=True, latent=spec)
        a, b = outs(rt, [p, p[:5]], params), outs(ref, [p, p[:5]], params)
        states = [torch.stack(o.latent_states) for o in a]
        ref_states = [torch.stack(o.latent_states) for o in b]
        err = max(float((s - r).abs().max()) for s, r in zip(states, ref_states))
        sha = hashlib.sha256(b"".join(s.float().numpy().tobytes() for s in states)).hexdigest()
        record(f"latent/{name}", a, b, {"state_err": err, "state_sha": sha})
    results["times"]["latent"] = time.monotonic() - t0


def check_phi3_valve():
    """Phi-3's plan: qkv_proj / gate_up_proj colwise_gather_output, o_proj / down_proj
    rowwise_split_input; a valve on each follows it."""
    rt = cotrt.wrap(*load("phi3", tp=True), max_batch=4, max_len=64)
    ref = cotrt.wrap(*load("phi3", tp=False), max_batch=4, max_len=64)
    for r in (rt, ref):
        r.load_valve(MODELS / "phi3-lora", name="v")
    results.setdefault("valve_modules", {})["phi3"] = sorted({m.style for m in rt.model.modules()
                                                              if hasattr(m, "style")})
    prompts, _ = prompts_for(rt.tokenizer)
    valve = [cotrt.Params(max_new_tokens=8, temperature=0, ignore_eos=True, valve={"v": a}) for a in (1.0, 0.5, 0.0)]
    record("phi3/valve", outs(rt, prompts, valve), outs(ref, prompts, valve))


def check_fused():
    """fuse=True (RMSNorm and rotary as one kernel each; Triton's interpreter on CPU) on
    the sharded model: the same greedy tokens as the unfused sharded run."""
    t0 = time.monotonic()
    model, tok = load("llama", tp=True)
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=64, fuse=True)
    plain_model, _ = load("llama", tp=True)
    plain = cotrt.wrap(plain_model, tok, max_batch=2, max_len=64, fuse=False)
    prompts, _ = prompts_for(tok)
    p = cotrt.Params(max_new_tokens=6, temperature=0, ignore_eos=True)
    record("llama/fused", outs(rt, prompts[:2], p), outs(plain, prompts[:2], p),
           {"fused": {k: (v if isinstance(v, (int, str)) else len(v)) for k, v in rt.runner.fused.items()}})
    results["times"]["fused"] = time.monotonic() - t0


def check_lockstep(rt, ref, tok):
    """Rank 0 drives (lockstep), rank 1 follows; then rank 1 dies mid-generation."""
    prompts, think = prompts_for(tok)
    params = [cotrt.Params(max_new_tokens=10, temperature=1.0, seed=s, ignore_eos=True, valve={"v": 1.0})
              for s in (7, 8, 9)]
    if RANK == 0:
        eng = cotrt.parallel.lockstep(rt, group)
        a = rt.generate(prompts, params)
        record("lockstep", a, outs(ref, prompts, params))
        # An abort and a valve change replayed on rank 1 (the digest checks it follows).
        r1 = eng.add(think, cotrt.Params(max_new_tokens=30, temperature=0, ignore_eos=True, valve={"v": 1.0}))
        r2 = eng.add(prompts[0], cotrt.Params(max_new_tokens=30, temperature=1.0, ignore_eos=True))
        for i in range(4):
            eng.step()
        eng.set_valve(r1, {"v": 0.25})
        eng.abort(r2)
        while eng.has_unfinished():
            eng.step()
        results["lockstep_steps"] = eng._steps
        # Rank 1 exits after its next two steps: rank 0 must fail fast with TPGroupError.
        t0 = time.monotonic()
        try:
            rt.generate(prompts, cotrt.Params(max_new_tokens=40, temperature=0, ignore_eos=True))
            results["death"] = {"raised": None}
        except cotrt.parallel.TPGroupError as e:
            results["death"] = {"raised": str(e), "seconds": time.monotonic() - t0}
        results["after_death"] = repr(_try(lambda: eng.add("x", cotrt.Params(max_new_tokens=2))))
    else:
        results["follow_returned"] = cotrt.parallel.follow(rt, group)  # never: it exits in the death phase


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return e


def write():
    (OUT / f"rank{RANK}.json").write_text(json.dumps(results, default=str))


t_start = time.monotonic()
for arch in ("qwen3", "mistral"):
    check_arch(arch)
rt, ref, tok = check_arch("llama")
check_latent(rt, ref, tok)
check_phi3_valve()
check_fused()
results["times"]["checks"] = time.monotonic() - t_start
write()  # (the test reads the checks while the server runs)


def serve_phase():
    from cotrt.cli import main

    t0 = time.monotonic()
    try:
        status = main(["serve", "--model", str(MODELS / "llama"), "--tp", "2", "--port", PORT, "--max-batch", "4",
                       "--max-len", "128", "--tp-timeout", str(TIMEOUT), "--log-level", "warning"])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT that stopped it, after its shutdown
        status = "interrupted"
    results["serve"] = {"status": status, "seconds": time.monotonic() - t0}


serve_phase()
if RANK == 1:
    # Rank 1 exits (status 0, so torchrun leaves rank 0 running) two steps into the death
    # phase: the lockstep phase replays 5 adds, the death phase's generate 3 more.
    eng1 = rt.engine
    real_step, real_add = eng1.step, eng1.add_samples  # every replayed add is an add_samples
    state = {"adds": 0, "armed_at": None, "steps": 0}

    def add(*a, **k):
        state["adds"] += 1
        if state["adds"] == 6:
            state["armed_at"] = state["steps"]
        return real_add(*a, **k)

    def step():
        state["steps"] += 1
        if state["armed_at"] is not None and state["steps"] > state["armed_at"] + 2:
            results["died_at_step"] = state["steps"]
            results["times"]["total"] = time.monotonic() - t_start
            write()
            os._exit(0)
        return real_step()
    eng1.add_samples, eng1.step = add, step
check_lockstep(rt, ref, tok)
results["times"]["total"] = time.monotonic() - t_start
write()
