"""The token automaton: toy vocabularies, the real SmolLM2 vocabulary against a brute-force
oracle (scan_ref), and the byte mappings of byte-level and SentencePiece tokenizers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cotrt import _C
from cotrt.control.automaton import (
    Automaton,
    compile_cached,
    scan_ref,
    token_bytes,
)

# Toy vocabulary: single bytes, pattern pieces, a token with a whole pattern inside text,
# UTF-8 halves of "é" (c3 a9) and an empty token.
TOY = [b"", b"a", b"h", b"e", b"s", b"r", b"x", b"he", b"she", b"rs", b"aa", b"xhersx",
       b"\xc3", b"\xa9", "é".encode(), b"\n", b"\n\n", b"W", b"ai", b"t", b" ", b"Wait"]
ID = {b: i for i, b in enumerate(TOY)}


def ids(*pieces: bytes) -> list[int]:
    return [ID[p] for p in pieces]


def bits(a: Automaton, *patterns) -> int:
    return sum(a.bit(p) for p in patterns)


# --- toy vocabulary -----------------------------------------------------------------


def test_pattern_inside_one_token():
    a = Automaton([b"Wait"], TOY)
    assert a.scan(ids(b"x", b"Wait", b"x")) == (0, [0, a.bit(b"Wait"), 0])


@pytest.mark.parametrize("pieces", [(b"W", b"ait"), (b"Wa", b"it"), (b"W", b"ai", b"t")])
def test_pattern_split_across_tokens(pieces):
    vocab = TOY + [b"ait", b"Wa", b"it"]
    a = Automaton([b"Wait"], vocab)
    token_ids = [vocab.index(p) for p in pieces]
    state, masks = a.scan(token_ids)
    assert masks == [0] * (len(pieces) - 1) + [1]
    # Mid-match the state remembers how many bytes of the pattern are in progress.
    mid, _ = a.scan(token_ids[:-1])
    assert a.depth[mid] == sum(len(p) for p in pieces[:-1])


def test_token_holds_pattern_and_surrounding_text():
    a = Automaton(["he", "she", "hers"], TOY)
    _, masks = a.scan(ids(b"xhersx"))
    assert masks == [bits(a, "he", "hers")]


def test_overlapping_patterns():
    a = Automaton([b"aa"], TOY)
    # "aaa" holds "aa" twice (ending at bytes 1 and 2): one bit per token that ends one.
    assert a.scan(ids(b"a", b"a", b"a"))[1] == [0, 1, 1]
    assert a.scan(ids(b"a", b"aa"))[1] == [0, 1]
    a = Automaton(["he", "she", "hers"], TOY)
    _, masks = a.scan(ids(b"s", b"he", b"rs"))
    assert masks == [0, bits(a, "he", "she"), bits(a, "hers")]


def test_pattern_suffix_of_another():
    a = Automaton(["she", "he", "e"], TOY)
    assert a.scan(ids(b"s", b"h", b"e"))[1] == [0, 0, bits(a, "she", "he", "e")]
    assert a.scan(ids(b"x", b"e"))[1] == [0, bits(a, "e")]


def test_multibyte_utf8_split_mid_character():
    a = Automaton(["é", "\n\n"], TOY)
    assert a.scan(ids(b"\xc3", b"\xa9"))[1] == [0, a.bit("é")]
    assert a.scan(ids("é".encode()))[1] == [a.bit("é")]
    assert a.scan(ids(b"\n", b"\n", b"\n"))[1] == [0, 2, 2]


def test_empty_tokens_keep_state_and_emit_nothing():
    a = Automaton([b"Wait"], TOY)
    assert torch.equal(a.next_state[:, ID[b""]], torch.arange(a.n_states, dtype=torch.int32))
    assert not a.emit[:, ID[b""]].any()
    assert a.scan(ids(b"W", b"", b"ai", b"", b"t"))[1] == [0, 0, 0, 0, 1]


def test_duplicate_patterns_share_a_bit_query():
    a = Automaton([b"he", b"x", b"he"], TOY)
    assert a.bit(b"he") == 0b101
    assert a.scan(ids(b"he"))[1] == [0b101]


def test_tables():
    a = Automaton(["he", "she", "hers"], TOY)
    # States: root, h, he, s, sh, she, her, hers.
    assert a.n_states == 8
    assert a.next_state.dtype == torch.int32 and a.next_state.shape == (8, len(TOY))
    assert a.emit.dtype == torch.int64 and a.emit.shape == (8, len(TOY))
    assert a.depth.dtype == torch.int32 and sorted(a.depth.tolist()) == [0, 1, 1, 2, 2, 3, 3, 4]
    assert int(a.next_state.max()) < a.n_states and int(a.next_state.min()) >= 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_step_matches_scan(dtype):
    a = Automaton(["he", "she", "hers", "aa"], TOY)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, len(TOY), size=(5, 17))  # odd batch and length
    state = torch.zeros(5, dtype=dtype)
    emitted = []
    for t in range(seqs.shape[1]):
        state, e = a.step(state, torch.from_numpy(seqs[:, t]))
        assert state.dtype == dtype and e.dtype == torch.int64 and e.shape == (5,)
        emitted.append(e)
    emitted = torch.stack(emitted, 1)
    for b in range(5):
        final, masks = a.scan(seqs[b].tolist())
        assert int(state[b]) == final and emitted[b].tolist() == masks
    # Non-contiguous inputs gather the same.
    s2 = torch.zeros(10, dtype=dtype)[::2]
    tok = torch.from_numpy(seqs[:, :2].copy()).t()[0]
    assert torch.equal(a.step(s2, tok)[1], a.step(torch.zeros(5, dtype=dtype), tok.contiguous())[1])


def test_scan_from_a_state_continues_the_match():
    a = Automaton([b"Wait"], TOY)
    mid, _ = a.scan(ids(b"W", b"ai"))
    final, masks = a.scan(ids(b"t"), state=mid)
    assert masks == [1] and a.depth[final] == 4  # a just-completed match keeps its depth
    assert a.scan(ids(b"x"), state=final) == (0, [0])


def test_errors():
    with pytest.raises(ValueError, match=r"patterns\[1\] is empty"):
        Automaton([b"a", b""], TOY)
    with pytest.raises(ValueError, match="at most 63"):
        Automaton([bytes([i % 256, i // 256]) for i in range(64)], TOY)
    with pytest.raises(ValueError, match="at most 63"):
        _C.compile_automaton([b"a"] * 64, TOY)
    Automaton([bytes([i]) for i in range(63)], TOY)  # 63 is fine: bit 62 is the last
    with pytest.raises(TypeError, match=r"patterns\[0\]"):
        Automaton([3], TOY)
    with pytest.raises(TypeError, match="single pattern"):
        Automaton("Wait", TOY)
    with pytest.raises(TypeError, match=r"vocab\[1\] must be bytes"):
        Automaton([b"a"], [b"a", "b"])
    a = Automaton([b"Wait"], TOY)
    with pytest.raises(ValueError, match="not one of"):
        a.bit(b"Stop")
    with pytest.raises(ValueError, match="token_ids"):
        a.scan([len(TOY)])
    with pytest.raises(ValueError, match="state"):
        a.scan([0], state=a.n_states)


def test_to_moves_tables():
    a = Automaton([b"Wait"], TOY)
    assert a.to(torch.device("cpu")) is a and a.next_state.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_on_cuda():
    a = Automaton(["he", "she", "hers"], TOY)
    tokens = torch.tensor(ids(b"s", b"he", b"rs"))
    expect = a.scan(tokens.tolist())[1]
    a.to("cuda")
    state = torch.zeros(1, dtype=torch.int32, device="cuda")
    got = []
    for t in tokens.cuda():
        state, e = a.step(state, t.view(1))
        got.append(e)
    assert torch.cat(got).tolist() == expect


# --- the real SmolLM2 vocabulary ----------------------------------------------------

# b"answer" lies inside b"Final answer:": its hits come through the suffix (dictionary) links.
PATTERNS = [b"\n\n", b"Wait", b"Alternatively", b"</think>", b"<think>", b"Final answer:",
            "é".encode(), b" the", b"answer"]
TEXTS = [
    "Let me think.\n\nWait, the answer is 7. Alternatively, the café is closed.",
    "<think>First, the sum.</think>\n\nFinal answer: 42",
    "Wait\n\n\n\nWaitWait the the thethe é é éé",
    "Résumé of the day: naïve café, déjà vu.\n\nAlternatively: Final answer:\tnone",
    "def f(x):\n    return x  # the end\n\n\nprint(f'{é}')",
]


@pytest.fixture(scope="module")
def smol():
    from cotrt.models import load_tokenizer

    tok = load_tokenizer("default", quiet=True)
    vocab = token_bytes(tok)
    return tok, vocab, Automaton(PATTERNS, vocab)


def test_smollm2_token_bytes_round_trip(smol):
    tok, vocab, _ = smol
    assert len(vocab) == len(tok)
    more = ["Hello, world! 你好，世界 🙂🚀", "  leading spaces\ttabs\r\nCRLF", "x" * 50 + " ü∑ß∂"]
    for text in TEXTS + more:
        token_ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(vocab[i] for i in token_ids).decode() == tok.decode(token_ids) == text
    assert vocab[tok.convert_tokens_to_ids("<|im_end|>")] == b"<|im_end|>"


def _piece_ids(vocab: list[bytes]) -> list[int]:
    """Tokens that are a piece of a pattern or hold a whole one (inside other text)."""
    return [i for i, b in enumerate(vocab) if b and any(b in p or p in b for p in PATTERNS)]


def test_smollm2_matches_brute_force(smol):
    tok, vocab, a = smol
    pieces = _piece_ids(vocab)
    encoded = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    rng = np.random.default_rng(1234)
    hit = 0
    for _ in range(1000):
        seq: list[int] = []
        while len(seq) < rng.integers(1, 60):
            kind = rng.integers(3)
            if kind == 0:
                seq.append(int(rng.integers(len(vocab))))
            elif kind == 1:
                seq.extend(int(i) for i in rng.choice(pieces, size=rng.integers(1, 4)))
            else:
                e = encoded[rng.integers(len(encoded))]
                lo = int(rng.integers(len(e)))
                seq.extend(e[lo: lo + int(rng.integers(1, 12))])
        state, masks = a.scan(seq)
        expect = scan_ref(PATTERNS, vocab, seq)
        if masks != expect:
            j = next(j for j, (m, x) in enumerate(zip(masks, expect)) if m != x)
            pytest.fail(f"token {j} of {seq}: emit {masks[j]:#b}, brute force {expect[j]:#b}; "
                        f"bytes {[vocab[t] for t in seq[: j + 1]]}")
        # depth[state]: the longest suffix of the text that is a prefix of a pattern (or one).
        text = b"".join(vocab[t] for t in seq)
        longest = max((k for p in PATTERNS for k in range(1, len(p) + 1) if text.endswith(p[:k])),
                      default=0)
        assert a.depth[state] == longest
        for m in expect:
            hit |= m
    # The sampling must hit every pattern, or the comparison proves little.
    assert hit == (1 << len(PATTERNS)) - 1, f"patterns never sampled: {hit:#b}"


def test_smollm2_compile_is_fast_and_cached(smol):
    import time

    tok, vocab, _ = smol
    t0 = time.perf_counter()
    a = compile_cached(tuple(PATTERNS), tok)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"compile took {elapsed:.2f} s"  # ~0.1 s on 2 cores; slack for CI
    assert compile_cached(tuple(PATTERNS), tok) is a
    assert compile_cached((b"Wait",), tok) is not a


# --- SentencePiece-style and Python tokenizers --------------------------------------


def _sentencepiece_tokenizer(metaspace_decoder: bool):
    """A tiny Llama-2-style (Replace/ByteFallback/Fuse/Strip decoder) or Mistral-style
    (Metaspace decoder) Unigram tokenizer with byte fallback, built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁the", "▁caf", "▁Wait", "▁W", "ait", "▁", "a", "e", "h", "t", "W", "i", "s", "c", "f"]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    vocab += [(w, -float(len(words) - k)) for k, w in enumerate(words)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    if metaspace_decoder:
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    else:
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                        decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.add_tokens(["<think>"])
    return tok


