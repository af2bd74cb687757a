"""DEER(variant=...) against DEER's released scripts (github.com/iie-ycx/DEER), restated
step by step below: vanilla_deer.py ("hf") and vllm-deer.py ("vllm"); and cotrt's own rule
(the default) where they differ."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cotrt
from cotrt.testing import tiny_model
from cotrt.control.policies import DEER, build_policy
from cotrt.control.policy import Exit, Probe, ProbeResult, RowView

HF_INDUCER = "\n**Final Answer**\n\nThe final answer is \\boxed"
VLLM_INDUCER = "\n**Final Answer**\n\\boxed"


# -------------------------------------------------- the scripts' rules, restated literally


def hf_script_confidence(max_probs):
    """vanilla_deer.py, calcu_max_probs_w_kv(method=1): the first token's probability is
    not added; after the loop, the last one is taken off and the sum divided by steps - 2
    (torch scalars, so 0 / 0 is NaN, not an error)."""
    total = torch.tensor(0.0, dtype=torch.float64)
    steps = 0
    max_value = None
    for i, p in enumerate(max_probs):
        max_value = torch.tensor(p, dtype=torch.float64)
        if i > 0:
            total = total + max_value
        steps += 1
    return float((total - max_value) / (steps - 2))


def vllm_script_confidence(token_probs, policy):
    """vllm-deer.py, calculate_average_max_prob_from_logprobs: tokens 1..n-1 (0-based);
    None where it raises ZeroDivisionError (the script then marks the question an error)."""
    total, log_sum, count, min_prob = 0.0, 0.0, 0, 1.0
    for i in range(1, len(token_probs)):
        prob = token_probs[i]
        min_prob = min(min_prob, prob)
        total += prob
        log_sum += math.log(max(prob, 1e-10))
        count += 1
    try:
        if policy == "min":
            return min_prob
        if policy == "avg1":
            return total / count
        return math.exp(log_sum / count)
    except ZeroDivisionError:
        return None


def _view(cue=None, last_token=None):
    return RowView(request_id=0, phase="think", think_tokens=10, steps=1, generated=10, boundary=True, cue=cue,
                   last_token_is_cue=True, text=lambda: "", step_text=lambda: "", last_token=last_token)


def _result(probs, text="{12}", stopped="stop"):
    return ProbeResult(position=10, token_ids=list(range(len(probs))), text=text, max_probs=list(probs),
                       entropy=0.0, stopped=stopped, token_probs=list(probs))


# ------------------------------------------------------------------- construction, JSON


def test_variant_is_validated_and_reachable_by_name():
    with pytest.raises(ValueError, match="deer: variant must be one of cotrt, hf, vllm, got 'HF2'"):
        DEER(variant="HF2")
    with pytest.raises(ValueError, match="deer: variant"):
        build_policy({"name": "deer", "variant": "openai"})
    with pytest.raises(ValueError, match="deer: confidence='geo': variant 'hf'"):
        DEER(variant="hf", confidence="geo")
    with pytest.raises(ValueError, match="deer: require_end"):
        DEER(variant="vllm", require_end=True)
    assert DEER().variant == "cotrt"
    hf = build_policy({"name": "deer", "variant": "hf", "threshold": 0.9})
    vl = build_policy({"name": "deer", "variant": "vllm"})
    assert (hf.variant, hf.threshold, hf.inducer, hf.max_tokens) == ("hf", 0.9, HF_INDUCER, 21)
    assert (vl.variant, vl.inducer, vl.max_tokens, vl.max_probes) == ("vllm", VLLM_INDUCER, 20, 10)
    p = cotrt.Params.from_dict({"exit": {"name": "deer", "variant": "vllm"}})
    assert p.exit[0].variant == "vllm"


# ---------------------------------------------------------- item 14: the confidence span


CASES = [
    [0.5, 0.9, 0.88, 0.896, 0.82],  # hf 0.892 (box-closing token left out), vllm/cotrt 0.874
    [0.3, 0.5, 0.5, 0.5],  # all three exactly 0.5: > vs >=
    [0.7, 0.99],  # two tokens: hf divides 0 by 0
    [0.93],  # one token: hf gives p[0]; vllm's mean divides by zero
    [0.2, 0.97, 0.99, 0.95, 0.99, 0.98, 0.96],
]


@pytest.mark.parametrize("probs", CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.885, 0.9])
def test_hf_decision_follows_the_script(probs, threshold, think_tokenizer):
    deer = DEER(threshold=threshold, variant="hf")
    deer.bind_tokenizer(think_tokenizer)
    wait = think_tokenizer("Wait", add_special_tokens=False)["input_ids"][0]
    assert isinstance(deer.on_step(_view(last_token=wait)), Probe)
    ref = hf_script_confidence(probs)
    action = deer.on_probe(_view(), _result(probs))
    assert isinstance(action, Exit) == (ref > threshold), (probs, ref)
    assert (math.isnan(ref) and math.isnan(deer.last_confidence)) or deer.last_confidence == pytest.approx(ref)


@pytest.mark.parametrize("probs", CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.885, 0.9])
@pytest.mark.parametrize("how,policy", [("mean", "avg1"), ("geo", "avg2"), ("min", "min")])
def test_vllm_decision_follows_the_script(probs, threshold, how, policy, think_tokenizer):
    deer = DEER(threshold=threshold, confidence=how, variant="vllm")
    deer.bind_tokenizer(think_tokenizer)
    wait = think_tokenizer("Wait", add_special_tokens=False)["input_ids"][0]
    assert isinstance(deer.on_step(_view(cue="Wait", last_token=wait)), Probe)
    ref = vllm_script_confidence(probs, policy)
    action = deer.on_probe(_view(), _result(probs))
    assert isinstance(action, Exit) == (ref is not None and ref > threshold), (probs, ref)


def test_the_three_rules_differ_where_the_issue_says():
    """Same probe, three decisions: hf leaves the box-closing token out (0.892 > 0.885);
    vllm and cotrt keep it (0.874); at exactly the threshold only cotrt (>=) exits; a probe
    cut at its cap with an open box counts in the scripts, not in cotrt."""
    def decide(variant, probs, threshold, **kw):
        d = DEER(threshold=threshold, variant=variant)
        d._real_stop, d._pre, d._lead = False, "", "\n"  # as bound (what on_step sets)
        return isinstance(d.on_probe(_view(), _result(probs, **kw)), Exit)

    p = CASES[0]
    assert [decide(v, p, 0.885) for v in ("hf", "vllm", "cotrt")] == [True, False, False]
    assert [decide(v, CASES[1], 0.5) for v in ("hf", "vllm", "cotrt")] == [False, False, True]
    cut = dict(text="{1234567", stopped="length")
    assert [decide(v, CASES[4], 0.9, **cut) for v in ("hf", "vllm", "cotrt")] == [True, True, False]


# ---------------------------------------------------- item 15: triggers, probes, exit text


def test_hf_reacts_to_the_wait_token_id_only(think_tokenizer):
    tok = think_tokenizer
    deer = DEER(variant="hf")
    deer.bind_tokenizer(tok)
    ids = lambda s, special=False: tok(s, add_special_tokens=special)["input_ids"]
    probe = deer.on_step(_view(last_token=ids("Wait")[0]))
    stops = [" }", "}", "}.", "}.\n", "}\\", "}}", ")}", ")}.", ")}\n", "</think>"]
    assert probe.stop_ids == frozenset(sum(tok(stops)["input_ids"], []))  # the script's list, flattened
    assert (probe.text, probe.max_tokens, probe.stop_at_eos, probe.before_last, probe.temperature) == \
        (HF_INDUCER, 21, False, True, 0.0)
    assert deer.on_step(_view(cue="Wait", last_token=ids(" Wait")[0])) is None
    assert deer.on_step(_view(last_token=ids(" Waiting")[0])) is None
    # "**" is a real stop: probed, then thinking ends whatever the confidence.
    assert isinstance(deer.on_step(_view(last_token=ids("**")[0])), Probe)
    action = deer.on_probe(_view(), _result([0.1, 0.1, 0.1]))
    assert isinstance(action, Exit) and action.reason == "end"
    assert (action.lead, action.inject) == ("\n", "\n\n")  # "\n</think>\n\n"


def test_vllm_reacts_to_the_text_and_keeps_what_precedes_it(think_tokenizer):
    tok = think_tokenizer
    deer = DEER(variant="vllm")
    deer.bind_tokenizer(tok)
    sp_wait = tok(" Wait", add_special_tokens=False)["input_ids"]
    assert len(sp_wait) == 1
    probe = deer.on_step(_view(cue="Wait", last_token=sp_wait[0]))
    # vLLM cuts the text before "Wait": the space stays, the inducer follows it.
    assert (probe.text, probe.before_last, probe.temperature, probe.max_tokens) == (" " + VLLM_INDUCER, True, 1.0, 20)
    assert probe.stop == (" }", "}\n", "}\n\n", "}.", "}.\n", "}\\", "}}", ")}", ")}.", ")}\n")
    action = deer.on_probe(_view(), _result([0.5, 0.99, 0.99]))
    assert (action.lead, action.inject) == (" \n", "\n\n")
    assert deer.on_step(_view(cue="\n\n", last_token=sp_wait[0])) is None
    for _ in range(9):  # max_judge_steps = 10 probes in all
        assert deer.on_step(_view(cue="Wait", last_token=sp_wait[0])) is not None
    assert deer.on_step(_view(cue="Wait", last_token=sp_wait[0])) is None


# ------------------------------------------ end to end: vanilla_deer.py's loop, restated


def _last_logits(model, seq):
    """The model's next-token logits after ``seq`` (the LM head on the last position only)."""
    return model.lm_head(model.model(torch.tensor([seq])).last_hidden_state[0, -1]).float()


