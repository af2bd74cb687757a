"""Think controls for plain HF ``model.generate`` (cotrt/hf.py), on tiny random models."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from cotrt.testing import tiny_model
from cotrt.control.automaton import token_bytes
from cotrt.control.profiles import reflection_token_ids
from cotrt.control.think import ThinkFormat
from cotrt.hf import (AnswerBudgetCriteria, MinThinkProcessor, NoWaitProcessor,
                      ThinkBudgetProcessor, ThinkStoppingCriteria, ThinkTracker, think_controls)

PAD = 2  # tiny configs: pad = eos = 2


class Bias(LogitsProcessor):
    """Test helper: add ``value`` to ``ids`` at generated positions ``at`` (all if None)."""

    def __init__(self, ids, value, width, at=None):
        self.ids, self.value, self.width, self.at = list(ids), value, width, at

    def __call__(self, input_ids, scores):
        if self.at is None or input_ids.shape[1] - self.width in self.at:
            scores[:, self.ids] += self.value
        return scores


def left_pad(tok, prompts):
    encs = [tok.encode(p, add_special_tokens=False) for p in prompts]
    w = max(map(len, encs))
    ids = torch.tensor([[PAD] * (w - len(e)) + e for e in encs])
    mask = torch.tensor([[0] * (w - len(e)) + [1] * len(e) for e in encs])
    return ids, mask


def generate(model, ids, mask, procs=(), stops=(), n=12, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList(procs),
                         stopping_criteria=StoppingCriteriaList(stops), max_new_tokens=n,
                         do_sample=seed is not None, top_k=0, pad_token_id=PAD)
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def model(think_tokenizer):
    return tiny_model("qwen3", len(think_tokenizer), seed=3)


@pytest.fixture(scope="module")
def end_id(think_tokenizer):
    return think_tokenizer.convert_tokens_to_ids("</think>")


OPEN = "Question: what is 2+2?<think>"  # a template that pre-opens thinking


@pytest.mark.parametrize("budget", [0, 1, 4, 9])
def test_budget_forces_end_exactly_at_budget(model, think_tokenizer, end_id, budget):
    ids, mask = left_pad(think_tokenizer, [OPEN])
    procs, stops = think_controls(think_tokenizer, think_budget=budget)
    (gen,) = generate(model, ids, mask, procs, stops, n=budget + 5)
    assert gen[budget] == end_id and end_id not in gen[:budget]
    assert gen.count(end_id) == 1  # no second end marker in the answer
    (st,) = procs[0].tracker.stats()
    assert st["think_end"] == "think_budget" and st["think_tokens"] == budget and st["phase"] == "answer"


@pytest.mark.parametrize("transition", ["\nTime is up.\n", ""])
def test_budget_multi_token_marker_and_transition(smol_tokenizer, transition):
    tok = smol_tokenizer  # no <think> tokens: "<think>" and "</think>" are 3 tokens each
    fmt = ThinkFormat("<think>", "</think>", transition="\nTime is up.\n")
    forced = tok.encode(transition + "</think>", add_special_tokens=False)
    assert len(tok.encode("</think>", add_special_tokens=False)) == 3
    m = tiny_model("llama", len(tok), seed=5)
    ids, mask = left_pad(tok, ["Q: 3*3?<think>"])
    procs, _ = think_controls(tok, think_budget=4, think_format=fmt, transition=transition)
    (gen,) = generate(m, ids, mask, procs, n=4 + len(forced) + 3)
    assert gen[4:4 + len(forced)] == forced
    (st,) = procs[0].tracker.stats()
    assert st["think_tokens"] == 4 and st["forced_tokens"] == len(forced) and st["phase"] == "answer"
    assert st["answer_tokens"] == 2  # the last token is never shown to a processor


@pytest.mark.parametrize("prompt, forced", [
    ("Question: what is 2+2?", False),                          # thinking never opened
    ("<think>a</think> 4. Next: what is 3+3?", False),          # closed in an earlier turn
    ("<think>a</think> 4. Next: what is 3+3?<think>", True),    # closed, then re-opened
])
def test_phase_from_prompt(model, think_tokenizer, end_id, prompt, forced):
    ids, mask = left_pad(think_tokenizer, [prompt])
    procs, _ = think_controls(think_tokenizer, think_budget=3)
    (gen,) = generate(model, ids, mask, procs, n=8)
    assert (gen[3] == end_id) is forced
    assert (end_id in gen) is forced


def test_plain_format_forces_the_answer_cue(think_tokenizer):
    m = tiny_model("qwen3", len(think_tokenizer), seed=4)
    ids, mask = left_pad(think_tokenizer, ["Q: 5+5? Let's think."])
    procs, _ = think_controls(think_tokenizer, think_budget=5, think_format=ThinkFormat.none())
    cue = think_tokenizer.encode("\nFinal answer:", add_special_tokens=False)
    (gen,) = generate(m, ids, mask, procs, n=5 + len(cue) + 2)
    assert gen[5:5 + len(cue)] == cue


def test_padded_batch_rows_match_rows_alone(model, think_tokenizer):
    prompts = [OPEN, "A much longer question, about many different things?<think>",
               "No thinking here", "<think>x</think> done. Again?<think>"]
    ids, mask = left_pad(think_tokenizer, prompts)
    batch = generate(model, ids, mask, think_controls(think_tokenizer, think_budget=3, nowait=True,
                                                      min_think=2)[0], n=10)
    for p, row in zip(prompts, batch):
        i1, m1 = left_pad(think_tokenizer, [p])
        (alone,) = generate(model, i1, m1, think_controls(think_tokenizer, think_budget=3, nowait=True,
                                                           min_think=2)[0], n=10)
        assert row == alone, p


def test_nowait_masks_reflection_tokens_only_while_thinking(model, think_tokenizer, end_id):
    refl = set(reflection_token_ids(think_tokenizer))
    ids, mask = left_pad(think_tokenizer, [OPEN])
    bias = Bias(refl, 50.0, ids.shape[1])  # the model now wants nothing but reflection words
    procs, _ = think_controls(think_tokenizer, think_budget=6, nowait=True)
    (gen,) = generate(model, ids, mask, [bias, *procs], n=12)
    assert gen[6] == end_id and not refl & set(gen[:6])
    assert set(gen[7:]) <= refl  # after thinking, nothing is masked
    for seed in range(3):        # sampled, no budget: never a reflection token while thinking
        procs, _ = think_controls(think_tokenizer, nowait=True)
        (gen,) = generate(model, ids, mask, [bias, *procs], n=16, seed=seed)
        assert not refl & set(gen) and end_id not in gen


def test_min_think_replaces_end_by_wait(model, think_tokenizer, end_id):
    ids, mask = left_pad(think_tokenizer, [OPEN])
    want_end = Bias([end_id], 100.0, ids.shape[1])
    (gen,) = generate(model, ids, mask, [want_end], n=3)
    assert gen[0] == end_id  # without the processor the model ends at once
    wait = think_tokenizer.encode("\nWait", add_special_tokens=False)
    proc = MinThinkProcessor(think_tokenizer, min_think=4, max_waits=3)
    (gen,) = generate(model, ids, mask, [want_end, proc], n=3 * len(wait) + 2)
    assert gen[:3 * len(wait) + 1] == wait * 3 + [end_id]  # waits used up: now it may end
    (st,) = proc.tracker.stats()
    assert st["waits"] == 3 and st["forced_tokens"] == 3 * len(wait)
    proc = MinThinkProcessor(think_tokenizer, min_think=0)
    assert generate(model, ids, mask, [want_end, proc], n=2)[0][0] == end_id


@pytest.mark.parametrize("seed", range(3))
def test_min_think_sampled_end_never_early_while_waits_remain(model, think_tokenizer, end_id, seed):
    """Sampling; the model wants to end (bias 100 on the marker) twice too early, after 0
    and 2 chosen thinking tokens, then after 8: each early end becomes a wait, and the end
    comes past min_think=6 with a wait still left (so the rule, not the waits running out,
    let it through). Without the processor the first try ends thinking at once."""
    ids, mask = left_pad(think_tokenizer, [OPEN])
    wait = think_tokenizer.encode("\nWait", add_special_tokens=False)
    w = len(wait)
    tries = {0, w + 2, 2 * w + 8}  # generated positions of the three tries
    want_end = Bias([end_id], 100.0, ids.shape[1], at=tries)
    proc = MinThinkProcessor(think_tokenizer, min_think=6, max_waits=3)
    (gen,) = generate(model, ids, mask, [want_end, proc], n=2 * w + 10, seed=seed)
    (st,) = proc.tracker.stats()
    assert end_id in gen, gen
    p = gen.index(end_id)
    assert p == 2 * w + 8 and st["waits"] == 2 < 3, (gen, st)
    assert gen[:w] == wait and gen[w + 2:2 * w + 2] == wait
    assert p - st["waits"] * w >= 6  # chosen thinking tokens before the end
    (free,) = generate(model, ids, mask, [Bias([end_id], 100.0, ids.shape[1], at=tries)], n=2, seed=seed)
    assert free[0] == end_id


def test_min_think_multi_token_marker_masks_its_first_token(smol_tokenizer):
    tok = smol_tokenizer
    first = tok.encode("</think>", add_special_tokens=False)[0]
    m = tiny_model("llama", len(tok), seed=6)
    ids, mask = left_pad(tok, ["Q?<think>"])
    wait = tok.encode("\nWait", add_special_tokens=False)
    proc = MinThinkProcessor(tok, min_think=50, max_waits=2, think_format=ThinkFormat())
    (gen,) = generate(m, ids, mask, [Bias([first], 100.0, ids.shape[1]), proc], n=2 * len(wait) + 1)
    assert gen == wait * 2 + [first]


def test_forced_tokens_win_over_masks_in_any_order(model, think_tokenizer, end_id):
    ids, mask = left_pad(think_tokenizer, [OPEN])
    tracker = ThinkTracker(think_tokenizer)
    procs = [MinThinkProcessor(think_tokenizer, 5, max_waits=1, tracker=tracker),
             NoWaitProcessor(think_tokenizer, tracker=tracker)]  # NoWait masks the forced "Wait"
    (gen,) = generate(model, ids, mask, [Bias([end_id], 100.0, ids.shape[1]), *procs], n=3)
    assert gen == think_tokenizer.encode("\nWait", add_special_tokens=False) + [end_id]


def test_second_end_marker_is_masked_after_thinking(model, think_tokenizer, end_id):
    ids, mask = left_pad(think_tokenizer, [OPEN])
    late = Bias([end_id], 100.0, ids.shape[1], at=range(3, 100))
    (gen,) = generate(model, ids, mask, [late, ThinkBudgetProcessor(think_tokenizer, 2)], n=8)
    assert gen[2] == end_id and gen.count(end_id) == 1
    always = Bias([end_id], 100.0, ids.shape[1])  # ends naturally, then wants to end again
    (gen,) = generate(model, ids, mask, [always, ThinkBudgetProcessor(think_tokenizer, 5)], n=6)
    assert gen[0] == end_id and gen.count(end_id) == 1


def test_forced_end_never_splits_a_utf8_character(model, think_tokenizer, end_id):
    vocab = {b: i for i, b in enumerate(token_bytes(think_tokenizer)) if len(b) == 1 and b[0] >= 0x80}
    lead, c1, c2 = vocab[b"\xe4"], vocab[b"\xb8"], vocab[b"\x80"]  # "一" = e4 b8 80
    ids, mask = left_pad(think_tokenizer, [OPEN])
    w = ids.shape[1]
    spell = [Bias([lead], 1e4, w, at={2}), Bias([c1], 1e4, w, at={3}), Bias([c2], 1e4, w, at={4})]
    (gen,) = generate(model, ids, mask, [*spell, ThinkBudgetProcessor(think_tokenizer, 3)], n=7)
    assert gen[2:6] == [lead, c1, c2, end_id]  # budget 3 reached mid-character: wait for it
    endless = Bias([lead], 1e4, w, at=range(2, 100))  # a character that never completes
    (gen,) = generate(model, ids, mask, [endless, ThinkBudgetProcessor(think_tokenizer, 3)], n=8)
    assert gen[2:6] == [lead] * 4 and gen[6] == end_id  # at most 3 tokens late


def test_stopping_criteria(model, think_tokenizer, end_id):
    ids, mask = left_pad(think_tokenizer, [OPEN])
    procs, stops = think_controls(think_tokenizer, think_budget=4, stop_at_think_end=True)
    (gen,) = generate(model, ids, mask, procs, stops, n=20)
    assert len(gen) == 5 and gen[-1] == end_id
    procs, stops = think_controls(think_tokenizer, think_budget=4, answer_budget=3)
    (gen,) = generate(model, ids, mask, procs, stops, n=20)
    assert len(gen) == 8 and gen[4] == end_id
    assert stops[0].tracker.stats()[0]["answer_tokens"] == 3
    (gen,) = generate(model, ids, mask, [], [ThinkStoppingCriteria(think_tokenizer)], n=6)
    assert len(gen) == 6  # thinking never ends by itself here


def test_processors_can_be_reused_across_generate_calls(model, think_tokenizer):
    procs, stops = think_controls(think_tokenizer, think_budget=3, answer_budget=4)
    for prompt in (OPEN, "Another, longer question that opens thinking?<think>", OPEN):
        ids, mask = left_pad(think_tokenizer, [prompt])
        fresh = think_controls(think_tokenizer, think_budget=3, answer_budget=4)
        assert generate(model, ids, mask, procs, stops, n=8) == generate(model, ids, mask, *fresh, n=8)


def test_tracker_rescans_a_row_whose_history_changed(think_tokenizer):
    tok = think_tokenizer
    p = tok.encode(OPEN, add_special_tokens=False)
    a, b, c, d = tok.encode(" one two three four", add_special_tokens=False)
    end = tok.convert_tokens_to_ids("</think>")
    tr = ThinkTracker(tok, prompt_length=len(p))
    tr.sync(torch.tensor([p + [a], p + [a]]), "x")
    tr.sync(torch.tensor([p + [a, b], p + [a, end]]), "x")
    # beam search reorders: row 0 now continues row 1's history
    ids = torch.tensor([p + [a, end, c], p + [a, b, d]])
    got = tr.sync(ids, "x")
    fresh = ThinkTracker(tok, prompt_length=len(p))
    fresh.sync(ids, "y")
    assert tr.stats() == fresh.stats()
    assert [s["phase"] for s in tr.stats()] == ["answer", "think"] and len(got) == 2


def test_validation_errors(think_tokenizer):
    tok = think_tokenizer
    with pytest.raises(ValueError, match="think_budget"):
        ThinkBudgetProcessor(tok, -1)
    with pytest.raises(ValueError, match="think_budget"):
        ThinkBudgetProcessor(tok, 2.5)
    with pytest.raises(ValueError, match="min_think"):
        MinThinkProcessor(tok, None)
    with pytest.raises(ValueError, match="wait_text"):
        MinThinkProcessor(tok, 3, wait_text="")
    with pytest.raises(ValueError, match="max_waits"):
        MinThinkProcessor(tok, 3, max_waits=-1)
    with pytest.raises(ValueError, match="answer_budget"):
        AnswerBudgetCriteria(tok, -2)
    with pytest.raises(ValueError, match="prompt_length"):
        ThinkTracker(tok, prompt_length=0)
    with pytest.raises(ValueError, match="think_format"):
        ThinkTracker(tok, think_format="<think>")
    with pytest.raises(ValueError, match="words"):
        NoWaitProcessor(tok, words="wait")
    with pytest.raises(ValueError, match="differs"):
        ThinkBudgetProcessor(tok, 3, think_format=ThinkFormat.none(), tracker=ThinkTracker(tok))
    with pytest.raises(ValueError, match="nowait"):
        think_controls(tok, nowait="yes")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        proc = ThinkBudgetProcessor(tok, 0)
        ids = torch.tensor([tok.encode(OPEN, add_special_tokens=False)])
        proc(ids, torch.zeros(1, 100))
