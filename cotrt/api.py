"""The user-facing API: ``cotrt.wrap(model, tokenizer) -> Runtime``."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from .control.think import ThinkFormat
from .engine import Engine
from .output import Event, Output
from .model import ModelRunner
from .params import Params


def _eos_ids(model, tokenizer) -> list[int]:
    """The ids that end generation, as HF ``generate`` takes them (generation_config)."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


DEFAULT_MAX_LEN = 2048


def default_max_len(model) -> int:
    """min(2048, the model's position limit): 2048 slots of KV per request unless the
    model cannot address them (GPT-2: 1024)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(DEFAULT_MAX_LEN, int(limit)) if limit else DEFAULT_MAX_LEN


class Runtime:
    """A wrapped model: batch generation, chat, streaming, and the engine underneath."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_len: int | None = None,
                 think_format: ThinkFormat | None = None, decode_graph: str = "auto",
                 fuse: bool | None = None, cpu_kernels: bool | None = None, kv_tokens: int | None = None,
                 page_size: int = 16):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if max_len is None:
            max_len = default_max_len(model)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2 or None, got {max_len!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if kv_tokens is not None and (isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int)
                                      or kv_tokens < max_len):
            raise ValueError(f"kv_tokens must be an int >= max_len={max_len} (one request must fit) or None, "
                             f"got {kv_tokens!r}")
        if think_format is not None and not isinstance(think_format, ThinkFormat):
            raise ValueError(f"think_format must be a cotrt.ThinkFormat or None, got {type(think_format).__name__}")
        if fuse is not None and not isinstance(fuse, bool):
            raise ValueError(f"fuse must be True, False or None, got {fuse!r}")
        if cpu_kernels is not None and not isinstance(cpu_kernels, bool):
            raise ValueError(f"cpu_kernels must be True, False or None, got {cpu_kernels!r}")
        from .engine.graph import resolve_mode

        param = next(model.parameters(), None)
        resolve_mode(decode_graph, param.device if param is not None else torch.device("cpu"))  # checks it
        if limit and max_len > limit:
            raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings={limit}")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.think_format = think_format or ThinkFormat.detect(tokenizer)
        self.runner = ModelRunner(model, max_batch=max_batch, max_len=max_len, fuse=fuse,
                                  cpu_kernels=cpu_kernels, kv_tokens=kv_tokens, page_size=page_size)
        self.valves = None
        self.engine = Engine(self.runner, tokenizer, self.think_format, max_batch, max_len,
                             eos_ids=_eos_ids(model, tokenizer), decode_graph=decode_graph)
        if self.runner.tp is not None:  # tensor parallel: every rank draws the same seeds (cotrt.parallel)
            from .parallel.lockstep import sync_seeds

            sync_seeds(self.engine, self.runner.tp.group)
        # Valves a loader left on the model (load_ccot_bundle without a runtime keeps its
        # ValveSet as model.cotrt_valves) are this runtime's from the start; END heads in
        # model.cotrt_end_heads are found by name when a Latent binds.
        loaded = getattr(model, "cotrt_valves", None)
        if loaded is not None:
            self._adopt_valves(loaded)

    # -- valves ---------------------------------------------------------------------------------
    def load_valve(self, source, name: str, scale: float | None = None) -> int:
        """Load a PEFT LoRA folder (or a state dict, with ``scale``) as the valve ``name``.

        Requests then pick it with ``Params(valve={name: alpha})``. Several valves can be
        loaded; each request uses one, and rows of one batch may use different valves and
        alphas. A malformed or mismatched adapter raises ValueError naming the module and
        shapes, and leaves the runtime unchanged.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if self.engine.has_unfinished():
            raise RuntimeError("load_valve: the engine has requests in flight; load valves while it is idle")
        from .valve import ValveSet

        if self.valves is None:
            valves = ValveSet(self.model)
            idx = valves.load(source, name, scale=scale)
            self.valves = valves  # only once the first load succeeded
            self.engine.valves = valves
        else:
            idx = self.valves.load(source, name, scale=scale)
        return idx

    def _adopt_valves(self, valves) -> None:
        from .valve import ValveSet

        if not isinstance(valves, ValveSet):
            raise ValueError(f"model.cotrt_valves must be a cotrt.valve.ValveSet, got {type(valves).__name__}")
        if valves.model is not self.model:
            raise ValueError("model.cotrt_valves was built on another model")
        self.valves = self.engine.valves = valves

    def unload_valve(self, name: str) -> None:
        if self.valves is None or name not in self.valves:
            raise ValueError(f"unload_valve: no valve named {name!r}")
        if self.engine.has_unfinished():
            raise RuntimeError("unload_valve: the engine has requests in flight")
        self.valves.unload(name)

    # -- batch API ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence, params: Params | Sequence[Params] | None = None) -> list[Output]:
        """Generate for every prompt (raw text or token ids); one Params or one per prompt.

        All requests are validated before any is queued; outputs come back in prompt order,
        ``params.n`` of them per prompt (its samples, in seed order).
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of strings or of token-id lists")
        plist = self._params_list(params, len(prompts))
        for i, p in enumerate(prompts):  # validate all first: nothing is queued on error
            try:
                self.engine._prompt_ids(p)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        # Offline batch: admit the longest-bounded requests first (LPT order), so the long
        # ones do not start last and leave a tail of steps with few rows. Each request's
        # output is independent of admission order (seeded per request); results come
        # back in prompt order. On bench_e2e's 16-request mixed workload this cut the
        # engine steps from 203 to 162 (1140 tokens, max_batch 8).
        order = sorted(range(len(prompts)), key=lambda i: -plist[i].max_new_tokens)
        ids = [None] * len(prompts)
        for i in order:
            ids[i] = self.engine.add_samples(prompts[i], plist[i])
        return self._collect([rid for group in ids for rid in group])

    def chat(self, conversations: Sequence, params: Params | Sequence[Params] | None = None,
             **template_kwargs) -> list[Output]:
        """Generate replies to conversations (lists of {"role", "content"} messages) through
        the tokenizer's chat template."""
        if not isinstance(conversations, Sequence) or not conversations:
            raise ValueError("conversations must be a non-empty list of message lists")
        if isinstance(conversations[0], dict):
            raise ValueError("conversations must be a list of conversations (each a list of messages)")
        return self.generate([self.chat_prompt(c, **template_kwargs) for c in conversations], params)

    def chat_prompt(self, messages, **template_kwargs) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat template; use generate() with raw prompts")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 **template_kwargs)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def stream(self, prompt, params: Params | None = None) -> Iterator[Event]:
        """Events of one request as they are produced (other queued requests advance too).
        One sample: ``params.n`` must be 1."""
        rid = self.engine.add(prompt, params)
        while True:
            for ev in self.engine.step():
                if ev.request_id == rid:
                    yield ev
                    if ev.finished:
                        return

    # -- helpers ------------------------------------------------------------------------------
    def _params_list(self, params, n: int) -> list[Params]:
        if params is None:
            return [Params()] * n
        if isinstance(params, (Params, dict)):
            p = Params.from_dict(params) if isinstance(params, dict) else params
            return [p] * n
        plist = list(params)
        if len(plist) != n:
            raise ValueError(f"params: {len(plist)} given for {n} prompts")
        for i, p in enumerate(plist):
            if not isinstance(p, Params):
                raise ValueError(f"params[{i}] must be a cotrt.Params, got {type(p).__name__}")
        return plist

    def _collect(self, ids: Iterable[int]) -> list[Output]:
        ids = list(ids)
        pending, outs = set(ids), {}
        while pending:
            for ev in self.engine.step():
                if ev.finished and ev.request_id in pending:
                    outs[ev.request_id] = ev.output
                    pending.discard(ev.request_id)
        return [outs[i] for i in ids]


