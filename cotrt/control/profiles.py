"""Model profiles: the think markers, probe texts and word lists of each reasoning-model family.

A profile holds what the early-exit policies need to know about a model family: how it
delimits thinking, what a probe appends to elicit an answer (DEER, Dynasor) and what ends
that answer, which words mark reflection (NoWait) or hesitation (Dynasor), and where its
reasoning steps start. ``detect_profile`` picks one from the tokenizer's vocabulary and chat
template, or from the model's name.

Sources (values are those papers' and repositories' published strings, not re-tuned):
- DEER: Yang et al. 2025, "Dynamic Early Exit in Reasoning Models", arXiv 2504.15895, and
  its released code (vllm-deer.py, vllm-deer-qwen3.py).
- Dynasor-CoT: Fu et al. 2024, "Efficiently Serving LLM Reasoning Programs with
  Certaindex", arXiv 2412.20993, and github.com/hao-ai-lab/Dynasor (dynasor/core/cot.py).
- NoWait: Wang et al. 2025, "Wait, We Don't Need to 'Wait'! Removing Thinking Tokens
  Improves Reasoning Efficiency", arXiv 2506.08343, Section 3.1.
- s1: Muennighoff et al. 2025, "s1: Simple test-time scaling", arXiv 2501.19393, and
  github.com/simplescaling/s1 (README inference example).
- Qwen3: the model card's thinking-budget recipe (``QWEN3_TRANSITION`` in think.py).
"""
from __future__ import annotations

import re
import string
import threading
import weakref
from dataclasses import dataclass

from cotrt.control.answers import _BOX_RE, _close_brace, extract, extract_boxed
from cotrt.control.automaton import token_bytes
from cotrt.control.think import QWEN3_TRANSITION, ThinkFormat

# NoWait's 17 reflection keywords, found on QwQ-32B's AIME 2025 outputs (paper, Sec. 3.1).
NOWAIT_WORDS = ("wait", "alternatively", "hmm", "but", "however", "alternative", "another",
                "check", "double-check", "oh", "maybe", "verify", "other", "again", "now",
                "ah", "any")
# Dynasor's uncertain words: a probe answer containing one is not counted as certain
# (dynasor/core/cot.py, ``uncertain_words``).
DYNASOR_HESITATION_WORDS = ("wait", "hold", "but", "okay", "no", "hmm")
# DEER's answer inducer, appended inside thinking at a transition point; the probe then
# decodes at most 20 tokens (``prob_check_max_tokens``) and stops where the box closes.
# It ends at "\boxed", so the probe's first token is "{": DEER's confidence skips the first
# token for that reason. (GPQA runs use a different, option-letter wording.)
DEER_INDUCER = "\n**Final Answer**\n\\boxed"
DEER_PROBE_TOKENS = 20
# Dynasor's probe suffix and the templated ending it appends when it exits on a probed
# answer (the "\[ \boxed{" is closed by "}\n\]").
DYNASOR_INDUCER = "... Oh, I suddenly got the answer to the whole problem, **Final Answer**\n\n\\[ \\boxed{"
DYNASOR_ENDING = "}\n\\]\n"
# s1 ends thinking with its answer header and this cue (s1 README example).
S1_ANSWER = "\n<|im_start|>answer\nFinal Answer: \\boxed"


