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

The two re-checks are ~60% of a LONG chain's think tokens, all redundant: the room a
compression method has to cut without losing accuracy. Shorter styles of the same chain
(CoT-Valve's MixChain: one problem, chains of several lengths) are what the valve LoRA
learns, each at its own LoRA scale (``VALVE_LEVELS``):

- RECHECK1: the first pass and the first re-check only;
- SHORT: the first pass only;
- COMPACT: the first pass written as a re-check (``b=3*4=12``, no variable on the right).

A TRUNCATED chain (``truncated_completion``) is a LONG chain cut at a token, then
``</think>\nAnswer: N``: what a budget or an early exit leaves the model with. The base
model trains on some (the forced ``</think>`` itself is not a training target), so that a
chain ended early is answered, not re-reasoned, as budget forcing assumes of its models.

Problems come from a seeded ``random.Random``. The held-out test split and the validation
split (used only to choose settings) are drawn from their own seeds and excluded from
training, so neither is ever seen.
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
_VAL_SALT = 0x5A11D
STYLES = ("long", "recheck1", "short", "compact")
# The valve LoRA's scale for each style (CoT-Valve++: a chain of normalized length beta is
# trained at theta + beta * delta, so alpha interpolates length). LONG is the base (0).
VALVE_LEVELS = {"recheck1": 1 / 3, "short": 2 / 3, "compact": 1.0}


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
        """The think text (between the markers) in ``style``, one of ``STYLES``."""
        if style == "short":
            return self.first_pass()
        if style == "long":
            return self.first_pass() + "".join(self.recheck(h) for h in RECHECKS)
        if style == "recheck1":
            return self.first_pass() + self.recheck(RECHECKS[0])
        if style == "compact":
            return self.recheck(f"a={self.start}")
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")

    def completion(self, style: str) -> str:
        """What the model is trained to write after ``prompt`` (the eos token is added by
        the trainer)."""
        return f"{self.think(style)}{END}\nAnswer: {self.answer}\n"

    def truncated_completion(self, cut: int, tok) -> tuple[list, int]:
        """A LONG chain cut after its first ``cut`` think tokens, then ``</think>\nAnswer: N``
        (token ids, eos not added) and the index of the ``</think>`` in them: the text a
        think budget of ``cut`` leaves (``0 <= cut <=`` the LONG chain's think tokens)."""
        think = tok.encode(self.think("long"), add_special_tokens=False)
        if not 0 <= cut <= len(think):
            raise ValueError(f"cut must be in [0, {len(think)}], got {cut}")
        tail = tok.encode(f"{END}\nAnswer: {self.answer}\n", add_special_tokens=False)
        return think[:cut] + tail, cut


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


def _distinct(rng: random.Random, n: int, seen: set) -> list[Problem]:
    """``n`` problems from ``rng`` whose questions are new (``seen`` grows with them)."""
    out = []
    while len(out) < n:
        p = sample_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def held_out(seed: int, n: int) -> list[Problem]:
    """``n`` distinct held-out problems, drawn from their own stream of ``seed``."""
    return _distinct(random.Random(seed ^ _TEST_SALT), n, set())


VAL_SIZE = 200  # validation problems: settings are chosen on these, never on the test split


def validation(seed: int, n: int) -> list[Problem]:
    """``n`` distinct validation problems (their own stream of ``seed``), none of them in
    ``held_out(seed, TEST_SIZE)``."""
    return _distinct(random.Random(seed ^ _VAL_SALT), n, {p.question for p in held_out(seed, TEST_SIZE)})


def excluded(split_seed: int = 0) -> list[Problem]:
    """What training never sees: the test and validation splits of ``split_seed``."""
    return held_out(split_seed, TEST_SIZE) + validation(split_seed, VAL_SIZE)


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
    "STYLES",
    "TEST_SIZE",
    "VALVE_LEVELS",
    "VAL_SIZE",
    "THINK",
    "Problem",
    "build_tokenizer",
    "check_tokenizer",
    "excluded",
    "held_out",
    "parse_answer",
    "sample_problem",
    "train_stream",
    "validation",
]
