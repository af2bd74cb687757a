"""The decode step as a CUDA graph.

On a GPU, one decode step of a small model is hundreds of small kernels (per layer: two
norms, four to seven projections, rotary, the cache write, attention, the MLP); HF's eager
loop spends most of a step launching them. ``DecodeGraphs`` captures the step once per
batch bucket and replays it with one launch.

What makes the step capturable:

- every input is a preallocated device buffer refilled in place: token ids and positions
  (one host-to-device copy of a ``[2, B]`` pinned tensor), block tables (``[B,
  max_pages]``, one more copy), valve alphas and adapter indices
  (``ValveState.reserve_static``), latent inputs (``[B, 1, E]``);
- attention reads the paged cache by block table and per-row length (``StepMeta.lengths``:
  the decode_attention op, or flash-attn's paged kv-cache kernel), so no shape depends on
  how long the rows are, and the cache write is a scatter at device positions computed on
  the device from the tables;
- rows are padded to the bucket with dummy rows on the cache's scratch page.

The captured part is the decoder forward, the LM head of every row (fp32 logits) and,
when every sampling row allows it, the sampling: each row's logit biases and banned tokens
(at most ``MAX_BIASES``, scattered from a buffer), then the argmax ("greedy") or a seeded
draw without top-k / top-p ("plain"): ``sampler.sample_captured``, fed the spec that
``Sampler.captured`` built (cotrt/engine/sampler.py). Otherwise (top-k, top-p,
many biases) the engine samples the captured logits itself. The token automaton and the
controls run after the step: they make host decisions on the sampled tokens, and the
step's one sync is reading those tokens. Prefill and probe starts (several tokens a row)
stay eager.

Graphs are keyed by (bucket, valve active, latent inputs, tapped layers, sampling mode)
and captured on first use. Loading or unloading a valve moves the adapter banks: every graph is dropped
and recaptured (``sync_valves``). A key whose capture fails (a model whose forward reads
values on the host, e.g. dynamic RoPE scaling) is remembered and runs eagerly.

``mode="static"`` runs the very same static-shape step without capturing: how the CPU
tests check it against the eager path, and a debugging aid on a GPU.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .sampler import MAX_BIASES, sample_captured

MODES = ("auto", "cuda", "static", "off")
_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def buckets(max_rows: int) -> list[int]:
    """Batch sizes to capture: the fixed ladder below ``max_rows``, then ``max_rows``."""
    return [b for b in _BUCKETS if b < max_rows] + [max_rows]


def resolve_mode(mode: str, device: torch.device) -> str:
    """``decode_graph`` as given to ``cotrt.wrap`` -> "cuda", "static" or "off"."""
    if mode not in MODES:
        raise ValueError(f"decode_graph must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "off"
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"decode_graph='cuda' needs the model on a CUDA device, it is on {device}")
    return mode


@dataclass
class _Entry:
    graph: object  # torch.cuda.CUDAGraph, or None in static mode
    hidden: torch.Tensor  # [B, H] the captured outputs (overwritten by each replay)
    logits: torch.Tensor  # [B, V] fp32 (biased when the step samples)
    tapped: dict  # layer -> [B, H]
    tokens: torch.Tensor | None  # [B] int64 when the step samples


class DecodeGraphs:
    """Captured (or static-shape eager) decode steps of one ModelRunner.

        graphs = DecodeGraphs(runner, capture=True)
        key = graphs.key(len(tables), valve=False, latent=False, taps=(), sampling="greedy")
        hidden, logits, tapped, next_tokens = graphs.run(key, tables, tokens, starts,
                                                         sampling=[(0.0, 0, 0, ())] * len(tables))
    """

    def __init__(self, runner, capture: bool):
        if capture and runner.device.type != "cuda":
            raise ValueError(f"DecodeGraphs: capture needs a CUDA model, it is on {runner.device}")
        self.runner = runner
        self.capture = capture
        self.buckets = buckets(runner.max_batch)
        self.max_rows = self.buckets[-1]
        dev, n = runner.device, self.max_rows
        self._host = torch.zeros(2, n, dtype=torch.long, pin_memory=capture)  # ids, starts
        self._dev = torch.zeros(2, n, dtype=torch.long, device=dev)
        self._tables_host = torch.zeros(n, runner.max_pages, dtype=torch.long, pin_memory=capture)
        self._tables = torch.zeros(n, runner.max_pages, dtype=torch.long, device=dev)
        self._lengths = torch.zeros(n, dtype=torch.long, device=dev)
        self._write_pages = torch.zeros(n, dtype=torch.long, device=dev)
        self._write_offs = torch.zeros(n, dtype=torch.long, device=dev)
        self._embeds = torch.zeros(n, 1, runner.embed.weight.shape[1], dtype=runner.dtype, device=dev)
        # Sampling inputs, per row: [seed, counter, bias ids...] and [temperature, bias values...].
        self._s_host_i = torch.zeros(n, 2 + MAX_BIASES, dtype=torch.long, pin_memory=capture)
        self._s_host_f = torch.zeros(n, 1 + MAX_BIASES, dtype=torch.float32, pin_memory=capture)
        self._s_i = torch.zeros(n, 2 + MAX_BIASES, dtype=torch.long, device=dev)
        self._s_f = torch.zeros(n, 1 + MAX_BIASES, dtype=torch.float32, device=dev)
        self._metas: dict[int, object] = {}
        self._entries: dict[tuple, _Entry] = {}
        self._failed: dict[tuple, str] = {}
        self._pool = None
        self._valve_generation = 0
        self.stats = {"captures": 0, "replays": 0, "static_steps": 0}

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"DecodeGraphs: {n} rows exceed max_batch={self.max_rows}")

    def sync_valves(self, generation: int) -> None:
        """Drop every graph when the valves changed since they were captured."""
        if generation != self._valve_generation:
            self._entries.clear()
            self._failed.clear()
            self._valve_generation = generation

    def failed(self, key: tuple) -> bool:
        return key in self._failed

    def key(self, n: int, valve: bool, latent: bool, taps: tuple, sampling: str | None = None) -> tuple:
        if sampling not in (None, "greedy", "plain"):
            raise ValueError(f"DecodeGraphs.key: sampling must be None, 'greedy' or 'plain', got {sampling!r}")
        return (self.bucket(n), bool(valve), bool(latent), tuple(taps), sampling)

    # -- the step --------------------------------------------------------------------------
    def run(self, key: tuple, tables: list[list[int]], tokens: list[int], starts: list[int],
            embeds: torch.Tensor | None = None, sampling: list | None = None):
        """One decode step of ``n = len(tables)`` rows (n <= the key's bucket).

        Args:
            key: from :meth:`key` (the caller set the valve state for the bucket's rows).
            tables, tokens, starts: per row, its block table (covering ``start + 1``
                positions), the input token and its position.
            embeds: ``[n, E]`` input embeddings when the key has latent inputs (token rows
                carry E[tok] there), else None.
            sampling: when the key samples, per row ``(temperature, seed, counter,
                [(token id, logit bias), ...])`` (-inf bans a token; rows that do not sample
                pass temperature 0 and no biases), else None.

        Returns ``(hidden [n, H], logits fp32 [n, V], {layer: [n, H]}, tokens [n] or None)``,
        or None when this key cannot be captured (the caller runs its eager step). Hidden
        and tapped states are fresh tensors; ``logits`` and ``tokens`` may be views of the
        graph's outputs, valid until the next step.
        """
        B, valve, latent, taps, mode = key
        n = len(tables)
        if latent != (embeds is not None):
            raise ValueError("DecodeGraphs.run: embeds must be given exactly when the key has latent inputs")
        if (mode is not None) != (sampling is not None) or (sampling is not None and len(sampling) != n):
            raise ValueError("DecodeGraphs.run: sampling must be given, one entry a row, exactly when the key samples")
        if sampling is not None and any(len(row[3]) > MAX_BIASES for row in sampling):
            raise ValueError(f"DecodeGraphs.run: at most {MAX_BIASES} logit biases a row")
        max_len, ps = self.runner.max_len, self.runner.page_size
        for b, (t, p) in enumerate(zip(tables, starts)):
            if not 0 <= p < max_len or p >= len(t) * ps:
                raise ValueError(f"row {b}: position {p} outside its {len(t)} pages (max_len={max_len})")
        entry = self._entries.get(key)
        if entry is None and self.capture:
            if key in self._failed:
                return None
            entry = self._capture(key)
            if entry is None:
                return None
        pad = B - n
        scratch, width = self.runner.cache.scratch, self.runner.max_pages
        self._host[:, :B].copy_(torch.tensor([tokens + [0] * pad, starts + [0] * pad]))
        self._dev[:, :B].copy_(self._host[:, :B], non_blocking=self.capture)
        self._tables_host[:B].copy_(torch.tensor([t + [scratch] * (width - len(t)) for t in tables]
                                                 + [[scratch] * width] * pad))
        self._tables[:B].copy_(self._tables_host[:B], non_blocking=self.capture)
        if latent:
            self._embeds[:n, 0].copy_(embeds)
            self._embeds[n:B].zero_()
        if sampling is not None:
            self._fill_sampling(B, sampling)
        if self.capture:
            entry.graph.replay()
            self.stats["replays"] += 1
        else:
            entry = _Entry(None, *self._forward(key))
            self.stats["static_steps"] += 1
        return (entry.hidden[:n].clone(), entry.logits[:n],
                {l: t[:n].clone() for l, t in entry.tapped.items()},
                entry.tokens[:n] if entry.tokens is not None else None)

    def _fill_sampling(self, B: int, sampling) -> None:
        """Per-row sampling inputs into the buffers: one host-to-device copy each. Padding
        rows and unused bias entries add 0.0 to logit 0."""
        ints = [[0] * (2 + MAX_BIASES) for _ in range(B)]
        floats = [[0.0] * (1 + MAX_BIASES) for _ in range(B)]
        for i, (temperature, seed, counter, biases) in enumerate(sampling):
            ints[i][0], ints[i][1], floats[i][0] = seed, counter, temperature
            for j, (tok, val) in enumerate(biases):
                ints[i][2 + j], floats[i][1 + j] = tok, val
        self._s_host_i[:B].copy_(torch.tensor(ints, dtype=torch.long))
        self._s_host_f[:B].copy_(torch.tensor(floats, dtype=torch.float32))
        self._s_i[:B].copy_(self._s_host_i[:B], non_blocking=self.capture)
        self._s_f[:B].copy_(self._s_host_f[:B], non_blocking=self.capture)

    def _meta(self, B: int):
        meta = self._metas.get(B)
        if meta is None:
            meta = self.runner.static_meta(self._tables[:B], self._dev[1, :B], self._lengths[:B],
                                           self._write_pages[:B], self._write_offs[:B])
            self._metas[B] = meta
        return meta

    def _forward(self, key: tuple):
        """The static step: reads only the buffers, writes only fresh (or pooled) tensors."""
        B, _, latent, taps, mode = key
        r = self.runner
        meta = self._meta(B)
        r.fill_static_writes(meta)  # lengths, and where the new keys go
        if latent:
            hidden = r.forward(meta, inputs_embeds=self._embeds[:B], taps=taps)
        else:
            hidden = r.forward(meta, input_ids=self._dev[0, :B, None], taps=taps)
        h = hidden[:, 0]
        logits = r.logits(h)
        tokens = None
        if mode is not None:
            tokens = sample_captured(logits, mode, self._s_i[:B], self._s_f[:B])
        return h, logits, {l: r.tapped[l][:, 0] for l in taps}, tokens

    def _capture(self, key: tuple) -> _Entry | None:  # pragma: no cover - CUDA only
        B = key[0]
        dev = self.runner.device
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels, the caching
        # allocator settles) with every row on the scratch page, so nothing real is written.
        self._dev[:, :B].zero_()
        self._tables[:B].fill_(self.runner.cache.scratch)
        self._embeds[:B].zero_()
        self._s_i[:B].zero_()
        self._s_f[:B].zero_()
        try:
            stream = torch.cuda.Stream(device=dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(key)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(key)
        except Exception as e:  # noqa: BLE001 - a model that cannot be captured still runs
            torch.cuda.synchronize(dev)
            self._failed[key] = f"{type(e).__name__}: {e}"
            warnings.warn(f"cotrt: decode step {key} could not be captured as a CUDA graph, it runs eagerly "
                          f"({self._failed[key]})", RuntimeWarning, stacklevel=3)
            return None
        self._pool = graph.pool()
        entry = _Entry(graph, *out)
        self._entries[key] = entry
        self.stats["captures"] += 1
        return entry