@dataclass(frozen=True)
class ModelProfile:
    """What the exit policies know about a model family.

    name:             profile name ("r1-distill", "qwq", "qwen3", "s1", "plain").
    think_format:     think markers and the transition text forced before a cut-short end.
    answer_inducer:   text a DEER probe appends to the row to elicit an answer.
    probe_close:      the string that ends a probe's answer ("}" closing the box; Qwen3's
                      DEER variant instead decodes until "</think>": its README reports
                      Qwen3 over-confident on the plain probe).
    probe_max_tokens: cap on a probe's decoded tokens (DEER: 20).
    dynasor_inducer:  text a Dynasor probe appends; ``dynasor_ending`` closes it on exit.
    reflection_words: what NoWait suppresses (see ``reflection_token_ids``).
    hesitation_words: Dynasor's uncertain words, matched on word boundaries.
    step_cues:        strings that start a reasoning step (boundaries for probes). DEER
                      probes at "Wait" (its default ``--points 1``; "Alternatively" with 0).
    wait_text:        s1's extension text (min_think appends it instead of ending).
    answer_methods:   extractor names (``answers.extract``) for the final text.
    """

    name: str
    think_format: ThinkFormat
    answer_inducer: str = DEER_INDUCER
    probe_close: str = "}"
    probe_max_tokens: int = DEER_PROBE_TOKENS
    dynasor_inducer: str = DYNASOR_INDUCER
    dynasor_ending: str = DYNASOR_ENDING
    reflection_words: tuple = NOWAIT_WORDS
    hesitation_words: tuple = DYNASOR_HESITATION_WORDS
    step_cues: tuple = ("\n\n", "Wait", "Alternatively")
    wait_text: str = "Wait"
    answer_methods: tuple = ("boxed", "answer_is", "last_number")

    def probe_answer(self, probe_text: str, inducer: str | None = None,
                     partial: bool = False) -> str | None:
        """The answer in a probe's decoded text (without the inducer).

        The inducer's trailing ``\\boxed`` (or ``\\boxed{``) is put back in front, so the
        box opened by the inducer is read whole; ``partial=True`` accepts a box the probe
        left open (cut at its token limit). An inducer without a box falls back to
        ``answer_methods``.
        """
        inducer = self.answer_inducer if inducer is None else inducer
        k = max(inducer.rfind("\\boxed"), inducer.rfind("\\fbox"))
        if k < 0:
            return extract(probe_text, self.answer_methods)
        return extract_boxed(inducer[k:] + probe_text, partial=partial)

    def probe_finished(self, probe_text: str, inducer: str | None = None) -> bool:
        """Whether a probe's decoded text has finished its answer: the box the inducer
        opened is closed, counting braces, so the inner "}" of "{\\frac{1}{2}}" does not end
        it (a bare "}" stop string would; DEER's code works around that with a list of
        "}"-plus-punctuation stops). With a ``probe_close`` other than "}" (Qwen3:
        "</think>"), or an inducer without a box, that string appearing ends the probe."""
        inducer = self.answer_inducer if inducer is None else inducer
        k = max(inducer.rfind("\\boxed"), inducer.rfind("\\fbox"))
        if self.probe_close != "}" or k < 0:
            return self.probe_close in probe_text
        text = inducer[k:] + probe_text
        m = _BOX_RE.match(text)
        return m is not None and _close_brace(text, m.end()) >= 0

    def hesitates(self, text: str) -> bool:
        """Whether ``text`` holds a hesitation word as a whole word (case-insensitive):
        "Wait, 5" and "no" hesitate; "nothing" and "butter" do not."""
        return _word_regex(self.hesitation_words).search(text) is not None


_WORD_RES: dict[tuple, re.Pattern] = {}


def _word_regex(words: tuple) -> re.Pattern:
    pat = _WORD_RES.get(words)
    if pat is None:
        alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        pat = _WORD_RES[words] = re.compile(rf"(?<![\w-])(?:{alt})(?![\w-])", re.IGNORECASE)
    return pat


_THINK = ThinkFormat("<think>", "</think>")
PROFILES: dict[str, ModelProfile] = {
    # DeepSeek-R1-Distill-*: "<think>" pre-opened by the (updated) template; DEER's main
    # setting, probing at "Wait".
    "r1-distill": ModelProfile("r1-distill", _THINK),
    # QwQ-32B: same markers and probes as R1 (DEER evaluates QwQ with the same script).
    "qwq": ModelProfile("qwq", _THINK),
    # Qwen3: a budget cut forces the model card's "limited time" phrase before "</think>";
    # DEER's Qwen3 script (vllm-deer-qwen3.py) decodes the probe until "</think>".
    "qwen3": ModelProfile("qwen3", ThinkFormat("<think>", "</think>", QWEN3_TRANSITION),
                          probe_close="</think>"),
    # s1 (Qwen2.5-32B fine-tune): thinking between "<|im_start|>think" and
    # "<|im_start|>answer"; budget forcing appends "Wait". Probing with s1's own answer
    # header is our choice (s1 publishes no probe); it leaves thinking, which a rolled-back
    # probe may do.
    "s1": ModelProfile("s1", ThinkFormat("<|im_start|>think", "<|im_start|>answer"),
                       answer_inducer=S1_ANSWER),
    # A plain CoT model: no markers, the whole output is reasoning until the answer cue.
    # DEER's inducer is reused (unpublished for plain models); GSM8K-style "####" answers
    # are also read.
    "plain": ModelProfile("plain", ThinkFormat.none(), step_cues=("\n\n",),
                          answer_methods=("boxed", "hash", "answer_is", "last_number")),
}


