"""The per-request control logic, driven token by token with scripted tokens.

Each test feeds ``Row.accept`` exactly the tokens a model would produce, so every budget
decision is checked at the token where it must happen.
"""
from __future__ import annotations

import pytest

from cotrt.control.automaton import compile_cached, token_bytes
from cotrt.control.phase import ANSWER, PRE, THINK
from cotrt.control.request import Request as Row, RowPatterns
from cotrt.control.think import ThinkFormat
from cotrt.params import Params

THINK_FMT = ThinkFormat("<think>", "</think>")


def make_row(tok, prompt: str, params: Params, fmt: ThinkFormat = THINK_FMT, max_len=4096) -> Row:
    pats = RowPatterns(compile_cached(RowPatterns.pattern_list(fmt, params.stop, params.step_cues), tok),
                       fmt, params.stop, params.step_cues)
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    row = Row(0, enc(prompt), params, fmt, pats, token_bytes(tok), {tok.eos_token_id}, enc, max_len)
    row.start()
    return row


def feed(row: Row, tokens) -> None:
    for t in tokens:
        assert not row.forced, "a forced sequence is pending"
        row.accept(t, forced=False)


def drain(row: Row) -> list[int]:
    out = []
    while row.forced and not row.finished:
        t = row.forced.popleft()
        out.append(t)
        row.accept(t, forced=True)
    return out


def filler(tok, n: int) -> list[int]:
    """n tokens of plain text with no cue, marker or stop in it."""
    ids = tok.encode(" the cat sat on a mat" * n, add_special_tokens=False)
    return ids[:n]


def test_phase_from_prompt(think_tokenizer):
    p = Params()
    assert make_row(think_tokenizer, "Q: hi\nA: <think>\n", p).phase == THINK  # pre-opened
    assert make_row(think_tokenizer, "Q: hi\nA:", p).phase == PRE
    # Markers in earlier turns are closed: this turn starts outside thinking.
    assert make_row(think_tokenizer, "<think>x</think>y\nQ: hi\nA:", p).phase == PRE
    assert make_row(think_tokenizer, "<think>x</think>y\nQ: hi\nA: <think>", p).phase == THINK
    assert make_row(think_tokenizer, "Q: hi", p, fmt=ThinkFormat.none()).phase == THINK


@pytest.mark.parametrize("budget", [0, 1, 7, 20])
def test_hard_budget_forces_the_end_marker(think_tokenizer, budget):
    tok = think_tokenizer
    row = make_row(tok, "Q: hi\nA: <think>\n", Params(think_budget=budget))
    end_id = tok.convert_tokens_to_ids("</think>")
    fill = filler(tok, 50)
    i = 0
    while not row.forced:
        feed(row, [fill[i]])
        i += 1
    assert row.think_sampled == budget
    assert drain(row) == [end_id]
    assert row.phase == ANSWER and row.think_end == "think_budget"
    assert row.stats()["think_tokens"] == budget and row.stats()["forced_tokens"] == 1  # the marker apart


def test_step_cut_budget_takes_back_the_unfinished_step(think_tokenizer):
    """``think_budget_cut="step"``: at the budget, the tokens after the last step boundary
    are taken back and the end marker follows the last whole step."""
    tok = think_tokenizer
    nl = tok.encode("\n", add_special_tokens=False)
    end_id = tok.convert_tokens_to_ids("</think>")
    row = make_row(tok, "Q: hi\nA: <think>\n", Params(think_budget=12, think_budget_cut="step", step_cues=("\n",)))
    whole = filler(tok, 3) + nl + filler(tok, 4) + nl  # two whole steps, 9 tokens
    feed(row, whole + filler(tok, 2))
    assert not row.forced and row.steps == 2
    feed(row, filler(tok, 1))  # the 12th think token: the budget
    assert row.gen == whole and row.rolled_back == 3 and row.think_sampled == 9
    assert drain(row) == [end_id]
    assert row.phase == ANSWER and row.think_end == "think_budget"
    st = row.stats()
    assert st["think_tokens"] == 9 and st["rolled_back"] == 3 and st["forced_tokens"] == 1


