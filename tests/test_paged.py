"""The paged KV cache: the page pool, greedy parity at several page sizes, prefix sharing
(same step and across steps, and a failed producer), rollback freeing pages, preemption
with unchanged outputs, parallel samples and self-consistency, kv_usage, validation.

After every engine step of these tests, ``check_pages`` verifies the bookkeeping: each
running request holds exactly the pages its written positions need, refcounts equal the
holders, and every page is held, cached or free.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

import cotrt
from _parity import assert_greedy_match, hf_greedy
from cotrt.control.consistency import SelfConsistency, Vote
from cotrt.engine.kv import extent
from cotrt.model.pages import PagePool
from cotrt.output import Output
from cotrt.testing import tiny_model


def _prompts(seed: int, n: int, vocab: int, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def check_pages(eng) -> None:
    pool, ps = eng.kv.pool, eng.kv.page_size
    holders = Counter()
    for req in eng.running.values():
        assert len(req.pages) == -(-extent(req) // ps), (req, extent(req))
        holders.update(req.pages)
    assert all(pool.ref[p] == holders[p] for p in range(pool.num_pages)), "refcounts differ from the holders"
    u = eng.kv_usage()
    assert u["pages_used"] + u["pages_cached"] + u["pages_free"] == u["pages_total"]


def run_checked(rt, prompts, params) -> list:
    """``rt.generate`` done step by step with ``check_pages`` after each step."""
    eng = rt.engine
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [eng.add_samples(p, q) for p, q in zip(prompts, plist)]
    outs = drain(eng)
    assert eng.kv_usage()["pages_used"] == 0
    return [outs[i] for g in ids for i in g]


def drain(eng) -> dict:
    """Step until every request is done, checking the pages after each step; id -> Output."""
    outs = {}
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
        check_pages(eng)
    return outs


# ------------------------------------------------------------------------------- the pool

def test_pool_allocates_lowest_first_and_caches_keyed_pages():
    pool = PagePool(6, 4)
    assert [pool.alloc() for _ in range(3)] == [0, 1, 2]
    toks = list(range(12))
    assert pool.register("s", toks, [0, 1, 2], 0) == [0, 1, 2]
    pool.release(1)  # keyed: cached, not free
    assert pool.usage()["pages_cached"] == 1 and pool.available() == 4
    assert pool.lookup("s", toks, 3) == [0, 1, 2]
    assert pool.lookup("other salt", toks, 3) == []
    assert pool.lookup("s", [99] + toks[1:], 3) == []  # the first page differs: nothing after it matches
    assert pool.lookup("s", toks[:4] + [99] + toks[5:], 3) == [0]
    # Free pages go first, then the least recently cached page is evicted (its key too).
    assert [pool.alloc() for _ in range(3)] == [3, 4, 5]
    assert pool.alloc() == 1 and pool.lookup("s", toks, 3) == [0]
    assert pool.alloc() is None
    pool.retain(0)
    assert pool.ref[0] == 2 and pool.usage()["pages_shared"] == 1
    with pytest.raises(RuntimeError, match="released more often"):
        for _ in range(3):
            pool.release(0)


def test_pool_same_content_under_two_parents_is_two_keys():
    pool = PagePool(4, 2)
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    pool.register(None, [1, 2, 5, 6], [a, b], 0)
    pool.register(None, [3, 4, 5, 6], [c], 0)  # same second page tokens, other first page
    assert pool.lookup(None, [3, 4, 5, 6], 2) == [c]
    assert pool.lookup(None, [1, 2, 5, 6], 2) == [a, b]
    pool.unregister(a)
    assert pool.lookup(None, [1, 2, 5, 6], 2) == []


# ------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("arch,page_size", [("llama", 1), ("llama", 5), ("mistral", 4), ("gemma2", 16),
                                            ("qwen3", 7)])
def test_greedy_parity_at_page_sizes(arch, page_size, smol_tokenizer):
    """Ragged batches through pages of several sizes (1, sizes that divide nothing, pages
    crossing the sliding window) equal HF generate; a cache of half the slot memory."""
    vocab = len(smol_tokenizer)
    model = tiny_model(arch, vocab)
    prompts = _prompts(1, 5, vocab)
    refs = [hf_greedy(model, p, 20, eos=None) for p in prompts]
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=4, max_len=128, kv_tokens=256, page_size=page_size)
    outs = run_checked(rt, prompts, cotrt.Params(max_new_tokens=20, ignore_eos=True))
    for p, o, r in zip(prompts, outs, refs):
        assert_greedy_match(model, p, o.token_ids, r, label=f"{arch}/page {page_size}")


def test_slot_layout_is_page_size_max_len(smol_tokenizer):
    """page_size = max_len is the old slot cache: one page per request, read as views."""
    vocab = len(smol_tokenizer)
    model = tiny_model("llama", vocab)
    prompts = _prompts(2, 4, vocab)
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=4, max_len=64, page_size=64)
    assert rt.runner.num_pages == 4
    outs = run_checked(rt, prompts, cotrt.Params(max_new_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert_greedy_match(model, p, o.token_ids, hf_greedy(model, p, 12, eos=None), label="slot layout")


# ------------------------------------------------------------------------------- prefix sharing

@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    return tiny_model("llama", len(smol_tokenizer), seed=4)


def test_samples_of_one_prompt_store_it_once(llama, smol_tokenizer):
    """n samples admitted in one step: the first computes the prompt's full pages, the
    others share them (and run after it); each equals its seed run alone."""
    vocab = len(smol_tokenizer)
    prompt = _prompts(5, 1, vocab, lo=70, hi=71)[0]
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=4, max_len=128, page_size=8)
    params = cotrt.Params(n=4, max_new_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    eng = rt.engine
    ids = eng.add_samples(prompt, params)
    eng.step()  # all four admitted and prefilled
    u = eng.kv_usage()
    full = len(prompt) // 8  # 8 full pages; the 6-token tail and the first token are each sample's own
    assert u["pages_shared"] == full and u["pages_used"] == full + 4
    assert [eng.requests[i].cached for i in ids] == [0] + [full * 8] * 3
    assert eng.stats["cached_prompt_tokens"] == 3 * full * 8
    outs = drain(eng)
    alone = [rt.generate([prompt], cotrt.Params(max_new_tokens=10, temperature=1.0, seed=11 + i,
                                                ignore_eos=True))[0].token_ids for i in range(4)]
    assert [outs[i].token_ids for i in ids] == alone
    assert len(set(map(tuple, alone))) > 1  # the seeds differ


@pytest.mark.parametrize("length", [17, 16])
def test_samples_whose_feed_is_one_token_wait_for_the_pages(llama, smol_tokenizer, length):
    """A prompt of 2 pages + 1 token: the second sample's feed is its last token alone, and
    it must still run after the forward that computes the shared pages (not in the decode
    forward before it); a prompt of exactly 2 pages recomputes its last page."""
    vocab = len(smol_tokenizer)
    prompt = _prompts(12, 1, vocab, lo=length, hi=length + 1)[0]
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=4, max_len=64, page_size=8)
    params = cotrt.Params(n=3, max_new_tokens=5, temperature=1.0, seed=5, ignore_eos=True)
    outs = run_checked(rt, [prompt], params)
    assert [o.stats["cached_tokens"] for o in outs] == [0] + [(length - 1) // 8 * 8] * 2
    alone = [rt.generate([prompt], cotrt.Params(max_new_tokens=5, temperature=1.0, seed=5 + i,
                                                ignore_eos=True))[0].token_ids for i in range(3)]
    assert [o.token_ids for o in outs] == alone


def test_repeated_prompt_hits_the_cache(llama, smol_tokenizer):
    vocab = len(smol_tokenizer)
    prompt = _prompts(6, 1, vocab, lo=100, hi=101)[0]
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=2, max_len=160, page_size=16)
    params = cotrt.Params(max_new_tokens=8, ignore_eos=True)
    first = rt.generate([prompt], params)[0]
    assert first.stats["cached_tokens"] == 0 and rt.engine.kv_usage()["pages_cached"] == 6
    again = rt.generate([prompt], params)[0]
    assert again.stats["cached_tokens"] == 96  # 6 full pages; the last 4 tokens recomputed
    assert again.token_ids == first.token_ids
    # A prompt that extends it shares the same pages; one that differs in its first page
    # shares nothing; a valve would change the salt (tests/test_valve_engine.py).
    longer = rt.generate([prompt + [5, 6, 7]], params)[0]
    assert longer.stats["cached_tokens"] == 96
    other = rt.generate([[prompt[0] + 1] + prompt[1:]], params)[0]
    assert other.stats["cached_tokens"] == 0


def test_a_valve_keys_its_own_prefix(smol_tokenizer, tmp_path):
    """A prompt computed under a valve is cached apart from the base model's: a request
    with the same tokens and another valve (or none) recomputes it."""
    pytest.importorskip("peft")
    import copy

    from _peft import make_adapter

    base = tiny_model("llama", len(smol_tokenizer), seed=41)
    make_adapter(base, tmp_path / "short", seed=1, std=0.5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    rt = cotrt.wrap(copy.deepcopy(base), smol_tokenizer, max_batch=2, max_len=96, page_size=8)
    rt.load_valve(str(tmp_path / "short"), name="short")
    prompt = _prompts(13, 1, len(smol_tokenizer), lo=40, hi=41)[0]

    def run(valve):
        o = rt.generate([prompt], cotrt.Params(max_new_tokens=6, ignore_eos=True, valve=valve))[0]
        return o.stats["cached_tokens"], o.token_ids

    (c0, base_ids), (c1, valve_ids) = run({}), run({"short": 1.0})
    assert (c0, c1) == (0, 0) and base_ids != valve_ids
    assert run({"short": 0.5})[0] == 0 and run({"short": 1.0}) == (32, valve_ids) and run({}) == (32, base_ids)
    assert run({"short": 0.0}) == (32, base_ids)  # alpha 0 is the base model exactly


def test_failed_producer_requeues_its_dependents(llama, smol_tokenizer, monkeypatch):
    """A request sharing pages that another computes this step is requeued when that
    forward fails, then recomputes them itself: same tokens as alone."""
    vocab = len(smol_tokenizer)
    prompt = _prompts(8, 1, vocab, lo=40, hi=41)[0]
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=4, max_len=96, page_size=8)
    params = cotrt.Params(max_new_tokens=6, ignore_eos=True)
    alone = rt.generate([prompt + [9, 9]], params)[0].token_ids
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=4, max_len=96, page_size=8)
    eng = rt.engine
    a = eng.add(prompt, params)
    b = eng.add(prompt + [9, 9], params)
    real = eng._extend

    def extend(batch):
        if any(r.id == a for r in batch.rows):
            raise RuntimeError("boom")
        real(batch)

    monkeypatch.setattr(eng, "_extend", extend)
    events = eng.step()
    monkeypatch.setattr(eng, "_extend", real)
    assert [e.output.finish_reason for e in events if e.finished] == ["error"]
    assert eng.requests[b].slot == -1 and eng.requests[b].preemptions == 1  # requeued, not run
    outs = drain(eng)
    assert outs[b].token_ids == alone and outs[b].stats["cached_tokens"] == 0


# ------------------------------------------------------------------------------- preemption

def test_more_demand_than_pages_gives_the_same_tokens(llama, smol_tokenizer):
    """Six requests growing to ~100 tokens in a cache of 160 tokens: the newest are
    preempted and recomputed, every request finishes with the tokens it gives alone."""
    vocab = len(smol_tokenizer)
    prompts = _prompts(9, 6, vocab, lo=10, hi=30)
    params = [cotrt.Params(max_new_tokens=n, ignore_eos=True, temperature=t, seed=3)
              for n, t in zip([70, 60, 75, 50, 65, 72], [0.0, 1.0, 0.0, 0.7, 1.0, 0.0])]
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=6, max_len=112, kv_tokens=160, page_size=8)
    alone = [rt.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    outs = run_checked(rt, prompts, params)
    assert rt.engine.stats["preempted"] > 0
    assert sum(o.stats["preemptions"] for o in outs) == rt.engine.stats["preempted"]
    assert [o.token_ids for o in outs] == alone


def test_preempted_request_keeps_its_controls(think_tokenizer):
    """A think budget and streamed text survive preemption: the request resumes where it
    was (no second forced end, no repeated text)."""
    tok = think_tokenizer
    model = tiny_model("llama", len(tok), seed=5)
    prompts = [tok.encode(f"Q{i}: think.\n<think>\n", add_special_tokens=False) for i in range(4)]
    params = cotrt.Params(max_new_tokens=60, think_budget=20, ignore_eos=True)
    rt = cotrt.wrap(model, tok, max_batch=4, max_len=96, kv_tokens=128, page_size=8)
    alone = [rt.generate([p], params)[0] for p in prompts]
    eng = rt.engine
    ids = [eng.add(p, params) for p in prompts]
    texts, outs = {i: "" for i in ids}, {}
    while eng.has_unfinished():
        for ev in eng.step():
            texts[ev.request_id] += ev.text
            if ev.finished:
                outs[ev.request_id] = ev.output
        check_pages(eng)
    assert eng.stats["preempted"] > 0
    for i, a in zip(ids, alone):
        assert outs[i].token_ids == a.token_ids and texts[i] == a.text
        assert outs[i].stats["forced_tokens"] == a.stats["forced_tokens"]


class _ValveSwitch(cotrt.Policy):
    """Every 6 thinking tokens, the next valve of a cycle (none, 0.4, 1.0, ...)."""

    name = "valve-switch"
    every = 6
    cycle = ({}, {"v": 0.4}, {"v": 1.0})

    def __init__(self):
        self.k = 0

    def on_step(self, view):
        self.k += 1
        return cotrt.SetValve(self.cycle[self.k % 3])


def _record_preemptions(eng, monkeypatch) -> list:
    """The requests ``eng`` preempts, with whether each was probing and latent then."""
    seen, inner = [], eng._preempt

    def spy(req):
        seen.append((req.id, req.exits is not None and req.exits.probe is not None, req.latent is not None))
        inner(req)

    monkeypatch.setattr(eng, "_preempt", spy)
    return seen


def test_preemption_recomputes_each_position_under_its_valve(think_tokenizer, tmp_path, monkeypatch):
    """Valves switched mid-request (a policy's SetValve): the recompute of a preempted
    request runs each position under the valve it was first computed under, so its tokens
    equal the run alone."""
    pytest.importorskip("peft")
    import copy

    from _peft import make_adapter

    tok = think_tokenizer
    base = tiny_model("llama", len(tok), seed=7)
    make_adapter(base, tmp_path / "v", seed=3, std=0.5, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "up_proj"])
    rt = cotrt.wrap(copy.deepcopy(base), tok, max_batch=4, max_len=96, kv_tokens=128, page_size=8)
    rt.load_valve(str(tmp_path / "v"), name="v")
    prompts = [tok.encode(f"Q{i}: think.\n<think>\n", add_special_tokens=False) for i in range(4)]
    params = [cotrt.Params(max_new_tokens=58 + i, ignore_eos=True, valve={"v": 0.7}, exit=_ValveSwitch())
              for i in range(4)]
    alone = [rt.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    seen = _record_preemptions(rt.engine, monkeypatch)
    outs = run_checked(rt, prompts, params)
    assert seen, "nothing was preempted"
    assert [o.token_ids for o in outs] == alone


def test_preemption_restarts_a_probe_in_flight(think_tokenizer, monkeypatch):
    """A request preempted while its probe runs restarts the probe after its recompute:
    the same tokens and the same probe results as alone."""
    tok = think_tokenizer
    model = tiny_model("llama", len(tok), seed=8)
    prompts = [tok.encode(f"Q{i}: 2+{i}?\n<think>\n", add_special_tokens=False) for i in range(4)]
    params = cotrt.Params(max_new_tokens=56, ignore_eos=True, exit=_ProbeEvery())
    rt = cotrt.wrap(model, tok, max_batch=4, max_len=96, kv_tokens=136, page_size=8)
    alone = [rt.generate([p], params)[0] for p in prompts]
    seen = _record_preemptions(rt.engine, monkeypatch)
    outs = run_checked(rt, prompts, params)
    assert any(probing for _, probing, _ in seen), seen
    for o, a in zip(outs, alone):
        assert o.token_ids == a.token_ids
        key = lambda rec: (rec["position"], rec["text"], rec["tokens"], rec["decision"])  # noqa: E731
        assert list(map(key, o.stats["probes"])) == list(map(key, a.stats["probes"]))


def test_latent_requests_are_preempted_and_resume_exactly(latent_tok, tmp_path, monkeypatch):
    """Coconut rows and a CCoT row (layer feedback, END head, a valve during the latent
    phase and another after) preempted mid-phase and after it: the recompute feeds each
    latent step's vector again, under its valve; tokens and fed-back states equal the run
    alone."""
    pytest.importorskip("peft")
    import copy

    import torch
    from test_latent import ScriptedHead, _peft_valves

    tok = latent_tok
    base = tiny_model("llama", len(tok), seed=61)
    rt = cotrt.wrap(copy.deepcopy(base), tok, max_batch=4, max_len=80, kv_tokens=96, page_size=4)
    for name, path in _peft_valves(base, tmp_path):
        rt.load_valve(path, name=name)
    hidden = base.config.hidden_size

    def params():
        ccot = cotrt.Latent(end_head=ScriptedHead(hidden, 9), max_steps=12, feedback=0,
                            valve_during={"contemplate": 1.0}, valve_after={"answer": 1.0})
        return [cotrt.Params(max_new_tokens=40, ignore_eos=True),
                cotrt.Params(max_new_tokens=36, ignore_eos=True, latent=cotrt.Latent(steps=10)),
                cotrt.Params(max_new_tokens=30, ignore_eos=True, latent=ccot),
                cotrt.Params(max_new_tokens=34, ignore_eos=True, latent=cotrt.Latent(steps=14))]

    prompts = _prompts(21, 4, len(tok) - 3, lo=8, hi=14)
    alone = [rt.generate([p], q)[0] for p, q in zip(prompts, params())]
    seen = _record_preemptions(rt.engine, monkeypatch)
    outs = run_checked(rt, prompts, params())
    assert {rid for rid, _, latent in seen if latent}, seen
    for o, a in zip(outs, alone):
        assert o.token_ids == a.token_ids
        assert len(o.latent_states or []) == len(a.latent_states or [])
        for x, y in zip(o.latent_states or [], a.latent_states or []):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- rollback

class _ProbeEvery(cotrt.Policy):
    """Probe 6 tokens every 4 thinking tokens (before the last token: a rollback of one
    when it exits), never exit."""

    name = "probe-every"
    every = 4

    def on_step(self, view):
        return cotrt.Probe("\n</think>\nThe answer is", max_tokens=6, before_last=True)

    def on_probe(self, view, result):
        return None


def test_probes_and_rollback_free_pages(think_tokenizer):
    """A probe every 4 tokens writes past the row's length into pages it frees afterwards;
    min_think rolls back: the bookkeeping holds after every step, outputs equal pages of
    another size."""
    tok = think_tokenizer
    model = tiny_model("llama", len(tok), seed=6)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Q: 2+2?\n<think>\n", "Name a colour.\n<think>\n")]
    params = cotrt.Params(max_new_tokens=40, min_think=30, ignore_eos=True, exit=_ProbeEvery())
    outs = {}
    for ps in (4, 16):
        rt = cotrt.wrap(model, tok, max_batch=2, max_len=128, page_size=ps)
        outs[ps] = run_checked(rt, prompts, params)
        assert sum(o.stats["probe_tokens"] for o in outs[ps]) > 0
    assert [o.token_ids for o in outs[4]] == [o.token_ids for o in outs[16]]


# ------------------------------------------------------------------------------- samples and votes

def test_generate_returns_n_per_prompt_prompt_major(llama, smol_tokenizer):
    vocab = len(smol_tokenizer)
    prompts = _prompts(10, 2, vocab, lo=5, hi=20)
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=8, max_len=64)
    outs = rt.generate(prompts, cotrt.Params(n=3, max_new_tokens=6, temperature=1.0, seed=100))
    assert len(outs) == 6
    for j, p in enumerate(prompts):
        for i in range(3):
            o = outs[3 * j + i]
            assert o.prompt_token_ids == p
            solo = rt.generate([p], cotrt.Params(max_new_tokens=6, temperature=1.0, seed=100 + i))[0]
            assert o.token_ids == solo.token_ids


def _out(answer: str, reason: str = "stop", exit_reason: str = "eos") -> Output:
    return Output(0, [], [], answer, "", answer, reason, {"exit_reason": exit_reason})


def test_vote_counts_equivalent_answers_and_decides_at_quorum():
    v = Vote(SelfConsistency(), 5)
    assert v.quorum == 3
    assert not v.record(_out("so \\boxed{1/2}"))
    assert not v.record(_out("the answer is 0.5"))
    assert not v.record(_out("no answer here"))
    assert not v.record(_out("#### 7"))
    assert v.result["answer"] == "1/2" and v.result["votes"] == {"1/2": 2, "7": 1}
    assert v.record(_out("\\boxed{0.50}"))
    assert v.result["decided"] and v.result["finished"] == 5
    v.record(_out("", "abort", "consistency"))
    assert v.result["aborted"] == 1
    with pytest.raises(ValueError, match="quorum=4 exceeds n=3"):
        cotrt.Params(n=3, consistency={"quorum": 4})
    with pytest.raises(ValueError, match="consistency.methods"):
        SelfConsistency(methods=("nope",))


def test_self_consistency_aborts_the_losers(smol_tokenizer):
    """Samples that write "7" until a random EOS (answers "7", "77", ...): once two agree,
    the samples still running are aborted (their tokens never computed) and every sample
    reports the vote."""
    tok = smol_tokenizer
    model = tiny_model("llama", len(tok), seed=7)
    seven = tok.encode("7", add_special_tokens=False)
    assert len(seven) == 1
    rt = cotrt.wrap(model, tok, max_batch=8, max_len=96)
    params = cotrt.Params(n=8, max_new_tokens=40, temperature=1.0, seed=24,  # a seed where two agree early
                          logit_bias={seven[0]: 100.0, tok.eos_token_id: 99.5},
                          consistency=cotrt.SelfConsistency(quorum=2, methods=("last_number",), source="text"))
    outs = rt.generate([tok.encode("Count:", add_special_tokens=False)], params)
    vote = outs[0].stats["consistency"]
    assert all(o.stats["consistency"] is vote for o in outs)
    assert vote["decided"] and set(vote["answer"]) == {"7"} and vote["votes"][vote["answer"]] == 2
    assert vote["aborted"] >= 1 and vote["finished"] + vote["aborted"] == 8
    aborted = [o for o in outs if o.finish_reason == "abort"]
    assert len(aborted) == vote["aborted"] and all(o.stats["exit_reason"] == "consistency" for o in aborted)


# ------------------------------------------------------------------------------- validation

def test_bad_paging_arguments_are_named(llama, smol_tokenizer):
    for kwargs, msg in [({"page_size": 0}, "page_size"), ({"page_size": 2.0}, "page_size"),
                        ({"kv_tokens": 32}, "kv_tokens"), ({"kv_tokens": True}, "kv_tokens")]:
        with pytest.raises(ValueError, match=msg):
            cotrt.wrap(llama, smol_tokenizer, max_batch=2, max_len=64, **kwargs)
    rt = cotrt.wrap(llama, smol_tokenizer, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="n: Engine.add queues one"):
        rt.engine.add([5, 6], cotrt.Params(n=2))
    with pytest.raises(ValueError, match="n must be >= 1"):
        cotrt.Params(n=0)
    with pytest.raises(ValueError, match="voting samples exceed max_batch"):
        rt.engine.add_samples([5, 6], cotrt.Params(n=3, consistency={}))
    assert not rt.engine.has_unfinished()


# ------------------------------------------------------------------------------- SmolLM2

def test_smollm2_pages_hold_what_slots_could_not(smol_model):
    """The issue's acceptance on the embedded SmolLM2, kv_tokens=8192: 32 requests of ~60
    tokens run at once (slots of max_len 2048 would hold 4 in that memory); 8 samples of
    one 1000-token prompt hold it once plus their own tails; the prompt asked again finds
    >= 960 of its tokens cached."""
    model, tok = smol_model
    rt = cotrt.wrap(model, tok, max_batch=32, max_len=2048, kv_tokens=8192)
    eng = rt.engine
    assert eng.kv_usage()["pages_total"] == 512
    rng = random.Random(0)
    words = ["river", "seven", "blue", "proof", "moon", "lemma", "graph", "prime"]
    prompts = [tok.encode(f"Q{i}: " + " ".join(rng.choice(words) for _ in range(55)), add_special_tokens=False)
               for i in range(32)]
    assert all(55 <= len(p) <= 70 for p in prompts)
    ids = [eng.add(p, cotrt.Params(max_new_tokens=3, ignore_eos=True)) for p in prompts]
    eng.step()
    assert eng.num_running == 32 and eng.num_waiting == 0
    assert eng.kv_usage()["pages_used"] == sum(-(-len(p) // 16) for p in prompts)
    while eng.has_unfinished():
        eng.step()
        check_pages(eng)
    assert eng.kv_usage()["pages_used"] == 0

    long = tok.encode(" ".join(rng.choice(words) for _ in range(1200)), add_special_tokens=False)[:1000]
    assert len(long) == 1000
    ids = eng.add_samples(long, cotrt.Params(n=8, max_new_tokens=4, temperature=0.8, seed=1))
    eng.step()
    u = eng.kv_usage()
    shared = 1000 // 16  # 62 full pages; the 8-token tail page is each sample's own
    assert u["pages_shared"] == shared and u["pages_used"] == shared + 8 <= 1.5 * 63 + 8
    while eng.has_unfinished():
        eng.step()
        check_pages(eng)
    again = rt.generate([long], cotrt.Params(max_new_tokens=2))[0]
    assert again.stats["cached_tokens"] == 992 >= 960


class _ProbeExit(cotrt.Policy):
    """Probe every 5 tokens (before the last token: an exit takes that token back), exit at
    the second probe."""

    name = "probe-exit"
    every = 5

    def __init__(self):
        self.seen = 0

    def on_step(self, view):
        return cotrt.Probe("\n</think>\nThe answer is", max_tokens=4, before_last=True)

    def on_probe(self, view, result):
        self.seen += 1
        return cotrt.Exit() if self.seen == 2 else None


def test_repeated_calls_and_a_second_wrap_change_nothing(think_tokenizer):
    """The same probing, exiting batch run again on one runtime (its prompts now prefix
    hits), on a fresh runtime, and on the first runtime after a second one wrapped the same
    model: the same tokens each time."""
    tok = think_tokenizer
    model = tiny_model("llama", len(tok), seed=3)
    rng = random.Random(0)
    prompts = [tok.encode(f"Q{i}: " + " ".join(rng.choice(["a", "bee", "cat"]) for _ in range(rng.randrange(10, 40)))
                          + "\n<think>\n", add_special_tokens=False) for i in range(12)]
    params = cotrt.Params(max_new_tokens=40, temperature=0.7, seed=1, exit=_ProbeExit())
    rt = cotrt.wrap(model, tok, max_batch=8, max_len=96)
    first = rt.generate(prompts, params)
    assert all(o.stats["rolled_back"] >= 1 and o.stats["think_end"] for o in first)
    assert sum(o.stats["cached_tokens"] for o in first) == 0
    again = rt.generate(prompts, params)
    assert sum(o.stats["cached_tokens"] for o in again) > 0
    fresh = cotrt.wrap(model, tok, max_batch=8, max_len=96).generate(prompts, params)
    after = rt.generate(prompts, params)
    ref = [o.token_ids for o in first]
    assert [o.token_ids for o in again] == ref
    assert [o.token_ids for o in fresh] == ref
    assert [o.token_ids for o in after] == ref


def test_a_second_wrap_of_a_model_runs_the_cpu_kernels(smol_tokenizer, monkeypatch):
    """Both runtimes on one model decode through the CPU kernel (the second wrap finds its
    linears already swapped; it once fell back to F.linear, and benchmarks comparing two
    runtimes on one model compared the kernel with F.linear)."""
    import copy

    from cotrt.layers import cpu_linear as cl
    from cotrt.ops.cpu_linear import HAS_CPU_KERNEL

    if not HAS_CPU_KERNEL:
        pytest.skip("cotrt._cpu is not built")
    model = tiny_model("llama", len(smol_tokenizer), seed=2)
    runtimes = [cotrt.wrap(model, smol_tokenizer, max_batch=2, max_len=64, page_size=p) for p in (64, 8)]
    runtimes.append(cotrt.wrap(copy.deepcopy(model), smol_tokenizer, max_batch=2, max_len=64))  # a copy, swapped
    real, calls = cl._launch, []
    monkeypatch.setattr(cl, "_launch", lambda *a: calls.append(1) or real(*a))
    n_linears = len(runtimes[0].runner.fused["cpu_linear"])
    for rt in runtimes:
        assert len(rt.runner.fused["cpu_linear"]) == n_linears
        rt.runner.lean = None  # HF's modules: every linear a CpuLinear call
        calls.clear()
        rt.generate([[5, 6, 7]], cotrt.Params(max_new_tokens=4, ignore_eos=True))
        assert len(calls) >= 3 * n_linears  # every linear of each decode step
