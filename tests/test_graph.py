"""The static decode step (cotrt.graph) against the eager one.

CPU tier: ``decode_graph="static"`` runs exactly the step a CUDA graph captures (fixed
shapes per bucket, padding rows on the scratch page, attention by block table and per-row length,
logits of every row) without capturing it; every decoding path must give the same tokens
as the eager step (and as HF): six architectures (GQA, sliding windows, soft-capping),
seeded sampling, mid-run admission over several buckets, mixed valve alphas with
set_valve, latent rows with a layer tap, in-place probes. The eager step with attention by
block table (``decode_backend="by_table"``) too. GPU tier (marker ``gpu``): real capture and
replay against the eager step, alphas and lengths changed without recapture.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

import cotrt
from _parity import assert_greedy_match, hf_greedy
from cotrt.engine.graph import DecodeGraphs, buckets, resolve_mode
from cotrt.testing import ARCHS, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _prompts(seed, n, vocab, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _both(rt, run):
    """``run(rt)`` with the runtime's graphs on, then off: both results."""
    graphs = rt.engine.graphs
    assert graphs is not None
    with_graphs = run(rt)
    rt.engine.graphs = None
    try:
        eager = run(rt)
    finally:
        rt.engine.graphs = graphs
    return with_graphs, eager


def test_buckets_and_modes():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(20) == [1, 2, 4, 8, 12, 16, 20]
    assert resolve_mode("auto", torch.device("cpu")) == "off"
    assert resolve_mode("static", torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="decode_graph='cuda' needs"):
        resolve_mode("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="decode_graph must be one of"):
        resolve_mode("always", torch.device("cpu"))


def test_bad_decode_graph_is_refused(smol_tokenizer):
    model = tiny_model("llama", len(smol_tokenizer))
    with pytest.raises(ValueError, match="decode_graph"):
        cotrt.wrap(model, smol_tokenizer, max_len=64, decode_graph="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="decode_graph='cuda'"):
            cotrt.wrap(model, smol_tokenizer, max_len=64, decode_graph="cuda")
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=2, max_len=64)  # the model still wraps
    assert rt.engine.graphs is None  # auto on CPU: the eager step


@pytest.mark.parametrize("arch", ARCHS)
def test_static_step_matches_eager_and_hf(arch, smol_tokenizer):
    vocab = len(smol_tokenizer)
    model = tiny_model(arch, vocab, seed=2)
    prompts = _prompts(3, 7, vocab)  # some past the sliding windows (12)
    lengths = [24, 5, 17, 24, 9, 13, 20]
    # 7 requests on 5 slots: the running batch walks through buckets 1, 2, 4 and 5.
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=5, max_len=96, decode_graph="static")
    params = [cotrt.Params(max_new_tokens=n, ignore_eos=True) for n in lengths]
    static, eager = _both(rt, lambda rt: [o.token_ids for o in rt.generate(prompts, params)])
    assert static == eager
    assert rt.engine.graphs.stats["static_steps"] > 0
    if arch == "gemma2":
        # Logits soft-capped at 15 after an 8x head: near-ties everywhere, and HF's own
        # cached and uncached greedy runs disagree on these prompts. Eager vs HF for
        # Gemma2 is test_parity's; here static == eager above is the check.
        return
    for p, n, o in zip(prompts[:3], lengths, static):
        assert_greedy_match(model, p, o, hf_greedy(model, p, n, eos=None), label=arch)


def test_seeded_sampling_and_midrun_admission(smol_tokenizer):
    vocab = len(smol_tokenizer)
    model = tiny_model("qwen2", vocab, seed=4)
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=3, max_len=128, decode_graph="static")
    prompts = _prompts(5, 6, vocab, lo=2, hi=50)

    def run(rt):
        eng, ids, out = rt.engine, {}, {}
        pending = list(enumerate(prompts))
        while pending or eng.has_unfinished():
            if pending:  # one new request a step: prefill beside running decodes
                i, p = pending.pop(0)
                ids[eng.add(p, cotrt.Params(max_new_tokens=10 + 3 * i, temperature=0.9, top_p=0.9,
                                            seed=100 + i, ignore_eos=True))] = i
            for ev in eng.step():
                if ev.finished:
                    out[ids[ev.request_id]] = ev.output.token_ids
        return [out[i] for i in range(len(prompts))]

    static, eager = _both(rt, run)
    assert static == eager
    assert rt.engine.free_slots == [0, 1, 2]


