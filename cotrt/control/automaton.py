"""The token automaton: byte patterns (cues, stop strings, think delimiters) matched over token ids.

``cotrt._C`` compiles Aho-Corasick over bytes against a vocabulary into two tables over
``[n_states, vocab]``: the state after a token and the bitmask of patterns completed
inside it. Decoding then needs one gather per row per step, on any device, and never
detokenizes. Those tables cost 12 B x n_states x vocab (a 3,000-byte stop string: 1.8 GB
on a 49k vocabulary), so past ``DENSE_TABLE_BYTES`` an automaton keeps only the byte DFA
(~1 KiB a state) and computes each (state, token) entry on first use, memoized: host
lookups only, which is all the engine's rows need. Pattern sizes are capped
(``MAX_PATTERN_BYTES`` each, ``MAX_TOTAL_PATTERN_BYTES`` a request). A pattern spanning several tokens is reported on the token whose bytes
complete it; bit i of a mask stands for ``patterns[i]``.
"""
from __future__ import annotations

import bisect
import json
import re
import threading
import weakref
from collections import OrderedDict
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from cotrt import _C

MAX_PATTERNS = _C.MAX_PATTERNS  # 63: bit 63 of an int64 mask is the sign bit
# A stop string, step cue or policy cue: at most this many UTF-8 bytes; a request's
# patterns together at most MAX_TOTAL_PATTERN_BYTES. The lazy tables' DFA is then at most
# ~8.4 MB (int32 [8193, 256]) whatever the vocabulary.
MAX_PATTERN_BYTES = 1024
MAX_TOTAL_PATTERN_BYTES = 8192
# Dense [n_states, vocab] tables up to this size (~54 states on a 49k vocabulary: the
# think markers and a few cues); lazy ones past it.
DENSE_TABLE_BYTES = 32 << 20
# Memoized (state, token) entries a lazy automaton keeps before starting over.
LAZY_MEMO_ENTRIES = 1 << 16  # ~10 MB of dict entries; a request visits ~1 pair a token

_SP_SPACE = "\u2581"  # SentencePiece's '▁' stands for a space
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, int]:
    """str.translate table undoing GPT-2's bytes_to_unicode: each of the 256 stand-in
    characters maps to the latin-1 character of its byte, so ``.encode("latin-1")``
    finishes the job without a per-character Python loop (~20x faster on 49k tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = b
        else:
            table[256 + extra] = b
            extra += 1
    return table


def _component_types(tokenizer) -> set[str]:
    """Type names in the backend tokenizer's decoder and pre-tokenizer (nested Sequences
    included), e.g. {"ByteLevel"} or {"Sequence", "Replace", "ByteFallback", ...}."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    types: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                types.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for part in ("decoder", "pre_tokenizer"):
        component = getattr(backend, part, None) if backend is not None else None
        if component is not None:
            walk(json.loads(component.__getstate__()))
    return types


def _detect_style(tokenizer, pieces: Sequence[str | None]) -> str:
    """"byte_level", "sentencepiece" or "plain" (pieces are already the text)."""
    types = _component_types(tokenizer)
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"Metaspace", "ByteFallback"}:
        return "sentencepiece"
    # No backend (a Python tokenizer) or an unusual one: look at the pieces themselves.
    pieces = [p for p in pieces if p]
    if any(_SP_SPACE in p for p in pieces):
        return "sentencepiece"
    table = _byte_level_table()
    if pieces and all(ord(c) in table for p in pieces for c in p):
        return "byte_level"
    return "plain"


def _piece_bytes(piece: str, style: str) -> bytes:
    if style == "byte_level":
        try:
            return piece.translate(_byte_level_table()).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte map: keep it as text
            table = _byte_level_table()
            return b"".join(
                bytes([table[ord(c)]]) if ord(c) in table else c.encode("utf-8") for c in piece
            )
    if style == "sentencepiece":
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m is not None:
            return bytes([int(m.group(1), 16)])
        return piece.replace(_SP_SPACE, " ").encode("utf-8")
    return piece.encode("utf-8")