def wrap(model, tokenizer, max_batch: int = 8, max_len: int | None = None,
         think_format: ThinkFormat | None = None, decode_graph: str = "auto",
         fuse: bool | None = None, cpu_kernels: bool | None = None, kv_tokens: int | None = None,
         page_size: int = 16) -> Runtime:
    """Wrap an HF causal LM and its tokenizer for fast, controlled generation.

    ``max_batch``: requests running at once (more wait in a queue).
    ``max_len``: prompt + output tokens of one request; None takes min(2048, the model's
    ``max_position_embeddings``), e.g. 1024 on GPT-2.
    ``kv_tokens``: the KV cache's capacity in tokens, for all requests together (>=
    max_len; default ``max_batch * max_len``), allocated in pages of ``page_size`` tokens
    as requests grow and freed as they finish or roll back. Full prompt pages are shared
    between requests with the same prefix (``Params(n=k)`` samples store their prompt
    once) and stay cached until the memory is needed; when the pages run out mid-decode,
    the newest request is preempted and recomputed later, with the same output.

    ``decode_graph``: "auto" captures decode steps as CUDA graphs on a CUDA model and runs
    them eagerly elsewhere; "cuda" insists on graphs; "static" runs the graph's
    static-shape step without capturing (tests, debugging); "off" is the eager step.
    ``fuse``: fewer kernels a step — RMSNorm modules swapped for one-kernel ones
    (``cotrt.layers.rms_norm``; same weights) and HF's rotary function run as one kernel during
    cotrt's forwards (``cotrt.layers.rope``), each checked to compute the same function;
    None: on CUDA models.
    ``cpu_kernels``: decode steps' linears (projections, LM head; fp32/bf16, at most 8
    rows) through cotrt's multithreaded CPU kernel (``cotrt.layers.cpu_linear``; the module
    classes change in place, weights are not copied, calls outside cotrt's forwards stay
    ``F.linear``); None: on CPU models where ``cotrt._cpu`` is built.
    """
    return Runtime(model, tokenizer, max_batch=max_batch, max_len=max_len, think_format=think_format,
                   decode_graph=decode_graph, fuse=fuse, cpu_kernels=cpu_kernels, kv_tokens=kv_tokens,
                   page_size=page_size)


__all__ = ["wrap", "Runtime", "Output", "Params", "ThinkFormat"]
