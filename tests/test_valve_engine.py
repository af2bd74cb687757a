"""Valves in the engine: per-request alpha in one batch, switching alpha mid-request."""
from __future__ import annotations

import copy

import pytest
import torch

import cotrt
from _parity import hf_greedy
from cotrt.testing import tiny_model

peft = pytest.importorskip("peft")
from _peft import make_adapter, set_peft_alpha  # noqa: E402

ALPHAS = [0.0, 0.5, 1.0, 1.7]


@pytest.fixture(scope="module")
def setup(smol_tokenizer, tmp_path_factory):
    base = tiny_model("llama", len(smol_tokenizer), seed=41)
    d = tmp_path_factory.mktemp("valves")
    short = make_adapter(base, d / "short", seed=1, std=0.5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    other = make_adapter(base, d / "other", seed=2, std=0.5, r=4, lora_alpha=4, use_rslora=True, target_modules="all-linear")
    model = copy.deepcopy(base)
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=4, max_len=128)
    assert rt.load_valve(str(d / "short"), name="short") == 0
    assert rt.load_valve(str(d / "other"), name="other") == 1
    return rt, short, other, d


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (6, 11, 4, 9, 7)]


def test_mixed_alphas_in_one_batch_match_peft(setup):
    rt, short, other, _ = setup
    prompts = _prompts()
    specs = [("short", 0.0), ("short", 0.5), ("short", 1.0), ("short", 1.7), ("other", 1.0)]
    params = [cotrt.Params(max_new_tokens=12, ignore_eos=True, valve={n: a}) for n, a in specs]
    outs = rt.generate(prompts, params)  # 5 requests, 4 slots: mixed alphas and adapters per batch
    for p, (name, alpha), o in zip(prompts, specs, outs):
        pm = short if name == "short" else other
        set_peft_alpha(pm, alpha)
        assert o.token_ids == hf_greedy(pm, p, 12, eos=None), (name, alpha)
        alone = rt.generate([p], cotrt.Params(max_new_tokens=12, ignore_eos=True, valve={name: alpha}))[0]
        assert alone.token_ids == o.token_ids
    base_out = rt.generate([prompts[0]], cotrt.Params(max_new_tokens=12, ignore_eos=True))[0]
    assert base_out.token_ids == outs[0].token_ids  # alpha 0 is the base model
    assert outs[3].token_ids != outs[0].token_ids  # and the valve does something


def test_set_valve_mid_request(setup):
    rt, short, *_ = setup
    eng = rt.engine
    p = _prompts()[1]
    full = rt.generate([p], cotrt.Params(max_new_tokens=14, ignore_eos=True, valve={"short": 1.7}))[0].token_ids
    base = rt.generate([p], cotrt.Params(max_new_tokens=14, ignore_eos=True))[0].token_ids
    rid = eng.add(p, cotrt.Params(max_new_tokens=14, ignore_eos=True))
    toks = []
    while eng.has_unfinished():
        for ev in eng.step():
            toks += ev.token_ids
        if len(toks) == 5:
            eng.set_valve(rid, {"short": 1.7})
    assert toks[:5] == base[:5] and toks != base and toks != full
    # The switch is exactly a request whose earlier tokens ran without the valve: compare
    # with a policy doing the same through SetValve.

    class Switch(cotrt.Policy):
        every = 1
        on_boundary = False

        def on_step(self, view):
            return cotrt.SetValve({"short": 1.7}) if view.generated == 5 else None

    pol = rt.generate([p], cotrt.Params(max_new_tokens=14, ignore_eos=True, think_budget=100, exit=Switch()))[0]
    assert pol.token_ids == toks


def test_valve_errors_leave_everything_unchanged(setup, tmp_path):
    rt, short, other, d = setup
    with pytest.raises(ValueError, match="unknown valve 'nope'"):
        rt.engine.add([5, 6], cotrt.Params(valve={"nope": 1.0}))
    with pytest.raises(ValueError, match="one valve"):
        cotrt.Params(valve={"short": 1.0, "other": 1.0})
    with pytest.raises(ValueError, match="valve"):
        cotrt.Params(valve={"short": float("inf")})
    # An adapter for another model's shapes: refused, nothing loaded, engine still serves.
    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    make_adapter(narrow, tmp_path / "bad", seed=3, r=4, target_modules=["q_proj"])
    names = list(rt.valves.names)
    with pytest.raises(ValueError, match="q_proj"):
        rt.load_valve(str(tmp_path / "bad"), name="bad")
    assert list(rt.valves.names) == names
    out = rt.generate([[5, 6, 7]], cotrt.Params(max_new_tokens=3, ignore_eos=True, valve={"short": 1.0}))[0]
    assert len(out.token_ids) == 3
    with pytest.raises(ValueError, match="set_valve"):
        rt.engine.set_valve(12345, {"short": 1.0})


def test_valve_schedule_raises_alpha_as_the_budget_runs_out(setup):
    from cotrt.control.policies import ValveSchedule

    rt, short, *_ = setup
    seen = []
    real = rt.engine._set_valves

    def spy(b, rows, n):
        seen.append([r.valve.get("short") if r is not None else None for r in rows])
        return real(b, rows, n)

    rt.engine._set_valves = spy
    try:
        sched = ValveSchedule("short", budget=20, start=0.0, end=1.5, every=4, min_change=0.0)
        o = rt.generate([_prompts()[2]], cotrt.Params(max_new_tokens=30, ignore_eos=True, think_budget=40,
                                                     exit=sched))[0]
    finally:
        del rt.engine._set_valves
    alphas = [a[0] for a in seen if a and a[0] is not None]
    assert alphas == sorted(alphas) and alphas[-1] == pytest.approx(1.5) and alphas[0] < 0.5
    assert len(set(alphas)) >= 4 and len(o.token_ids) == 30
