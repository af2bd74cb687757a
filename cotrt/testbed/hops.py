"""The latent testbed's task: apply k fixed permutations in turn (k = 3 to 5 hops).

The task's world has N = 16 nodes (letters A-P) and NUM_OPS = 4 fixed permutations of them
(drawn once from a constant seed: the same for every problem and every training seed, the
model's "knowledge"). A problem names a start node and a sequence of k ops, padded with
"." to MAX_HOPS; each op is written with a token of its hop's class (hop 1's four ops are
a-d, hop 2's e-h, ..., hop 5's q-t: OP_TOKENS), so a token names both its permutation and
its hop. The answer is the node reached::

    start I, ops cel..
    <think>
    M
    2:eME
    3:lEC
    </think>
    Answer: C

The chain (CoT) is one step a hop. Step i opens with the node hop i reaches, then sets up
hop i + 1: its index, ``:``, its op token (copied from the question by class), the node
again, after which the model writes the next node (the one lookup a step needs: op applied
to the token just before it). The last step is its node alone. So the chain's steps are
``M\n2:eM``, ``E\n3:lE``, ``C\n`` (6 tokens, the last 2): 6k - 3 think tokens with
``</think>``. Answering at once (no-CoT) needs the k permutations composed inside one forward:
16 * 4^k problems per hop count (16,384 at k = 5), too many to memorise.

Why steps open with their node: a Coconut thought that replaces step i is the final-norm
state that, in CoT, predicts step i's first token; with tied embeddings it points at that
token, so here it points at the node reached, and the thought's position (input ~ node i)
must produce node i + 1, what CoT's last position of a step does (input: node i). Coconut
uses no end token (latent_train.coconut_latent), so at every curriculum stage the last
thought's state predicts the next step's node and the loss supervises that hop directly.
Dropping the end token matters: with ``<|end-latent|>`` forced (as before), this layout reached
0.980 at Coconut's last stage on seed 0 but 0.060 and 0.065 on seeds 1 and 2 (validation;
their loss flat at ~0.35 from stage 3, as with the 8-token lines); without it, 0.935,
0.975, 0.930. (The earlier layouts below were tried only with the end token.)
With k thoughts (plus its own ``</think>``) Coconut spends k + 1 positions against CoT's
6k - 3: 23.7% on the 200-problem splits (mean k 4.03).

Designs that failed on this CPU budget (facts, not code): edges of a per-problem graph
listed in the prompt (``A>F,...`` with lines ``A to F``, or one token per edge) need an
in-context lookup (an induction circuit), which a 0.8M-parameter Llama had not learned
after 500-700 steps at batch 32 (CoT accuracy 0.06-0.085, chance 0.0625); one fixed
successor map over 256 nodes (a problem is only a start and k: 768 problems) was learned,
but the models memorised the 368 training problems (Coconut stage 5: 1.00 on training
problems, 0.125 held out); 16 keyed permutations (a 256-entry table) were not learned in
600 steps.

Chain layouts tried for the latent line (seed 0, 200 validation problems; Coconut 200 steps
a stage, 400 the last): one token a hop (``EHC``): Coconut's last stage 0.972 (3 seeds,
held out) but at 101% of CoT's think positions. 8-token lines carrying the node reached and
the ops left (``E, 41..``; branch issue18-lat): CoT 0.855 (3 seeds), Coconut's loss flat at
~0.35 from stage 3, last stage 0.047. With the hop-tagged op tokens: 5-token lines
``1aHI`` (index, op, node before, node after) with ``<|end-latent|>`` forced: CoT 1.000,
no-CoT 0.070, Coconut stages 1/2/3/5 0.285/0.165/0.085/0.095 (each thought is the state
predicting a hop index, not a node). Node-first steps ``E\n2fE>`` (the next node written
after ``>``, not after the node) with ``<|end-latent|>``: CoT 0.915 (1000 steps), stages
1/2/5 0.220/0.080/0.080; at stage 1 the first token after the end token, the next node, was
wrong in most rows. The layout above (1200 steps), with ``<|end-latent|>``: stages 1-5
0.695/0.670/1.000/1.000/0.980 (seeds 1 and 2: 0.735/0.180/0.040/0.070/0.060 and
0.385/0.080/0.055/0.075/0.065); with no end token: CoT 1.000, no-CoT 0.045, Coconut stages 1-5 0.575/1.000/0.640/1.000/0.935 at
23.7% of CoT's positions (seeds 1 and 2, stage 5: 0.975, 0.930; CoT 0.975, 1.000; no-CoT
0.070, 0.085). CCoT, trained by a curriculum of its own (latent_train.train_ccot), learns it too.

Problems come from a seeded ``random.Random``; the held-out test and validation splits are
drawn from their own streams and excluded from training.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NODES = "ABCDEFGHIJKLMNOP"  # N = 16 node names, one token each
NUM_OPS = 4  # ops "1".."4"
MIN_HOPS, MAX_HOPS = 3, 5
# The op tokens: op p at hop h is written OP_TOKENS[NUM_OPS * (h - 1) + p - 1] (hop 1's four
# ops are a-d, hop 2's e-h, ..., hop 5's q-t), so an op token names its hop as well as its
# permutation and a chain line finds its op by content, not at a distance.
OP_TOKENS = "abcdefghijklmnopqrst"
THINK, END = "<think>", "</think>"
EOS, PAD, UNK = "<eos>", "<pad>", "<unk>"
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")  # Coconut's, in its order
TEST_SIZE, VAL_SIZE = 200, 200
_TEST_SALT, _VAL_SALT = 0x40B5, 0x7A11
_WORLD_SEED = 0xF00D


def _world() -> dict:
    rng = random.Random(_WORLD_SEED)
    ops = {}
    for i in range(1, NUM_OPS + 1):
        targets = list(NODES)
        rng.shuffle(targets)
        ops[str(i)] = dict(zip(NODES, targets))
    return ops


OPS = _world()  # op name -> {node: node}


@dataclass(frozen=True)
class HopProblem:
    """ops: the k op names applied in turn; path: the k + 1 nodes visited."""

    start: str
    ops: tuple
    path: tuple

    @property
    def hops(self) -> int:
        return len(self.ops)

    @property
    def answer(self) -> str:
        return self.path[-1]

    def op_token(self, hop: int) -> str:
        """The token of op number ``hop`` (1-based): its permutation, in hop ``hop``'s class."""
        return op_token(hop, self.ops[hop - 1])

    @property
    def question(self) -> str:
        ops = "".join(self.op_token(h) for h in range(1, self.hops + 1))
        return f"start {self.start}, ops {ops}{'.' * (MAX_HOPS - self.hops)}"

    @property
    def prompt(self) -> str:
        """The raw-text prompt: the question, then thinking opened."""
        return f"{self.question}\n{THINK}\n"

    @property
    def no_cot_prompt(self) -> str:
        """The prompt with thinking closed at once (the no-CoT mode)."""
        return f"{self.question}\n{THINK}\n{END}\nAnswer:"

    def lines(self) -> list[str]:
        """The chain's steps, one a hop: step i opens with the node hop i reaches, then sets up
        hop i + 1 (hop index, ``:``, op token, the node again), whose node, opening step i + 1,
        the model writes next; the last step is its node alone. ``E\n2:fE`` ``H\n3:kH``
        ``C\n`` reads as the lines ``E``, ``2:fEH`` (hop 2 applies f to E: H), ``3:kHC``.
        Every step but the last is 6 tokens (the last is 2)."""
        out = []
        for i in range(1, self.hops + 1):
            node = self.path[i]
            nxt = f"{i + 1}:{self.op_token(i + 1)}{node}" if i < self.hops else ""
            out.append(f"{node}\n{nxt}")
        return out

    def think(self) -> str:
        return "".join(self.lines())

    def completion(self, cot: bool = True) -> str:
        """What the model writes after ``prompt`` (eos added by the trainer); ``cot=False``:
        the no-CoT completion (thinking closed at once)."""
        return f"{self.think() if cot else ''}{END}\nAnswer: {self.answer}\n"


