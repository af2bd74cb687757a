"""Built-in exit policies: decision logic on scripted probe results, then end to end."""
from __future__ import annotations

import math

import pytest
import torch

import cotrt
from cotrt.control.policies import DEER, EAT, Dynasor, NoWait, StepLimit, build_policy
from cotrt.control.policy import Exit, Probe, ProbeResult, RowView
from cotrt.testing import tiny_model


def view(cue=None, steps=0, last_is_cue=True, phase="think"):
    return RowView(request_id=0, phase=phase, think_tokens=10, steps=steps, generated=10,
                   boundary=cue is not None, cue=cue, last_token_is_cue=last_is_cue,
                   text=lambda: "", step_text=lambda: "")


def result(text, probs, stopped="stop", entropy=1.0):
    return ProbeResult(position=0, token_ids=list(range(len(probs))), text=text, max_probs=probs,
                       entropy=entropy, stopped=stopped)


# -- decision logic on scripted probe results ------------------------------------------------

def test_deer_probes_at_transitions_and_exits_only_when_confident():
    deer = DEER(threshold=0.9)
    assert deer.on_step(view(cue="\n\n")) is None
    probe = deer.on_step(view(cue="Wait"))
    assert isinstance(probe, Probe) and probe.text == deer.inducer and probe.before_last
    assert probe.max_tokens == 20 and probe.until is not None
    assert not probe.until("\\frac{1}{2}") and probe.until("{\\frac{1}{2}}")  # braces counted
    assert not deer.on_step(view(cue="Wait", last_is_cue=False)).before_last
    # The first token ("{") is skipped: its low probability does not matter.
    assert isinstance(deer.on_probe(view(), result("{42}", [0.1, 0.95, 0.97])), Exit)
    assert deer.on_probe(view(), result("{42}", [0.99, 0.80, 0.97])) is None  # mean 0.885
    assert deer.on_probe(view(), result("{42", [0.1, 0.99, 0.99], stopped="length")) is None  # box open


@pytest.mark.parametrize("how,probs,exits", [
    ("mean", [0.0, 0.99, 0.85], True),   # mean 0.92
    ("geo", [0.0, 0.99, 0.85], True),    # 0.917
    ("min", [0.0, 0.99, 0.85], False),   # 0.85
    ("geo", [0.0, 1.0, 0.80], False),    # 0.894, while the mean is 0.90
    ("mean", [0.0, 1.0, 0.80], True),
])
def test_deer_confidence_aggregates(how, probs, exits):
    deer = DEER(threshold=0.9, confidence=how)
    r = result("{7}", probs)
    expected = {"mean": sum(probs[1:]) / 2, "min": min(probs[1:]),
                "geo": math.exp(sum(math.log(p) for p in probs[1:]) / 2)}[how]
    assert r.confidence(how) == pytest.approx(expected)
    assert (expected >= 0.9) == exits
    assert isinstance(deer.on_probe(view(), r), Exit) == exits


def test_deer_max_probes_and_qwen3_variant():
    deer = DEER(max_probes=2)
    assert deer.on_step(view(cue="Wait")) and deer.on_step(view(cue="Wait"))
    assert deer.on_step(view(cue="Wait")) is None
    q3 = DEER(profile="qwen3")
    assert q3.require_end and q3.on_step(view(cue="Wait")).stop == ("</think>",)


def test_dynasor_needs_k_agreeing_certain_answers():
    dyn = Dynasor(every=16, k=3)
    assert isinstance(dyn.on_step(view()), Probe) and not dyn.on_boundary
    assert dyn.on_probe(view(), result("12}", [0.5, 0.5])) is None
    assert dyn.on_probe(view(), result("12.0}", [0.5, 0.5])) is None
    act = dyn.on_probe(view(), result("12}", [0.5, 0.5]))
    assert isinstance(act, Exit) and act.finish and "12" in act.inject and act.inject.endswith("}\n\\]\n")
    # A hesitation word (whole word) makes an answer uncertain; a disagreement resets.
    dyn = Dynasor(k=2, ending="regenerate")
    assert dyn.on_probe(view(), result("5}", [1.0])) is None
    assert dyn.on_probe(view(), result("5, wait}", [1.0])) is None
    assert dyn.on_probe(view(), result("5}", [1.0])) is None  # last two: uncertain, 5
    act = dyn.on_probe(view(), result("5}", [1.0]))
    assert isinstance(act, Exit) and not act.finish
    dyn = Dynasor(k=2)
    dyn.on_probe(view(), result("5}", [1.0]))
    assert dyn.on_probe(view(), result("6}", [1.0])) is None
    # Hesitation words match whole words only.
    assert dyn.profile.hesitates("no, 5") and not dyn.profile.hesitates("nothing, 5")


def test_eat_exits_when_entropy_settles():
    eat = EAT(alpha=0.5, threshold=0.01, min_probes=3)
    probe = eat.on_step(view())
    assert probe.max_tokens == 0 and "</think>" in probe.text
    decisions = [eat.on_probe(view(), result("", [], entropy=h)) for h in (3.0, 1.0, 2.5, 0.5)]
    assert all(d is None for d in decisions)  # still moving
    settled = [eat.on_probe(view(), result("", [], entropy=0.5)) for _ in range(12)]
    first_exit = next(i for i, d in enumerate(settled) if d is not None)
    assert first_exit > 0 and isinstance(settled[first_exit], Exit)
    assert eat.var < 0.01