def _biased_model(tok, bias: float):
    """A tiny model that writes "Wait" (the bare token) now and then: an LM head with a bias."""
    model = tiny_model("qwen3", len(tok), seed=31)
    wait = tok("Wait", add_special_tokens=False)["input_ids"][0]
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 3.0)
        head.bias.zero_()
        head.bias[wait] = bias
    model.lm_head = head
    return model.eval()


@torch.no_grad()
def vanilla_deer(model, tok, prompt, threshold, n_tokens):
    """vanilla_deer.py's loop without a cache: greedy thinking until a stop id; drop it;
    probe from there; exit ("\\n</think>\\n\\n", then greedy answer) when confident or at a
    real stop, else append "Wait" and go on. Returns the first n_tokens generated tokens."""
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    last_token_ids = ids("**") + ids("</think>") + [tok.eos_token_id]
    continue_ids = ids("Wait")
    stop_ids = continue_ids + last_token_ids
    probe_stops = sum(tok([" }", "}", "}.", "}.\n", "}\\", "}}", ")}", ")}.", ")}\n", "</think>"])["input_ids"], [])
    nxt = lambda seq: _last_logits(model, seq)
    seq = list(prompt)
    while len(seq) - len(prompt) < n_tokens:
        gen = []
        while True:  # model.generate(..., eos_token_id=stop_ids)
            t = int(nxt(seq + gen).argmax())
            gen.append(t)
            if t in stop_ids or len(seq) + len(gen) - len(prompt) >= n_tokens + 1:
                break
        real_stop = gen[-1] in last_token_ids
        pred = seq + gen[:-1]  # the stop token is dropped
        probe, probs = [], []
        while not probe or probe[-1] not in probe_stops:  # calcu_max_probs_w_kv
            p = torch.softmax(nxt(pred + ids(HF_INDUCER) + probe), -1)
            probs.append(float(p.max()))
            probe.append(int(p.argmax()))
            if len(probe) > 20:
                break
        if hf_script_confidence(probs) > threshold or real_stop:
            seq = pred + tok("\n</think>\n\n")["input_ids"]
            while len(seq) - len(prompt) < n_tokens:
                seq.append(int(nxt(seq).argmax()))
            break
        seq = pred + continue_ids
    return seq[len(prompt):][:n_tokens]