def get_profile(name: str) -> ModelProfile:
    """The profile called ``name`` (case-insensitive); ValueError naming the known ones."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in PROFILES:
        raise ValueError(f"unknown model profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[key]


# By name: the first match wins, so R1-distill ("...-R1-Distill-Qwen-7B") is tested before
# the Qwen names. "s1" only as a whole path component or name part: "s1-32B",
# "simplescaling/s1.1-7B", not ".../models1/...".
_NAME_RULES = (
    ("r1-distill", re.compile(r"r1[-_]distill")),
    ("qwq", re.compile(r"qwq")),
    ("qwen3", re.compile(r"qwen3")),
    ("s1", re.compile(r"(?:^|[/_\-.])s1(?=$|[/_\-.])")),
)


def detect_profile(tokenizer, name_or_path: str | None = None) -> ModelProfile:
    """The profile of a model, from its name, else its chat template and vocabulary.

    By name (case-insensitive): "r1-distill" / "deepseek-r1-distill", "qwq", "qwen3", "s1".
    By template, in this order: ``<|im_start|>think`` -> s1; ``enable_thinking`` -> qwen3;
    ``<｜Assistant｜>`` with ``<think>`` (template or vocabulary) -> r1-distill;
    ``<|im_start|>`` with ``<think>`` -> qwq; any other tokenizer with ``<think>`` and
    ``</think>`` in its vocabulary -> r1-distill (R1-style markers); else plain.
    """
    if name_or_path:
        low = str(name_or_path).lower()
        for name, rule in _NAME_RULES:
            if rule.search(low):
                return PROFILES[name]
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = "\n".join(str(t) for t in template.values())
    template = str(template)
    think = "<think>" in template or "<think>" in vocab
    if "<|im_start|>think" in template:
        return PROFILES["s1"]
    if "enable_thinking" in template:
        return PROFILES["qwen3"]
    if "<｜Assistant｜>" in template and think:
        return PROFILES["r1-distill"]
    if "<|im_start|>" in template and think:
        return PROFILES["qwq"]
    if "<think>" in vocab and "</think>" in vocab:
        return PROFILES["r1-distill"]
    return PROFILES["plain"]


# -------------------------------------------------------------------- NoWait's token list

_EDGE = string.whitespace + string.punctuation + "\u2581"  # '▁' (SentencePiece space)
_REFLECTION_CACHE: dict[tuple, tuple[weakref.ref, list[int]]] = {}
_REFLECTION_LOCK = threading.Lock()


def _normalize_words(words) -> tuple:
    if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"words must be a sequence of non-empty strings, got {words!r}")
    return tuple(sorted({w.strip().lower() for w in words}))


def reflection_token_ids(tokenizer, words=NOWAIT_WORDS) -> list[int]:
    """Sorted ids of the vocabulary's tokens that spell one of ``words`` (what NoWait masks).

    Rule, on each token's text (its bytes as UTF-8, via ``token_bytes``, so byte-level "Ġ"
    and SentencePiece "▁" are already spaces): strip leading whitespace and punctuation,
    then trailing whitespace and punctuation; the token matches when what remains equals
    a word, case-insensitively. So " Wait", "Wait", "wait", " wait,", "Hmm", "...but" match;
    " waiting", " await", "Waiter", "Butter", "wait_for" (letters or "_" glued on) and
    "Wait, so" (more text after the punctuation) do not. A word's inner punctuation
    stays ("double-check"). Tokens that are not valid UTF-8 on their own never match.

    This is stricter than the paper's substring rule plus manual filtering (which would
    need a per-model review); the vocabulary is scanned once per (tokenizer, words) and
    cached.
    """
    key_words = _normalize_words(words)
    key = (id(tokenizer), len(tokenizer), key_words)
    with _REFLECTION_LOCK:
        hit = _REFLECTION_CACHE.get(key)
        if hit is not None and hit[0]() is tokenizer:
            return list(hit[1])
    wanted = set(key_words)
    ids = []
    for i, raw in enumerate(token_bytes(tokenizer)):
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip(_EDGE).lower() in wanted:
            ids.append(i)
    try:
        ref = weakref.ref(tokenizer, lambda _, k=key: _REFLECTION_CACHE.pop(k, None))
    except TypeError:
        return ids
    with _REFLECTION_LOCK:
        _REFLECTION_CACHE[key] = (ref, ids)
    return list(ids)