_TOKEN_BYTES_CACHE: dict[int, tuple[weakref.ref, int, list[bytes]]] = {}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id 0..len(tokenizer)-1 adds to decoded text, mid-stream.

    Byte-level BPE (GPT-2 style) pieces go back through the bytes_to_unicode map;
    SentencePiece pieces turn '▁' into a space and ``<0xNN>`` into byte NN (the space a
    Llama-style decoder strips from the very first token is kept: generated text is never
    first); added and special tokens are their content in UTF-8; ids the tokenizer does
    not know are b''. Cached per tokenizer object (and its length, which grows when tokens
    are added).
    """
    n = len(tokenizer)
    hit = _TOKEN_BYTES_CACHE.get(id(tokenizer))
    if hit is not None and hit[0]() is tokenizer and hit[1] == n:
        return hit[2]

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pieces = [backend.id_to_token(i) for i in range(n)]
    else:
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    style = _detect_style(tokenizer, [p for i, p in enumerate(pieces) if i not in added])
    out = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode("utf-8"))
        elif piece is None:
            out.append(b"")
        else:
            out.append(_piece_bytes(piece, style))

    try:
        ref = weakref.ref(tokenizer, lambda _, key=id(tokenizer): _TOKEN_BYTES_CACHE.pop(key, None))
    except TypeError:  # not weak-referenceable: do not cache
        return out
    _TOKEN_BYTES_CACHE[id(tokenizer)] = (ref, n, out)
    return out


def _as_pattern(p, where: str) -> bytes:
    if isinstance(p, str):
        return p.encode("utf-8")
    if isinstance(p, (bytes, bytearray, memoryview)):
        return bytes(p)
    raise TypeError(f"{where} must be bytes or str, got {type(p).__name__}")


def check_pattern_sizes(patterns: Sequence[bytes | str], where: str) -> None:
    """ValueError naming ``where`` when a pattern or the patterns together are too long."""
    total = 0
    for i, p in enumerate(patterns):
        n = len(_as_pattern(p, f"{where}[{i}]"))
        if n > MAX_PATTERN_BYTES:
            raise ValueError(f"{where}[{i}]: {n} bytes, at most {MAX_PATTERN_BYTES} a string")
        total += n
    if total > MAX_TOTAL_PATTERN_BYTES:
        raise ValueError(f"{where}: {total} bytes in all, at most {MAX_TOTAL_PATTERN_BYTES}")


def byte_dfa(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The byte-level Aho-Corasick DFA (failure links folded into the goto function):
    (go int32 [S, 256], out int64 [S], depth int32 [S]), as csrc/automaton.cpp builds it."""
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"patterns: at most {MAX_PATTERNS} patterns fit an int64 mask, got {len(patterns)}")
    n = 1 + sum(map(len, patterns))
    go = np.full((n, 256), -1, dtype=np.int32)
    out = np.zeros(n, dtype=np.int64)
    depth = np.zeros(n, dtype=np.int32)
    used = 1
    for i, p in enumerate(patterns):
        if not p:
            raise ValueError(f"patterns[{i}] is empty: an empty pattern would match everywhere")
        s = 0
        for c in p:
            if go[s, c] < 0:
                go[s, c] = used
                depth[used] = depth[s] + 1
                used += 1
            s = int(go[s, c])
        out[s] |= 1 << i
    go, out, depth = go[:used], out[:used], depth[:used]
    fail = np.zeros(used, dtype=np.int32)
    queue = [int(x) for x in go[0][go[0] >= 0]]  # depth-1 states fail to the root
    go[0][go[0] < 0] = 0
    head = 0
    while head < len(queue):  # BFS in depth order: a failure target is final first
        s = queue[head]
        head += 1
        out[s] |= out[fail[s]]
        row, frow = go[s], go[fail[s]]
        child = row >= 0
        fail[row[child]] = frow[child]
        queue.extend(int(x) for x in row[child])
        row[~child] = frow[~child]
    return go, out, depth