@pytest.mark.parametrize("page_size", [4, 96])
def test_by_table_attention_in_the_eager_step(smol_tokenizer, page_size):
    vocab = len(smol_tokenizer)
    model = tiny_model("gemma2", vocab, seed=6)  # soft-capping and sliding windows
    prompts = _prompts(8, 5, vocab)
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=4, max_len=96, page_size=page_size)
    params = cotrt.Params(max_new_tokens=20, ignore_eos=True)
    rt.runner.decode_backend = "sdpa"  # views or gathers of the pages
    ref = [o.token_ids for o in rt.generate(prompts, params)]
    rt.runner.decode_backend = "by_table"  # the C++ kernel where it is built, else the decode_attention op
    assert [o.token_ids for o in rt.generate(prompts, params)] == ref
    import cotrt.ops.cpu_attention as ca

    if ca.HAS_CPU_ATTENTION:  # and the op's torch path, which CPUs without the kernel take
        monkey = pytest.MonkeyPatch()
        monkey.setattr(ca, "HAS_CPU_ATTENTION", False)
        try:
            assert [o.token_ids for o in rt.generate(prompts, params)] == ref
        finally:
            monkey.undo()


def test_valves_mixed_alphas_and_set_valve(smol_tokenizer, tmp_path):
    pytest.importorskip("peft")
    from _peft import make_adapter

    base = tiny_model("llama", len(smol_tokenizer), seed=41)
    make_adapter(base, tmp_path / "short", seed=1, std=0.5, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    make_adapter(base, tmp_path / "other", seed=2, std=0.5, r=4, lora_alpha=4, use_rslora=True,
                 target_modules="all-linear")
    rt = cotrt.wrap(copy.deepcopy(base), smol_tokenizer, max_batch=4, max_len=128, decode_graph="static")
    rt.load_valve(str(tmp_path / "short"), name="short")
    prompts = _prompts(9, 5, 4000)
    specs = [{"short": 0.0}, {"short": 0.5}, {"short": 1.7}, {"other": 1.0}, {}]

    def run(rt):
        outs = rt.generate(prompts, [cotrt.Params(max_new_tokens=12, ignore_eos=True, valve=v) for v in specs])
        eng = rt.engine
        rid = eng.add(prompts[1], cotrt.Params(max_new_tokens=12, ignore_eos=True))
        toks = None
        for step in range(40):
            if step == 4:
                eng.set_valve(rid, {"short": 1.7})  # a new alpha, same graph
            for ev in eng.step():
                if ev.finished:
                    toks = ev.output.token_ids
            if toks is not None:
                break
        return [o.token_ids for o in outs], toks

    # "other" is loaded after a run through the graphs: the valve generation moves.
    rt.generate(prompts[:2], cotrt.Params(max_new_tokens=3, valve={"short": 1.0}))
    rt.load_valve(str(tmp_path / "other"), name="other")
    (static, switched_s), (eager, switched_e) = _both(rt, run)
    assert static == eager and switched_s == switched_e
    assert static[2] != static[0]  # the valve does something
    assert rt.engine.graphs._valve_generation == rt.valves.generation


def test_latent_rows_with_a_layer_tap(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(["<|start-latent|>", "<|end-latent|>", "<|latent|>"], special_tokens=True)
    model = tiny_model("llama", len(tok), seed=51)
    rt = cotrt.wrap(model, tok, max_batch=4, max_len=128, decode_graph="static")
    prompts = [tok.encode(t, add_special_tokens=False) for t in ["Q: 3+4*2 = ?", "x=5, y=x+1; y?", "Hi", "Go"]]
    params = [cotrt.Params(max_new_tokens=12, ignore_eos=True, latent=cotrt.Latent(steps=4)),
              cotrt.Params(max_new_tokens=12, ignore_eos=True, latent=cotrt.Latent(steps=3, feedback=0)),
              cotrt.Params(max_new_tokens=9, ignore_eos=True),
              cotrt.Params(max_new_tokens=9, temperature=0.8, seed=3, ignore_eos=True)]

    def run(rt):
        outs = rt.generate(prompts, params)
        return [o.token_ids for o in outs], [torch.stack(o.latent_states) for o in outs[:2]]

    (static, states_s), (eager, states_e) = _both(rt, run)
    assert static == eager
    for a, b in zip(states_s, states_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_probes_through_the_static_step(think_tokenizer):
    from test_probes import ProbeEvery

    tok = think_tokenizer
    model = tiny_model("qwen3", len(tok), seed=21)
    rt = cotrt.wrap(model, tok, max_batch=3, max_len=256, decode_graph="static")
    nl2 = tok.encode("\n\n", add_special_tokens=False)[0]
    prompts = [tok.encode(t, add_special_tokens=False) for t in
               ["Q: 2+2?\nA: <think>\n", "Solve x+1=3.\n<think>\n", "Hi\n<think>", "Name a color. <think>\n"]]

    def run(rt):
        pols = [ProbeEvery(every=4) for _ in prompts]
        outs = rt.generate(prompts, [cotrt.Params(max_new_tokens=30, temperature=1.0, seed=7 + i, think_budget=20,
                                                  logit_bias={nl2: 9.0}, ignore_eos=True, exit=pol)
                                     for i, pol in enumerate(pols)])
        return [o.token_ids for o in outs], [o.stats["probes"] for o in outs]

    (static, probes_s), (eager, probes_e) = _both(rt, run)
    assert static == eager and probes_s == probes_e
    assert sum(map(len, probes_s)) > 0


def test_sampling_inside_the_step(think_tokenizer):
    """Greedy and plain temperature batches sample inside the static step (logit biases
    and the banned end marker scattered from buffers); top-p or too many biases leave it
    to the engine; the tokens equal the eager step's either way."""
    from cotrt.engine.graph import MAX_BIASES

    tok = think_tokenizer
    model = tiny_model("qwen3", len(tok), seed=8)
    rt = cotrt.wrap(model, tok, max_batch=3, max_len=128, decode_graph="static")
    graphs = rt.engine.graphs
    keys = []
    real_run = graphs.run
    graphs.run = lambda key, *a, **kw: keys.append(key) or real_run(key, *a, **kw)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ["Q: 2+2?\n<think>\n", "Hi <think>", "Go"]]
    nl2 = tok.encode("\n\n", add_special_tokens=False)[0]
    many = {5 + i: 0.5 for i in range(MAX_BIASES + 1)}
    cases = {
        "greedy": [cotrt.Params(max_new_tokens=20, think_budget=6, ignore_eos=True)] * 3,
        "plain": [cotrt.Params(max_new_tokens=20, temperature=0.9, seed=1, think_budget=6, ignore_eos=True),
                  cotrt.Params(max_new_tokens=20, logit_bias={nl2: 5.0}, ignore_eos=True),
                  cotrt.Params(max_new_tokens=20, temperature=1.2, seed=2, logit_bias={7: -3.0}, ignore_eos=True)],
        None: [cotrt.Params(max_new_tokens=20, temperature=0.9, top_p=0.8, seed=1, ignore_eos=True),
               cotrt.Params(max_new_tokens=20, logit_bias=many, ignore_eos=True),
               cotrt.Params(max_new_tokens=20, ignore_eos=True)],
    }
    for mode, params in cases.items():
        keys.clear()
        static, eager = _both(rt, lambda rt: [o.token_ids for o in rt.generate(prompts, params)])
        assert static == eager, mode
        assert keys and {k[-1] for k in keys if k[0] == 3} == {mode}, (mode, keys)  # all 3 rows decoding
    graphs.run = real_run


def test_graphs_drop_on_valve_change(smol_tokenizer):
    model = tiny_model("llama", len(smol_tokenizer))
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=2, max_len=32)
    g = DecodeGraphs(rt.runner, capture=False)
    g._entries[(1, False, False, ())] = object()
    g.sync_valves(0)
    assert g._entries
    g.sync_valves(1)
    assert not g._entries
    with pytest.raises(ValueError, match="embeds must be given"):
        g.run(g.key(1, False, True, ()), [[0]], [5], [0])
    with pytest.raises(ValueError, match="position 40 outside its 2 pages"):
        g.run(g.key(1, False, False, ()), [[0, 1]], [5], [40])
    with pytest.raises(ValueError, match="position 16 outside its 1 pages"):
        g.run(g.key(1, False, False, ()), [[0]], [5], [16])
    with pytest.raises(ValueError, match="exceed max_batch=2"):
        g.bucket(3)


# ------------------------------------------------------------------------------ GPU tier


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16),
                                        ("gemma2", torch.bfloat16)])
