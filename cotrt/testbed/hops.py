"""The latent testbed's task: follow k edges of a shuffled permutation graph.

A problem lists every edge ``XY`` (X goes to Y) of a random permutation of N = 12 node
names (single letters), shuffled, then names a start node and a hop count k (3 to 5)::

    KB CJ ... AG
    start C, hops 3
    <think>
    C to J
    J to F
    F to K
    </think>
    Answer: K

The chain (CoT) writes one line per hop, the edge followed, ``C to J`` (6 tokens with the
newline; a sentence per hop, as ProsQA's chains have). Each line is one
lookup in the list, easy for a model that writes it down; answering at once (no-CoT)
needs k lookups composed inside one forward, which a small model does poorly. A latent
step can carry the node reached so far: Coconut and CCoT replace the lines by one
continuous thought per hop (the ProsQA-style setting where the Coconut paper reports its
clearest gain). The answer is uniform over the N nodes (a permutation has no favoured
targets), so guessing scores 1/N.

Problems come from a seeded ``random.Random``; the held-out test and validation splits are
drawn from their own streams and excluded from training.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NODES = "ABCDEFGHIJKL"  # N = 12 node names, one token each
MIN_HOPS, MAX_HOPS = 3, 5
THINK, END = "<think>", "</think>"
EOS, PAD, UNK = "<eos>", "<pad>", "<unk>"
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")  # Coconut's, in its order
TEST_SIZE, VAL_SIZE = 200, 200
_TEST_SALT, _VAL_SALT = 0x40B5, 0x7A11


@dataclass(frozen=True)
class HopProblem:
    """edges: ((src, dst), ...) in the order listed; path: the k + 1 nodes visited."""

    edges: tuple
    start: str
    hops: int
    path: tuple

    @property
    def answer(self) -> str:
        return self.path[-1]

    @property
    def question(self) -> str:
        return " ".join(f"{a}{b}" for a, b in self.edges) + f"\nstart {self.start}, hops {self.hops}"

    @property
    def prompt(self) -> str:
        """The raw-text prompt: the question, then thinking opened."""
        return f"{self.question}\n{THINK}\n"

    @property
    def no_cot_prompt(self) -> str:
        """The prompt with thinking closed at once (the no-CoT mode)."""
        return f"{self.question}\n{THINK}\n{END}\nAnswer:"

    def lines(self) -> list[str]:
        """The chain: one line per hop, the edge followed."""
        return [f"{a} to {b}\n" for a, b in zip(self.path, self.path[1:])]

    def think(self) -> str:
        return "".join(self.lines())

    def completion(self, cot: bool = True) -> str:
        """What the model writes after ``prompt`` (eos added by the trainer); ``cot=False``:
        the no-CoT completion (thinking closed at once)."""
        return f"{self.think() if cot else ''}{END}\nAnswer: {self.answer}\n"


def sample_problem(rng: random.Random, hops: int | None = None) -> HopProblem:
    if hops is None:
        hops = rng.randint(MIN_HOPS, MAX_HOPS)
    if not MIN_HOPS <= hops <= MAX_HOPS:
        raise ValueError(f"hops must be in [{MIN_HOPS}, {MAX_HOPS}], got {hops}")
    targets = list(NODES)
    rng.shuffle(targets)
    f = dict(zip(NODES, targets))
    edges = list(f.items())
    rng.shuffle(edges)
    start = rng.choice(NODES)
    path = [start]
    for _ in range(hops):
        path.append(f[path[-1]])
    return HopProblem(tuple(edges), start, hops, tuple(path))


def _split(seed: int, salt: int, n: int, exclude=frozenset()) -> list[HopProblem]:
    rng = random.Random(seed ^ salt)
    out, seen = [], set(exclude)
    while len(out) < n:
        p = sample_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def held_out(seed: int, n: int = TEST_SIZE) -> list[HopProblem]:
    """``n`` distinct test problems from their own stream of ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return _split(seed, _TEST_SALT, n)


def validation(seed: int, n: int = VAL_SIZE) -> list[HopProblem]:
    """``n`` distinct validation problems, none of them a test problem."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return _split(seed, _VAL_SALT, n, exclude={p.question for p in held_out(seed, TEST_SIZE)})


def train_stream(seed: int, exclude=(), hops: int | None = None):
    """An endless stream of training problems (all of ``hops`` hops when given), none of
    whose questions is in ``exclude``."""
    rng = random.Random(seed)
    banned = {p.question if isinstance(p, HopProblem) else p for p in exclude}
    while True:
        p = sample_problem(rng, hops)
        if p.question not in banned:
            yield p


def excluded(seed: int) -> set:
    """The questions training must never see: the test and validation splits."""
    return {p.question for p in held_out(seed, TEST_SIZE)} | {p.question for p in validation(seed, VAL_SIZE)}


def parse_answer(text: str) -> str | None:
    """The node after the first "Answer:" in ``text``; None if there is none."""
    text = text or ""
    i = text.find("Answer:")
    if i < 0:
        return None
    rest = text[i + len("Answer:"):].lstrip(" ")
    return rest[0] if rest and rest[0] in NODES else None


# ------------------------------------------------------------------------------- tokenizer

# Each node letter, digit, punctuation mark, space and newline is one token; lowercase
# words and "Answer" are single tokens. Spaces and newlines are pieces of their own (cotrt
# reads each token's bytes from its piece).
_SPLIT = r"Answer|[a-z]+|[A-Z]|\d|\s|[^\sA-Za-z\d]"
_WORDS = ("Answer", "start", "hops", "to")


def vocabulary() -> list[str]:
    chars = list(NODES) + list("0123456789") + list(",:. \n")
    return [UNK, PAD, EOS, *_WORDS, *chars]


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the task's vocabulary, with ``<think>``,
    ``</think>`` and Coconut's three latent tokens as single added tokens (so the base
    model, Coconut and CCoT share one vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, pad_token=PAD, eos_token=EOS)
    tok.add_tokens([THINK, END, *LATENT_TOKENS], special_tokens=False)
    return tok


def check_tokenizer(tok) -> None:
    """Round-trip a chain; raise if the text or a marker does not survive."""
    p = sample_problem(random.Random(0))
    text = p.prompt + p.completion()
    ids = tok.encode(text, add_special_tokens=False)
    if tok.decode(ids) != text or UNK in tok.convert_ids_to_tokens(ids):
        raise ValueError("hops tokenizer does not round-trip its own chains")
    for marker in (THINK, END, *LATENT_TOKENS):
        if len(tok.encode(marker, add_special_tokens=False)) != 1:
            raise ValueError(f"hops tokenizer: {marker} is not a single token")


__all__ = ["END", "EOS", "LATENT_TOKENS", "MAX_HOPS", "MIN_HOPS", "NODES", "TEST_SIZE", "THINK", "VAL_SIZE",
           "HopProblem", "build_tokenizer", "check_tokenizer", "excluded", "held_out", "parse_answer",
           "sample_problem", "train_stream", "validation"]
