"""The testbed's task: short chains of arithmetic assignments with an exact answer.

A problem is ``a=3; b=a*4; c=b-5; what is c?`` (3 to 5 assignments, each one operation on
the previous variable and a digit, every value kept in [0, MAX_VALUE]). Two chain styles
share one first pass, which already determines the answer:

LONG (what the base model learns; like a reasoning model it keeps re-checking)::

    <think>
    a=3
    b=a*4=3*4=12
    c=b-5=12-5=7
    Wait, let me verify.
    b=3*4=12
    c=12-5=7
    Wait, let me check again.
    b=3*4=12
    c=12-5=7
    </think>
    Answer: 7

SHORT (what the CoT-Valve LoRA learns): the first pass, then ``</think>``. The two
re-checks are ~60% of a LONG chain's think tokens, all redundant: the room a compression
method has to cut without losing accuracy.

Problems come from a seeded ``random.Random``; the held-out split is drawn from its own seed
and excluded from training, so test problems are never seen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from cotrt.control.answers import extract

MAX_VALUE = 30  # small values: a 1M-parameter model learns the arithmetic in minutes on CPU
MIN_STEPS, MAX_STEPS = 3, 5  # assignments per problem, including the first "a=N"
VARS = "abcdefgh"
THINK, END = "<think>", "</think>"
EOS, PAD, UNK = "<eos>", "<pad>", "<unk>"
RECHECKS = ("Wait, let me verify.", "Wait, let me check again.")
# The text that closes thinking and asks for the answer. It ends at "Answer:" (not
# "Answer: ") so a probe's first generated token is the space, which DEER's confidence
# skips as formatting; the digits after it are what it measures.
INDUCER = END + "\nAnswer:"
_TEST_SALT = 0x7E57


@dataclass(frozen=True)
class Problem:
    """steps: ((var, src, op, k, value), ...) after the first assignment ``a=start``."""

    start: int
    steps: tuple
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        """The raw-text prompt: the question, then thinking opened."""
        return f"{self.question}\n{THINK}\n"

    @property
    def no_cot_prompt(self) -> str:
        """The prompt with thinking closed at once (the no-CoT baseline)."""
        return f"{self.question}\n{THINK}\n{INDUCER}"

    def first_pass(self) -> str:
        lines = [f"a={self.start}"]
        prev = self.start
        for var, src, op, k, value in self.steps:
            lines.append(f"{var}={src}{op}{k}={prev}{op}{k}={value}")
            prev = value
        return "\n".join(lines) + "\n"

    def recheck(self, header: str) -> str:
        lines = [header]
        prev = self.start
        for var, _src, op, k, value in self.steps:
            lines.append(f"{var}={prev}{op}{k}={value}")
            prev = value
        return "\n".join(lines) + "\n"

    def think(self, style: str) -> str:
        """The think text (between the markers) in ``style`` "long" or "short"."""
        if style == "short":
            return self.first_pass()
        if style == "long":
            return self.first_pass() + "".join(self.recheck(h) for h in RECHECKS)
        raise ValueError(f"style must be 'long' or 'short', got {style!r}")

    def completion(self, style: str) -> str:
        """What the model is trained to write after ``prompt`` (the eos token is added by
        the trainer)."""
        return f"{self.think(style)}{END}\nAnswer: {self.answer}\n"


def _apply(x: int, op: str, k: int) -> int:
    return x + k if op == "+" else x - k if op == "-" else x * k


def sample_problem(rng: random.Random) -> Problem:
    n = rng.randint(MIN_STEPS, MAX_STEPS)
    start = rng.randint(1, 9)
    steps, prev = [], start
    for i in range(1, n):
        options = [("+", k) for k in range(1, 10) if prev + k <= MAX_VALUE]
        options += [("-", k) for k in range(1, 10) if prev - k >= 0]
        options += [("*", k) for k in range(2, 10) if prev * k <= MAX_VALUE and prev > 1]
        op, k = rng.choice(options)
        value = _apply(prev, op, k)
        steps.append((VARS[i], VARS[i - 1], op, k, value))
        prev = value
    parts = [f"a={start}"] + [f"{v}={s}{op}{k}" for v, s, op, k, _ in steps]
    question = "; ".join(parts) + f"; what is {VARS[n - 1]}?"
    return Problem(start, tuple(steps), question, prev)


TEST_SIZE = 200  # held-out problems excluded from training (evaluate.py uses a prefix)


def held_out(seed: int, n: int) -> list[Problem]:
    """``n`` distinct held-out problems, drawn from their own stream of ``seed``."""
    rng = random.Random(seed ^ _TEST_SALT)
    out, seen = [], set()
    while len(out) < n:
        p = sample_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def train_stream(seed: int, exclude=()):
    """An endless stream of training problems, none of whose questions is in ``exclude``."""
    rng = random.Random(seed)
    banned = {p.question if isinstance(p, Problem) else p for p in exclude}
    while True:
        p = sample_problem(rng)
        if p.question not in banned:
            yield p


def parse_answer(text: str) -> int | None:
    """The answer in a model's output: "Answer: N", else the last number; None if none."""
    ans = extract(text or "", ("answer_is", "last_number"))
    if ans is None:
        return None
    try:
        return int(float(ans))
    except ValueError:
        return None


# ------------------------------------------------------------------------------- tokenizer

# Words are single tokens, digits and every other character (space and newline included)
# one token each. Spaces and newlines must be pieces of their own: cotrt's automaton reads
# each token's bytes from its piece, and step cues/markers are matched on those bytes.
_SPLIT = r"[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"
_WORDS = ("what", "is", "Wait", "let", "me", "verify", "check", "again", "Answer")


def vocabulary() -> list[str]:
    chars = list("0123456789") + list(VARS) + list("=+-*;?:,. \n")
    return [UNK, PAD, EOS] + [w for w in _WORDS] + [c for c in chars if c not in _WORDS]


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the task's vocabulary, with ``<think>`` and
    ``</think>`` as single added tokens, ``<eos>`` and ``<pad>``. No chat template: prompts
    are raw text. ``save_pretrained`` writes a tokenizer.json that ``AutoTokenizer`` loads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    core.decoder = decoders.Fuse()  # pieces are the text: concatenate, no spaces added
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, pad_token=PAD, eos_token=EOS)
    tok.add_tokens([THINK, END], special_tokens=False)  # R1-style: kept in decoded text
    return tok


def check_tokenizer(tok) -> None:
    """Round-trip a LONG chain; raise if the text or the markers do not survive."""
    p = sample_problem(random.Random(0))
    text = p.prompt + p.completion("long")
    ids = tok.encode(text, add_special_tokens=False)
    if tok.decode(ids) != text or UNK in tok.convert_ids_to_tokens(ids):
        raise ValueError("testbed tokenizer does not round-trip its own chains")
    for marker in (THINK, END):
        if len(tok.encode(marker, add_special_tokens=False)) != 1:
            raise ValueError(f"testbed tokenizer: {marker} is not a single token")


__all__ = [
    "END",
    "EOS",
    "INDUCER",
    "MAX_VALUE",
    "PAD",
    "TEST_SIZE",
    "THINK",
    "Problem",
    "build_tokenizer",
    "check_tokenizer",
    "held_out",
    "parse_answer",
    "sample_problem",
    "train_stream",
]