class _LazyTable:
    """``table[state, token]`` of a lazy automaton (one of next / emit), ``.shape``."""

    def __init__(self, owner: "Automaton", which: int):
        self._owner, self._which = owner, which
        self.shape = (owner.n_states, owner.vocab_size)

    def __getitem__(self, key):
        state, tok = key
        return self._owner._entry(int(state), int(tok))[self._which]


class Automaton:
    """Aho-Corasick over bytes, compiled for every (state, token) pair of a vocabulary.

    Tables (state 0 is the start):
      next_state  int32 [n_states, vocab]  state after consuming the token's bytes
      emit        int64 [n_states, vocab]  OR of bit i for each patterns[i] completed in the token
      depth       int32 [n_states]         bytes of the match in progress: the longest
                                           suffix of the text so far that is a prefix of a
                                           pattern (a whole one right after it completes)
    """

    def __init__(self, patterns: Sequence[bytes | str], vocab: Sequence[bytes], lazy: bool | None = None):
        """``lazy``: None picks dense tables when they fit ``DENSE_TABLE_BYTES``; True keeps
        only the byte DFA (``next_state``/``emit`` are then None: ``step`` cannot run, host
        lookups through ``host_next``/``host_emit`` and ``scan`` can)."""
        if isinstance(patterns, (str, bytes)):
            raise TypeError("patterns must be a list of bytes or str, not a single pattern")
        self.patterns: list[bytes] = [
            _as_pattern(p, f"patterns[{i}]") for i, p in enumerate(patterns)
        ]
        if len(self.patterns) > MAX_PATTERNS:
            raise ValueError(f"patterns: at most {MAX_PATTERNS} patterns fit an int64 mask, "
                             f"got {len(self.patterns)}")
        self.vocab_size = len(vocab)
        if lazy is None:  # states <= 1 + pattern bytes
            lazy = 12 * (1 + sum(map(len, self.patterns))) * self.vocab_size > DENSE_TABLE_BYTES
        self.lazy = lazy
        if lazy:
            self._go, self._out, depth = byte_dfa(self.patterns)
            self._vocab = vocab
            self._memo: dict[int, tuple[int, int]] = {}
            self.n_states = len(depth)
            self.next_state = self.emit = None
            self.depth = torch.from_numpy(depth)
            self.host_next, self.host_emit = _LazyTable(self, 0), _LazyTable(self, 1)
            return
        nxt, emit, depth = _C.compile_automaton(self.patterns, list(vocab))
        # Host copies for scan(); on CPU the tensors share their memory.
        self.host_next, self.host_emit = nxt, emit
        self.next_state = torch.from_numpy(nxt)
        self.emit = torch.from_numpy(emit)
        self.depth = torch.from_numpy(depth)
        self.n_states = nxt.shape[0]

    @property
    def nbytes(self) -> int:
        """Host memory of the tables (the DFA and memo when lazy)."""
        if self.lazy:
            return self._go.nbytes + self._out.nbytes + self.depth.numel() * 4 + 100 * len(self._memo)
        return self.host_next.nbytes + self.host_emit.nbytes + self.depth.numel() * 4

    def _entry(self, state: int, tok: int) -> tuple[int, int]:
        """(next state, emitted mask) of a lazy automaton, computed once per pair."""
        key = state * self.vocab_size + tok
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if not (0 <= state < self.n_states and 0 <= tok < self.vocab_size):
            raise IndexError(f"(state, token) ({state}, {tok}) outside [{self.n_states}, {self.vocab_size}]")
        go, out, s, mask = self._go, self._out, state, 0
        for b in self._vocab[tok]:
            s = int(go[s, b])
            mask |= int(out[s])
        if len(self._memo) >= LAZY_MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = hit = (s, mask)
        return hit

    def __repr__(self) -> str:
        return (f"Automaton({len(self.patterns)} patterns, {self.n_states} states, "
                f"vocab {self.vocab_size}, device {self.next_state.device})")

    def to(self, device) -> "Automaton":
        """Moves the tables to `device` in place (like nn.Module.to) and returns self."""
        if self.lazy:
            raise ValueError("a lazy automaton (patterns past DENSE_TABLE_BYTES) has no device tables")
        self.next_state = self.next_state.to(device)
        self.emit = self.emit.to(device)
        self.depth = self.depth.to(device)
        return self

    def bit(self, pattern: bytes | str) -> int:
        """The mask bit of `pattern` (the OR of its bits if it was given more than once)."""
        p = _as_pattern(pattern, "pattern")
        mask = sum(1 << i for i, q in enumerate(self.patterns) if q == p)
        if mask == 0:
            raise ValueError(f"pattern {p!r} is not one of this automaton's patterns")
        return mask

    def step(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(state [B] any int dtype, tokens [B] int64) -> (new_state [B], emitted [B] int64),
        new_state in state's dtype.

        A pure gather on the tables' device: no host sync, so it can sit in a CUDA graph.
        Token ids must be < vocab_size (they are not checked: that would need a sync).
        """
        if self.lazy:
            raise ValueError("a lazy automaton (patterns past DENSE_TABLE_BYTES) has no device tables")
        flat = state.long() * self.vocab_size + tokens
        return torch.take(self.next_state, flat).to(state.dtype), torch.take(self.emit, flat)

    def scan(self, token_ids: Sequence[int], state: int = 0) -> tuple[int, list[int]]:
        """Host-side run over `token_ids` from `state`: (final state, emitted mask per token)."""
        if not 0 <= state < self.n_states:
            raise ValueError(f"state: {state} is outside [0, {self.n_states})")
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token_ids: ids must lie in [0, {self.vocab_size})")
        masks = []
        for t in ids.tolist():
            masks.append(int(self.host_emit[state, t]))
            state = int(self.host_next[state, t])
        return state, masks


def scan_ref(patterns: Sequence[bytes | str], vocab: Sequence[bytes],
             token_ids: Sequence[int]) -> list[int]:
    """Reference for Automaton(...).scan(token_ids)[1] from the start state, by brute force:
    every occurrence of every pattern in the concatenated token bytes, reported on the
    token that holds its last byte. O(len(text) * len(patterns)); the test oracle."""
    patterns = [_as_pattern(p, f"patterns[{i}]") for i, p in enumerate(patterns)]
    pieces = [vocab[t] for t in token_ids]
    ends, total = [], 0  # ends[j]: byte offset one past token j
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    text = b"".join(pieces)
    masks = [0] * len(pieces)
    for i, p in enumerate(patterns):
        start = text.find(p)
        while start >= 0:
            last = start + len(p) - 1
            masks[bisect.bisect_right(ends, last)] |= 1 << i
            start = text.find(p, start + 1)  # + 1: occurrences may overlap
    return masks


_COMPILED: OrderedDict[tuple, tuple[weakref.ref | None, Automaton]] = OrderedDict()
_COMPILED_LOCK = threading.Lock()
# Each entry is at most ~DENSE_TABLE_BYTES (dense) or ~9 MB plus its memo (lazy), so the
# cache holds at most ~0.5 GB.
COMPILE_CACHE_SIZE = 16


def compile_cached(patterns: tuple, tokenizer) -> Automaton:
    """An Automaton for `patterns` over `tokenizer`'s vocabulary, from an LRU cache keyed
    by (tokenizer, patterns): stop strings are per request, but requests repeat them."""
    patterns = tuple(_as_pattern(p, f"patterns[{i}]") for i, p in enumerate(patterns))
    key = (id(tokenizer), len(tokenizer), patterns)
    with _COMPILED_LOCK:
        hit = _COMPILED.get(key)
        if hit is not None and (hit[0] is None or hit[0]() is tokenizer):
            _COMPILED.move_to_end(key)
            return hit[1]
    automaton = Automaton(list(patterns), token_bytes(tokenizer))
    try:
        ref = weakref.ref(tokenizer)
    except TypeError:
        ref = None
    with _COMPILED_LOCK:
        _COMPILED[key] = (ref, automaton)
        _COMPILED.move_to_end(key)
        while len(_COMPILED) > COMPILE_CACHE_SIZE:
            _COMPILED.popitem(last=False)
    return automaton