def op_token(hop: int, op: str) -> str:
    """The token of permutation ``op`` ("1".."4") applied at hop ``hop`` (1-based)."""
    if not 1 <= hop <= MAX_HOPS or op not in OPS:
        raise ValueError(f"op_token: hop must be in [1, {MAX_HOPS}] and op in {sorted(OPS)}, got {hop}, {op!r}")
    return OP_TOKENS[NUM_OPS * (hop - 1) + int(op) - 1]


def solve(start: str, ops) -> tuple:
    """The path from ``start`` through ``ops``."""
    path = [start]
    for o in ops:
        path.append(OPS[o][path[-1]])
    return tuple(path)


def sample_problem(rng: random.Random, hops: int | None = None) -> HopProblem:
    if hops is None:
        hops = rng.randint(MIN_HOPS, MAX_HOPS)
    if not MIN_HOPS <= hops <= MAX_HOPS:
        raise ValueError(f"hops must be in [{MIN_HOPS}, {MAX_HOPS}], got {hops}")
    start = rng.choice(NODES)
    ops = tuple(rng.choice(sorted(OPS)) for _ in range(hops))
    return HopProblem(start, ops, solve(start, ops))


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

# Each node letter, op letter, digit, punctuation mark, space and newline is one token;
# "start", "ops" and "Answer" are single tokens (an op string never spells "ops": o and p are
# both hop 4's). Spaces and newlines are pieces of their own (cotrt reads each token's bytes
# from its piece).
_SPLIT = r"Answer|start|ops|[a-z]|[A-Z]|\d|\s|[^\sA-Za-z\d]"
_WORDS = ("Answer", "start", "ops")


def vocabulary() -> list[str]:
    chars = list(NODES) + list(OP_TOKENS) + list("0123456789") + list(",:.> \n")
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


__all__ = ["END", "EOS", "LATENT_TOKENS", "MAX_HOPS", "MIN_HOPS", "NODES", "NUM_OPS", "OPS", "OP_TOKENS", "TEST_SIZE",
           "THINK", "VAL_SIZE", "HopProblem", "build_tokenizer", "check_tokenizer", "excluded", "held_out", "op_token",
           "parse_answer", "sample_problem", "solve", "train_stream", "validation"]
