"""Model profiles, profile detection and NoWait's reflection-token scan (cotrt/control/profiles.py)."""
from __future__ import annotations

import pytest

from cotrt.control.automaton import token_bytes
from cotrt.control.profiles import (DYNASOR_HESITATION_WORDS, NOWAIT_WORDS, PROFILES,
                                    ModelProfile, detect_profile, get_profile,
                                    reflection_token_ids)
from cotrt.control.think import QWEN3_TRANSITION, ThinkFormat


class FakeTokenizer:
    """What detection reads: get_vocab() and chat_template."""

    def __init__(self, vocab=(), chat_template=None):
        self._vocab = {t: i for i, t in enumerate(vocab)}
        self.chat_template = chat_template

    def get_vocab(self):
        return dict(self._vocab)


THINK_VOCAB = ("a", "b", "<think>", "</think>")
# Abridged from each family's published chat template: the parts detection keys on.
R1_TEMPLATE = ("{{bos_token}}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{m['content']}}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\\n{% endif %}")
R1_OLD_TEMPLATE = "{% for m in messages %}<｜User｜>{{m['content']}}{% endfor %}<｜Assistant｜>"
QWQ_TEMPLATE = ("{% for m in messages %}<|im_start|>{{m['role']}}\\n{{m['content']}}<|im_end|>\\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\\n<think>\\n{% endif %}")
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{m['role']}}\\n{{m['content']}}<|im_end|>"
                  "{% endfor %}{% if enable_thinking is defined and enable_thinking is false %}<think>\\n\\n</think>{% endif %}")
S1_TEMPLATE = ("{% for m in messages %}<|im_start|>{{m['role']}}\\n{{m['content']}}<|im_end|>{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"
               "{# thinking: <|im_start|>think ... <|im_start|>answer #}")
CHATML_TEMPLATE = "{% for m in messages %}<|im_start|>{{m['role']}}\\n{{m['content']}}<|im_end|>{% endfor %}"


def test_profiles_have_the_published_values():
    assert set(PROFILES) == {"r1-distill", "qwq", "qwen3", "s1", "plain"}
    r1 = PROFILES["r1-distill"]
    assert r1.think_format == ThinkFormat("<think>", "</think>")
    assert r1.answer_inducer == "\n**Final Answer**\n\\boxed" and r1.probe_close == "}"
    assert r1.probe_max_tokens == 20
    assert "Oh, I suddenly got the answer" in r1.dynasor_inducer
    assert r1.dynasor_inducer.endswith("\\boxed{") and r1.dynasor_ending.startswith("}")
    assert len(NOWAIT_WORDS) == 17 and {"wait", "hmm", "alternatively", "double-check"} <= set(NOWAIT_WORDS)
    assert DYNASOR_HESITATION_WORDS == ("wait", "hold", "but", "okay", "no", "hmm")
    q3 = PROFILES["qwen3"]
    assert q3.think_format.transition == QWEN3_TRANSITION and "limited time" in QWEN3_TRANSITION
    assert q3.probe_close == "</think>"
    s1 = PROFILES["s1"]
    assert s1.think_format == ThinkFormat("<|im_start|>think", "<|im_start|>answer")
    assert s1.wait_text == "Wait"
    plain = PROFILES["plain"]
    assert plain.think_format.plain and plain.think_format == ThinkFormat.none()
    assert "hash" in plain.answer_methods
    for p in PROFILES.values():
        assert isinstance(p, ModelProfile) and p.step_cues and p.answer_inducer


@pytest.mark.parametrize("name", ["r1-distill", "QWQ", " qwen3 ", "s1", "plain"])
def test_get_profile(name):
    assert get_profile(name).name == name.strip().lower()


@pytest.mark.parametrize("bad", ["llama", "", None, 3])
def test_get_profile_unknown_lists_names(bad):
    with pytest.raises(ValueError, match="known: r1-distill, qwq, qwen3, s1, plain"):
        get_profile(bad)


@pytest.mark.parametrize("tok, want", [
    (FakeTokenizer(THINK_VOCAB, R1_TEMPLATE), "r1-distill"),
    (FakeTokenizer(THINK_VOCAB, R1_OLD_TEMPLATE), "r1-distill"),   # <think> only in the vocab
    (FakeTokenizer(THINK_VOCAB, QWQ_TEMPLATE), "qwq"),
    (FakeTokenizer(THINK_VOCAB, QWEN3_TEMPLATE), "qwen3"),
    (FakeTokenizer(("a", "b"), S1_TEMPLATE), "s1"),
    (FakeTokenizer(("a", "b"), CHATML_TEMPLATE), "plain"),         # Qwen2.5-Instruct-like
    (FakeTokenizer(THINK_VOCAB, None), "r1-distill"),              # markers, no template
    (FakeTokenizer(("a",), None), "plain"),
    (FakeTokenizer(THINK_VOCAB, {"default": QWQ_TEMPLATE, "tool_use": "x"}), "qwq"),
])
def test_detect_profile_from_template(tok, want):
    assert detect_profile(tok).name == want