@pytest.mark.parametrize("metaspace_decoder", [False, True])
def test_sentencepiece_token_bytes(metaspace_decoder):
    tok = _sentencepiece_tokenizer(metaspace_decoder)
    vocab = token_bytes(tok)
    assert token_bytes(tok) is vocab  # cached per tokenizer
    assert len(vocab) == len(tok)
    assert vocab[tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert vocab[tok.convert_tokens_to_ids("▁the")] == b" the"
    assert vocab[tok.convert_tokens_to_ids("<think>")] == b"<think>"
    assert vocab[tok.convert_tokens_to_ids("</s>")] == b"</s>"
    if not metaspace_decoder:  # the Metaspace decoder does not undo byte fallback
        text = "Wait the café\n"
        token_ids = tok.encode(text, add_special_tokens=False)
        assert "<0xC3>" in tok.convert_ids_to_tokens(token_ids)  # é went through byte fallback
        joined = b"".join(vocab[i] for i in token_ids)
        # The decoder strips the space of the very first '▁'; mid-stream it is kept.
        assert joined == b" " + text.encode() and tok.decode(token_ids) == text
        a = Automaton(["é", " the", "Wait"], vocab)
        assert a.scan(token_ids)[1] == scan_ref(a.patterns, vocab, token_ids)
        assert int(np.bitwise_or.reduce(a.scan(token_ids)[1])) == 0b111


class _PythonTokenizer:
    """No backend_tokenizer: the style is read off the pieces; id 4 is unknown."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.added_tokens_decoder = {}

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, token_ids):
        return [self.pieces[i] for i in token_ids]


@pytest.mark.parametrize("pieces, expect", [
    (["Ġthe", "Ċ", "Ã©", "a", None], [b" the", b"\n", "é".encode(), b"a", b""]),
    (["▁the", "<0x0A>", "é", "a", None], [b" the", b"\n", "é".encode(), b"a", b""]),
])
def test_style_from_pieces(pieces, expect):
    assert token_bytes(_PythonTokenizer(pieces)) == expect