@pytest.mark.parametrize("where", ["boundary", "no step yet"])
def test_step_cut_budget_at_a_boundary_or_before_any(think_tokenizer, where):
    """A budget reached on the boundary itself takes nothing back; one reached before any
    boundary closes thinking empty (the prompt opened it)."""
    tok = think_tokenizer
    nl = tok.encode("\n", add_special_tokens=False)
    end_id = tok.convert_tokens_to_ids("</think>")
    row = make_row(tok, "A: <think>", Params(think_budget=6, think_budget_cut="step", step_cues=("\n",)))
    toks = filler(tok, 5) + nl if where == "boundary" else filler(tok, 6)
    feed(row, toks)
    assert row.gen == (toks if where == "boundary" else [])
    assert drain(row) == [end_id] and row.think_end == "think_budget"
    assert row.rolled_back == (0 if where == "boundary" else 6)


def test_step_cut_budget_counts_from_where_the_model_opens_thinking(think_tokenizer):
    """Thinking the model opens itself starts after its start marker: an unfinished
    first step goes, the text before the marker stays."""
    tok = think_tokenizer
    row = make_row(tok, "Q: hi\nA:", Params(think_budget=4, think_budget_cut="step", step_cues=("\n",)))
    pre = filler(tok, 2) + tok.encode("<think>", add_special_tokens=False)
    feed(row, pre + filler(tok, 3))  # the model's own start marker is a think token
    assert row.gen == pre and row.rolled_back == 3
    drain(row)
    assert tok.decode(row.gen).endswith("<think></think>") and row.phase == ANSWER


def test_think_budget_cut_is_checked():
    with pytest.raises(ValueError, match="think_budget_cut"):
        Params(think_budget=4, think_budget_cut="line")


def test_transition_phrase_precedes_the_marker(think_tokenizer):
    tok = think_tokenizer
    fmt = ThinkFormat("<think>", "</think>", transition="\nTime is up.\n")
    row = make_row(tok, "A: <think>", Params(think_budget=4), fmt=fmt)
    feed(row, filler(tok, 4))
    forced = drain(row)
    assert tok.decode(forced) == "\nTime is up.\n</think>"
    assert row.phase == ANSWER and row.think_sampled == 4


def test_soft_budget_ends_at_the_next_boundary(think_tokenizer):
    tok = think_tokenizer
    nl2 = tok.encode("\n\n", add_special_tokens=False)
    row = make_row(tok, "A: <think>", Params(soft_budget=5, soft_grace=50))
    feed(row, filler(tok, 3) + nl2 + filler(tok, 2))  # a boundary before the budget: no effect
    assert not row.forced and row.steps == 1
    feed(row, filler(tok, 6))
    assert not row.forced  # past the soft budget, but no boundary yet
    feed(row, nl2)
    assert row.forced and row.closing == "soft_budget"
    drain(row)
    assert row.think_end == "soft_budget" and row.steps == 2


def test_soft_budget_grace_forces_without_boundary(think_tokenizer):
    tok = think_tokenizer
    row = make_row(tok, "A: <think>", Params(soft_budget=4, soft_grace=6))
    fill = filler(tok, 30)
    i = 0
    while not row.forced:
        feed(row, [fill[i]])
        i += 1
    assert row.think_sampled == 10 and row.closing == "soft_budget_grace"


def test_max_steps(think_tokenizer):
    tok = think_tokenizer
    nl2 = tok.encode("\n\n", add_special_tokens=False)
    row = make_row(tok, "A: <think>", Params(max_steps=2, step_cues=("\n\n", "Wait")))
    feed(row, filler(tok, 3) + tok.encode(" Wait,", add_special_tokens=False) + filler(tok, 2))
    assert row.steps == 1 and not row.forced
    feed(row, nl2)
    assert row.steps == 2 and row.closing == "max_steps"