@pytest.mark.parametrize("threshold,exits", [(0.27, True), (0.9, False)])
def test_hf_variant_matches_vanilla_deer(threshold, exits, think_tokenizer):
    tok = think_tokenizer
    model = _biased_model(tok, bias=12.0)
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=256)
    prompt = tok.encode("Q: what is 6*7?\nA: <think>\n", add_special_tokens=False)
    n = 60
    o = rt.generate([prompt], cotrt.Params(max_new_tokens=n, exit=DEER(threshold=threshold, variant="hf")))[0]
    ref = vanilla_deer(model, tok, prompt, threshold, n)
    assert tok.eos_token_id not in ref
    assert o.token_ids == ref
    decisions = [p["decision"] for p in o.stats["probes"]]
    assert decisions.count("continue") >= 3
    assert (decisions[-1] == "exit") == exits
    if exits:  # the "Wait" was taken back and "\n</think>\n\n" follows what preceded it
        assert o.stats["think_end"] == "deer:confident"
        assert tok.decode(o.token_ids).count("\n</think>\n\n") == 1


# ------------------------------------------ end to end: vllm-deer.py's loop, restated


@torch.no_grad()
def vllm_deer(model, tok, prompt, threshold, n_tokens, seed):
    """vllm-deer.py's loop at the token level, without a cache: greedy thinking chunks
    until the text "Wait" (or EOS); the probe follows the text cut before "Wait" with the
    inducer, drawn at temperature 1.0 (with cotrt's seeded draw, so the draws agree),
    until a stop string, EOS or 20 tokens; exit ("\\n</think>\\n\\n" after the cut text,
    then greedy answer) when avg1 > threshold, else "Wait" goes back on; at most 10 probes.
    Keeps tokens where the script re-tokenizes its text (the README's one difference)."""
    from cotrt.engine.sampler import uniform

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    stops = (" }", "}\n", "}\n\n", "}.", "}.\n", "}\\", "}}", ")}", ")}.", ")}\n")
    nxt = lambda seq: _last_logits(model, seq)
    seq, steps = list(prompt), 0
    while len(seq) - len(prompt) < n_tokens:
        gen = []
        while True:  # a thinking chunk: stop strings ["Wait", "</think>", eos] (the first 10)
            gen.append(int(nxt(seq + gen).argmax()))
            text = tok.decode(gen, skip_special_tokens=True)
            if ("Wait" in text and steps < 10) or len(seq) + len(gen) - len(prompt) >= n_tokens:
                break
        if "Wait" not in text or steps >= 10:
            seq += gen
            break
        steps += 1
        last = tok.decode([gen[-1]])
        pre = last[: last.find("Wait")]  # the text before "Wait" in its token stays
        ctx = seq + gen[:-1]
        feed = ctx + enc(pre + VLLM_INDUCER)
        probe, probs = [], []
        while True:
            p = torch.softmax(nxt(feed + probe), -1)
            u = float(uniform(torch.tensor([seed ^ 0x5EED]), torch.tensor([len(ctx) + len(probe)])))
            t = int(torch.searchsorted(torch.cumsum(p.double(), -1), torch.tensor([u])).clamp_max(p.numel() - 1))
            probe.append(t)
            probs.append(float(p[t]))
            if any(s in tok.decode(probe, skip_special_tokens=True) for s in stops) or t == tok.eos_token_id \
                    or len(probe) >= 20:
                break
        conf = vllm_script_confidence(probs, "avg1")
        if conf is not None and conf > threshold:
            seq = ctx + enc(pre + "\n</think>\n\n")
            while len(seq) - len(prompt) < n_tokens:
                seq.append(int(nxt(seq).argmax()))
            break
        seq = ctx + [gen[-1]]  # "Wait" appended back: the same token here
    return seq[len(prompt):][:n_tokens]


def _biased_on(tok, word: str, bias: float):
    model = _biased_model(tok, 0.0)
    with torch.no_grad():
        model.lm_head.bias[tok(word, add_special_tokens=False)["input_ids"][0]] = bias
    return model


@pytest.mark.parametrize("threshold", [0.05, 0.6])
def test_vllm_variant_matches_vllm_deer(threshold, think_tokenizer):
    tok = think_tokenizer
    model = _biased_on(tok, " Wait", 12.0)
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=256)
    prompt = tok.encode("Q: what is 6*7?\nA: <think>\n", add_special_tokens=False)
    n, seed = 60, 7
    o = rt.generate([prompt], cotrt.Params(max_new_tokens=n, seed=seed, exit=DEER(threshold=threshold,
                                                                                   variant="vllm")))[0]
    ref = vllm_deer(model, tok, prompt, threshold, n, seed)
    assert o.token_ids == ref
    assert o.stats["probes"], "no transition was probed"
    decisions = [p["decision"] for p in o.stats["probes"]]
    assert decisions == (["exit"] if threshold < 0.1 else ["continue"] * 10)  # max_judge_steps = 10