@pytest.mark.parametrize("name, want", [
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "r1-distill"),
    ("/models/deepseek-r1-distill-llama-8b", "r1-distill"),
    ("Qwen/QwQ-32B", "qwq"),
    ("Qwen/Qwen3-8B", "qwen3"),
    ("simplescaling/s1-32B", "s1"),
    ("simplescaling/s1.1-7B", "s1"),
    ("/data/models1/llama", "plain"),    # "s1" inside a word is not s1
    ("HuggingFaceTB/SmolLM2-135M", "plain"),
])
def test_detect_profile_by_name(name, want):
    assert detect_profile(FakeTokenizer(("a",), None), name).name == want


def test_name_wins_over_template():
    assert detect_profile(FakeTokenizer(THINK_VOCAB, QWQ_TEMPLATE), "Qwen/Qwen3-4B").name == "qwen3"


def test_detect_profile_real_tokenizers(smol_tokenizer, think_tokenizer):
    assert detect_profile(smol_tokenizer).name == "plain"
    # SmolLM2's ChatML template plus <think> tokens: the QwQ shape.
    assert detect_profile(think_tokenizer).name == "qwq"
    # The profile's markers agree with ThinkFormat.detect on the same tokenizer.
    assert detect_profile(think_tokenizer).think_format == ThinkFormat.detect(think_tokenizer)


def test_probe_answer():
    r1 = get_profile("r1-distill")
    assert r1.probe_answer("{\\frac{1}{2}} }\n") == "\\frac{1}{2}"
    assert r1.probe_answer("{12") is None
    assert r1.probe_answer("{12", partial=True) == "12"
    assert r1.probe_answer("{7}", inducer=r1.dynasor_inducer.replace("\\boxed{", "\\boxed")) == "7"
    assert r1.probe_answer("7}\n\\]", inducer=r1.dynasor_inducer) == "7"
    assert get_profile("s1").probe_answer("{42}") == "42"
    assert get_profile("qwen3").probe_answer("{5}.\nSo 5.</think>") == "5"
    assert r1.probe_answer("The answer is 9.", inducer="\nFinal answer:") == "9"


def test_probe_finished_counts_braces():
    r1, q3 = get_profile("r1-distill"), get_profile("qwen3")
    assert not r1.probe_finished("{\\frac{1}")          # the inner brace does not end it
    assert r1.probe_finished("{\\frac{1}{2}}")
    assert r1.probe_finished("{42} and more")
    assert not r1.probe_finished("42")                  # the model never opened the box
    dyn = r1.dynasor_inducer                            # ends with "\\boxed{": already open
    assert r1.probe_finished("7}", dyn) and not r1.probe_finished("\\sqrt{2", dyn)
    assert r1.probe_finished("The answer is 9.\n", inducer="\nFinal answer:") is False
    assert not q3.probe_finished("{5}.") and q3.probe_finished("{5}.\nSo 5.</think>")


@pytest.mark.parametrize("text, want", [
    ("Wait, 5", True), ("hmm", True), ("but why", True), ("OK no.", True), ("HOLD on", True),
    ("nothing", False), ("butter", False), ("okayish", False), ("no-one", False), ("42", False),
])
def test_hesitates_on_word_boundaries(text, want):
    assert get_profile("r1-distill").hesitates(text) is want


def test_reflection_token_ids_on_smollm2(smol_tokenizer):
    tok = smol_tokenizer
    ids = reflection_token_ids(tok)
    single = lambda s: tok.encode(s, add_special_tokens=False)
    for s in (" Wait", "Wait", " wait", " Hmm", " However", " Alternatively", " check", " but"):
        (i,) = single(s)
        assert i in ids, s
    for s in (" waiting", " await", " butter", " Button", " nowhere", " checked"):
        enc = single(s)
        if len(enc) == 1:
            assert enc[0] not in ids, s
    # "Waiter" is not one token in SmolLM2; no token spelling it (or anything longer) is in.
    vocab = token_bytes(tok)
    texts = [vocab[i].decode("utf-8") for i in ids]
    assert not any("waiter" in t.lower() or "waiting" in t.lower() for t in texts)
    # Every id follows the rule: word with only whitespace/punctuation around it.
    import string
    edge = string.whitespace + string.punctuation
    assert all(t.strip(edge).lower() in NOWAIT_WORDS for t in texts)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_reflection_token_ids_words_and_cache(smol_tokenizer):
    a = reflection_token_ids(smol_tokenizer, ["Wait"])
    b = reflection_token_ids(smol_tokenizer, ("wait", " WAIT "))
    assert a == b
    (w,) = smol_tokenizer.encode(" Wait", add_special_tokens=False)
    assert w in a and len(a) <= 8
    a.append(-1)  # callers get a copy: the cache is not theirs to change
    assert -1 not in reflection_token_ids(smol_tokenizer, ["wait"])
    assert reflection_token_ids(smol_tokenizer, ["zzzqqq"]) == []
    for bad in ("wait", [""], [3]):
        with pytest.raises(ValueError, match="words"):
            reflection_token_ids(smol_tokenizer, bad)


def test_reflection_token_ids_with_added_tokens(think_tokenizer):
    ids = reflection_token_ids(think_tokenizer)
    think_ids = think_tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert not set(think_ids) & set(ids)
    (w,) = think_tokenizer.encode(" Wait", add_special_tokens=False)
    assert w in ids