@pytest.mark.parametrize("fmt", [THINK_FMT, ThinkFormat("<reason>", "</reason>")], ids=["single", "multi"])
def test_min_think_takes_back_the_marker_and_waits(think_tokenizer, fmt):
    """An early end marker (one token, or several with text before it in the same token)
    is removed and replaced by the wait text, up to max_waits times."""
    tok = think_tokenizer
    p = Params(min_think=20, max_waits=2, wait_text="\nWait")
    row = make_row(tok, f"A: {fmt.start}", p, fmt=fmt)
    early_end = tok.encode(f" ok.{fmt.end}", add_special_tokens=False)
    if fmt is not THINK_FMT:
        assert len(early_end) > 2  # the marker is split over tokens
    feed(row, filler(tok, 3) + early_end)
    assert row.waits == 1 and row.phase == THINK
    forced = drain(row)
    text = tok.decode(row.gen)
    assert fmt.end not in text and text.endswith(" ok.\nWait")
    assert tok.decode(forced).endswith("\nWait")
    feed(row, early_end)
    drain(row)
    assert row.waits == 2 and row.phase == THINK
    feed(row, early_end)  # waits exhausted: the end is accepted
    assert row.phase == ANSWER and row.think_end == "natural"
    assert row.rolled_back > 0


def test_min_think_met_accepts_the_end(think_tokenizer):
    tok = think_tokenizer
    row = make_row(tok, "A: <think>", Params(min_think=5))
    feed(row, filler(tok, 6) + tok.encode("</think>", add_special_tokens=False))
    assert row.phase == ANSWER and row.waits == 0


def test_forced_end_never_splits_a_character(think_tokenizer):
    """A budget reached right after a token ending mid-character takes that token back and
    re-emits its complete part before the marker."""
    tok = think_tokenizer
    vb = token_bytes(tok)
    partial = next(i for i, b in enumerate(vb) if b == b" \xe2")  # ' ' + lead byte of a 3-byte char
    row = make_row(tok, "A: <think>", Params(think_budget=4))
    feed(row, filler(tok, 3) + [partial])
    forced = drain(row)
    data = bytes(row.gen_bytes)
    data.decode("utf-8")  # valid: the marker did not land inside a character
    assert data.endswith(b" </think>") and tok.decode(forced) == " </think>"


def test_plain_model_budget_forces_the_answer_cue(smol_tokenizer):
    tok = smol_tokenizer
    row = make_row(tok, "Question: 2+2?", Params(think_budget=5), fmt=ThinkFormat.none())
    feed(row, filler(tok, 5))
    drain(row)
    assert row.phase == ANSWER and tok.decode(row.gen).endswith("\nFinal answer:")


def test_answer_budget_and_stop_strings(think_tokenizer):
    tok = think_tokenizer
    row = make_row(tok, "A: <think>", Params(answer_budget=3))
    feed(row, filler(tok, 2) + tok.encode("</think>", add_special_tokens=False) + filler(tok, 3))
    assert row.finished == "answer_budget" and row.finish_reason == "length"
    row = make_row(tok, "A:", Params(stop=("STOP",)))
    feed(row, tok.encode(" go on ST", add_special_tokens=False))
    assert not row.finished and row.holdback() >= 1  # the partial stop is held back
    feed(row, tok.encode("OP", add_special_tokens=False))
    assert row.finished == "stop_string"


def test_second_end_marker_is_banned(think_tokenizer):
    tok = think_tokenizer
    end_id = tok.convert_tokens_to_ids("</think>")
    row = make_row(tok, "A: <think>", Params(think_budget=2))
    assert row.banned_tokens() == []
    feed(row, filler(tok, 2))
    drain(row)
    assert row.banned_tokens() == [end_id]


def test_eos_and_max_new_tokens(think_tokenizer):
    tok = think_tokenizer
    row = make_row(tok, "A:", Params(max_new_tokens=3))
    feed(row, filler(tok, 3))
    assert row.finished == "max_new_tokens"
    row = make_row(tok, "A:", Params())
    feed(row, filler(tok, 2) + [tok.eos_token_id])
    assert row.finished == "eos" and row.finish_reason == "stop"