def test_nowait_bans_reflection_tokens_while_thinking(think_tokenizer):
    nw = NoWait()
    ids = nw.banned_tokens("think", think_tokenizer)
    wait_id = think_tokenizer.encode(" Wait", add_special_tokens=False)
    assert len(wait_id) == 1 and wait_id[0] in ids
    assert nw.banned_tokens("answer", think_tokenizer) == []


def test_step_limit_and_build_policy():
    assert StepLimit(2).on_step(view(cue="\n\n", steps=1)) is None
    assert isinstance(StepLimit(2).on_step(view(cue="\n\n", steps=2)), Exit)
    assert isinstance(build_policy({"name": "deer", "threshold": 0.8}), DEER)
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy({"name": "nope"})
    with pytest.raises(ValueError, match="bad settings"):
        build_policy({"name": "eat", "bogus": 1})
    with pytest.raises(ValueError, match="threshold"):
        build_policy({"name": "deer", "threshold": 2})
    p = cotrt.Params(exit=[{"name": "nowait"}, {"name": "eat", "every": 8}])
    assert [type(x).__name__ for x in p.exit] == ["NoWait", "EAT"]


# -- end to end on a tiny model whose confidence the test controls ----------------------------

@pytest.fixture(scope="module")
def rt(think_tokenizer):
    model = tiny_model("qwen3", len(think_tokenizer), seed=31)
    return cotrt.wrap(model, think_tokenizer, max_batch=4, max_len=384)


def _scaled_logits(rt, monkeypatch, factor, boost=None):
    """Scale the model's logits (confidence up or down); ``boost`` makes one token win."""
    real = rt.runner.logits

    def logits(h):
        out = real(h) * factor
        if boost is not None:
            out[:, boost] = out.max(dim=-1).values + 5.0
        return out

    monkeypatch.setattr(rt.runner, "logits", logits)


def _probe_closes_after(monkeypatch, close_id, n):
    """Script the probes: from their n-th generated token on, the box closes."""
    from cotrt.control.exits import ExitControl

    real = ExitControl.consume

    def consume(self, row, logits):
        if self.probe.started and len(self.probe.tokens) >= n:
            logits = logits.clone()
            logits[close_id] = logits.max() + 50.0
        return real(self, row, logits)

    monkeypatch.setattr(ExitControl, "consume", consume)


def _prompt(tok):
    return tok.encode("Q: what is 6*7?\nA: <think>\n", add_special_tokens=False)


@pytest.mark.parametrize("factor,exits", [(40.0, True), (0.02, False)])
def test_deer_end_to_end(rt, think_tokenizer, monkeypatch, factor, exits):
    """Sharpened logits make every probe confident (DEER exits at the first transition);
    flattened ones never are (it probes at every transition and continues)."""
    tok = think_tokenizer
    wait = tok.encode(" Wait", add_special_tokens=False)[0]
    # Sharp: " Wait" wins every visible step (a transition each token); flat: it is biased.
    _scaled_logits(rt, monkeypatch, factor, boost=wait if factor > 1 else None)
    _probe_closes_after(monkeypatch, tok.encode("}", add_special_tokens=False)[0], n=2)
    p = cotrt.Params(max_new_tokens=40, temperature=1.0, seed=5, ignore_eos=True, logit_bias={wait: 100.0} if factor < 1 else {},
                     exit=DEER(threshold=0.9, max_tokens=6, inducer="\n**Final Answer**\n\\boxed{", require_end=False))
    o = rt.generate([_prompt(tok)], p)[0]
    probes = o.stats["probes"]
    assert probes, "no transition was probed"
    if exits:
        assert o.stats["think_end"] == "deer:confident" and probes[-1]["decision"] == "exit"
        assert o.stats["answer_tokens"] > 0
        # The probe replaced the transition word; exiting takes that word back.
        assert o.stats["rolled_back"] == 1
        end_at = o.token_ids.index(tok.convert_tokens_to_ids("</think>"))
        assert end_at == probes[-1]["position"] - 1
    else:
        assert all(p["decision"] == "continue" for p in probes)
        assert o.stats["think_end"] is None and o.stats["answer_tokens"] == 0
    assert o.stats["probe_tokens"] == sum(p["tokens"] for p in probes)


def test_eat_and_nowait_end_to_end(rt, think_tokenizer):
    tok = think_tokenizer
    nw = NoWait()
    banned = set(nw.banned_tokens("think", tok))
    bias = {i: 15.0 for i in list(banned)[:50]}
    o = rt.generate([_prompt(tok)], cotrt.Params(
        max_new_tokens=60, temperature=1.0, seed=9, ignore_eos=True, logit_bias=bias, think_budget=30,
        exit=[nw, EAT(every=5, threshold=1e9, min_probes=3)]))[0]
    think = o.token_ids[: o.stats["think_tokens"]]
    assert not banned & set(think)  # despite the strong bias, no reflection token while thinking
    assert o.stats["think_end"] == "eat:entropy_settled" and len(o.stats["probes"]) == 3
    assert all(p["tokens"] == 1 + len(tok.encode("\n</think>\n\n", add_special_tokens=False))
               for p in o.stats["probes"])
    answer = o.token_ids[o.stats["think_tokens"]:]
    assert banned & set(answer)  # the ban lifts once thinking is over
