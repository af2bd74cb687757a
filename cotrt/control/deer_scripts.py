"""The rules of DEER's two released scripts (github.com/iie-ycx/DEER), for ``DEER(variant=...)``.

``vanilla_deer.py`` ("hf", transformers):
- thinking stops at any token id of ``tokenizer("Wait")`` (the continue word), or of
  ``"**"`` / ``"</think>"`` / the EOS id (a "real stop"); ids, not text: " Wait" or
  "Waiting" are other tokens and do not stop it;
- at every stop it probes from before the stop token with
  ``"\\n**Final Answer**\\n\\nThe final answer is \\boxed"``, greedy, until a token whose id
  is in the tokenization of ``HF_PROBE_STOPS`` (with the tokenizer's special tokens, as its
  ``tokenizer(list)`` call adds them) or 21 tokens (its loop breaks after ``total_steps > 20``);
  no EOS stop;
- confidence: ``(sum(p[1:]) - p[-1]) / (n - 2)`` over the n max-probabilities: the mean of
  tokens 2..n-1 (n = 2 divides 0 by 0: NaN, never above the threshold; n = 1 gives p[0]);
- exit when ``confidence > threshold`` or at a real stop: the stop token is dropped and
  ``tokenizer("\\n</think>\\n\\n")`` (special tokens included) appended; the model answers.
  Otherwise the stop token is dropped and ``tokenizer("Wait")`` appended (the same token
  where "Wait" is one token).

``vllm-deer.py`` ("vllm"):
- thinking chunks stop at the *text* "Wait" (vLLM stop strings: " Wait" and "Waiting"
  contain it), at "</think>" and at EOS; after ``max_judge_steps`` = 10 chunks, only at
  "</think>" (so at most 10 probes);
- the probe appends ``"\\n**Final Answer**\\n\\boxed"`` to the text cut before "Wait",
  decodes at most 20 tokens with vLLM's default ``temperature=1.0`` (the script's
  temperature line is commented out: the probe samples), stopping at the strings
  ``VLLM_PROBE_STOPS`` (no bare "}") or EOS;
- confidence (``--policy``, default "avg1"): over tokens 2..n of the probe (the stopping
  token included), the probability of the token drawn (``logprobs=1``): mean, geometric
  mean ("avg2", log floored at 1e-10) or min (starting from 1.0);
- exit when ``confidence > threshold``: ``"\\n</think>\\n\\n"`` follows the text cut before
  "Wait" and the model answers; otherwise "Wait" is appended back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

VARIANTS = ("cotrt", "hf", "vllm")
# vanilla_deer.py: the probe's stop strings (tokenized, ids flattened) and its inducer.
HF_PROBE_STOPS = (" }", "}", "}.", "}.\n", "}\\", "}}", ")}", ")}.", ")}\n", "</think>")
HF_INDUCER = "\n**Final Answer**\n\nThe final answer is \\boxed"
HF_END_WORDS = ("**", "</think>")  # with the EOS id: a "real stop" that ends thinking
# vllm-deer.py: the probe's stop strings (where \boxed{...} ends) and its inducer.
VLLM_PROBE_STOPS = (" }", "}\n", "}\n\n", "}.", "}.\n", "}\\", "}}", ")}", ")}.", ")}\n")
VLLM_INDUCER = "\n**Final Answer**\n\\boxed"
EXIT_TEXT = ("\n", "\n\n")  # both scripts end thinking with "\n</think>\n\n": lead, tail


@dataclass(frozen=True)
class Script:
    inducer: str
    probe_tokens: int  # the most tokens a probe decodes
    max_probes: int | None
    temperature: float  # the probe's


SCRIPTS = {
    "hf": Script(HF_INDUCER, 21, None, 0.0),
    "vllm": Script(VLLM_INDUCER, 20, 10, 1.0),
}


def hf_confidence(max_probs: list[float]) -> float:
    """vanilla_deer.py's ``calcu_max_probs_w_kv`` (method 1) on a probe's max-probs."""
    n = len(max_probs)
    if n in (0, 2):
        return math.nan  # 0 / 0 in the script (a torch tensor: NaN, no error)
    return (sum(max_probs[1:]) - max_probs[-1]) / (n - 2)


def vllm_confidence(token_probs: list[float], how: str) -> float | None:
    """vllm-deer.py's ``calculate_average_max_prob_from_logprobs``: ``how`` "mean" (avg1),
    "geo" (avg2) or "min". None where the script divides by zero (a one-token probe under
    avg1/avg2: it marks the question as an error); cotrt then does not exit."""
    p = token_probs[1:]
    if how == "min":
        return min([1.0, *p])
    if not p:
        return None
    if how == "mean":
        return sum(p) / len(p)
    return math.exp(sum(math.log(max(x, 1e-10)) for x in p) / len(p))


def token_ids(tokenizer, texts, special: bool = False) -> frozenset:
    """The ids of the tokenizations of ``texts``, flattened (the scripts' ``sum(ids, [])``)."""
    return frozenset(i for t in texts for i in tokenizer(t, add_special_tokens=special)["input_ids"])


def special_prefix(tokenizer, text: str) -> str:
    """The text of the special tokens ``tokenizer(text)`` puts before ``text`` (a BOS where
    the tokenizer adds one: the HF script's exit text carries it), or ""."""
    full = tokenizer(text)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
        return tokenizer.decode(full[: len(full) - len(plain)])
    return ""