def test_captured_step_matches_eager(arch, dtype, byte_tokenizer):
    vocab = 512  # ids past the tokenizer's 260 are fine: they have no text
    model = tiny_model(arch, vocab, seed=2).to("cuda", dtype)
    prompts = _prompts(3, 7, vocab)
    rt = cotrt.wrap(model, byte_tokenizer, max_batch=5, max_len=128, decode_graph="cuda")
    params = [cotrt.Params(max_new_tokens=n, ignore_eos=True) for n in (24, 5, 17, 24, 9, 13, 20)]
    graphed, eager = _both(rt, lambda rt: [o.token_ids for o in rt.generate(prompts, params)])
    stats = rt.engine.graphs.stats
    assert not rt.engine.graphs._failed
    assert stats["captures"] >= 3 and stats["replays"] > stats["captures"]
    if dtype == torch.float32:
        assert graphed == eager
    else:  # bf16: the two attention kernels round differently; most rows still agree
        same = sum(a == b for a, b in zip(graphed, eager))
        assert same >= len(prompts) - 2, (graphed, eager)
    captures = stats["captures"]
    again = [o.token_ids for o in rt.generate(prompts, params)]
    assert again == graphed and stats["captures"] == captures  # replays only


@cuda
@pytest.mark.gpu
def test_captured_step_with_valves_and_latent_rows(byte_tokenizer, tmp_path):
    pytest.importorskip("peft")
    from _peft import make_adapter

    vocab = 512
    base = tiny_model("llama", vocab, seed=41)
    make_adapter(base, tmp_path / "short", seed=1, std=0.5, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    rt = cotrt.wrap(copy.deepcopy(base).cuda(), byte_tokenizer, max_batch=4, max_len=128, decode_graph="cuda")
    rt.load_valve(str(tmp_path / "short"), name="short")
    prompts = _prompts(9, 4, vocab)
    params = [cotrt.Params(max_new_tokens=12, ignore_eos=True, valve={"short": a}) for a in (0.0, 0.5, 1.0, 1.7)]
    params[0] = cotrt.Params(max_new_tokens=12, ignore_eos=True, latent=cotrt.Latent(steps=3, feedback=0))
    graphed, eager = _both(rt, lambda rt: [o.token_ids for o in rt.generate(prompts, params)])
    assert graphed == eager
    assert not rt.engine.graphs._failed
    captures = rt.engine.graphs.stats["captures"]
    params2 = [cotrt.Params(max_new_tokens=12, ignore_eos=True, valve={"short": a}) for a in (1.2, 0.3, 0.9, 0.1)]
    params2[0] = params[0]
    rt.generate(prompts, params2)
    assert rt.engine.graphs.stats["captures"] == captures  # new alphas: no recapture
