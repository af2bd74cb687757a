"""Serving under load: the cotrt server against HF ``generate`` behind the same endpoint.

    python bench/bench_serve.py [--clients 8] [--requests 24] [--max-tokens 32] [--max-batch 8]

Both backends sit behind the same FastAPI app (``cotrt.server.create_app``) on loopback;
only what answers a request differs:

- cotrt: ``AsyncEngine`` over ``cotrt.wrap(model)``, continuous batching (max_batch slots);
- hf:    ``HFGenerateBackend`` below: ``model.generate`` on one worker thread, one request
         at a time (what a plain HF model behind a web endpoint does).

``--clients`` concurrent clients send ``--requests`` non-streaming chat requests in all
(distinct questions, greedy, EOS ignored so every request generates exactly
``--max-tokens``). Reported: wall time, requests/s, generated tokens/s, p50/p99 latency
(request sent -> full response), and the throughput ratio against hf. Two warm-up requests
per backend are not counted. Server, engine and clients share one process (and the
machine's cores), the same for both backends.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from cotrt.async_engine import AsyncEngine  # noqa: E402
from cotrt.output import Event, Output  # noqa: E402
from cotrt.models import load_model  # noqa: E402
from cotrt.server import create_app  # noqa: E402

TOPICS = ["prime numbers", "photosynthesis", "the water cycle", "binary search", "volcanoes", "gravity",
          "compound interest", "the moon's phases", "sorting algorithms", "rainbows", "tides", "fractions"]


class _HFRequest:
    """The handle HF requests give the app: one final event, nothing streamed."""

    def __init__(self, future, prompt_tokens):
        self._future, self.prompt_tokens, self.thinking, self.output = future, prompt_tokens, True, None

    def abort(self):
        self._future.cancel()  # only if it has not started: generate() cannot be interrupted

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        try:
            out = await asyncio.wrap_future(self._future)
        except asyncio.CancelledError:
            out = Output(-1, [], [], "", "", "", "abort", {"prompt_tokens": self.prompt_tokens})
        self.output = out
        yield Event(out.request_id, out.token_ids, out.text, finished=True, output=out)


class HFGenerateBackend:
    """The app's backend protocol over ``model.generate``, one request at a time."""

    def __init__(self, model, tokenizer, max_len: int):
        self.model, self.tok, self.max_len, self.max_batch = model, tokenizer, max_len, 1
        self.think_format = cotrt.ThinkFormat.detect(tokenizer)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._done = {"stop": 0, "length": 0}
        self._n = 0

    @property
    def running(self):
        return self._pool is not None

    def start(self):
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        return self

    def shutdown(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def metrics(self):
        z = {"requests": {**self._done, "abort": 0, "error": 0, "rejected": 0, "invalid": 0},
             "tokens": {"prompt": 0, "think": 0, "answer": 0, "probe": 0}, "steps": 0}
        return {**z, "queue_depth": 0, "running": 0, "slots_used": 0, "slots_total": 1}

    async def submit(self, prompt, params, chat_template_kwargs=None):
        fut = self._pool.submit(self._generate, prompt, params, chat_template_kwargs or {})
        return _HFRequest(fut, 0)

    @torch.inference_mode()
    def _generate(self, prompt, params, ctk) -> Output:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            ids = self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **ctk)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        n = min(params.max_new_tokens, self.max_len - len(ids))
        x = torch.tensor([ids])
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                  min_new_tokens=n if params.ignore_eos else 0, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id or 0)
        gen = out[0, len(ids):].tolist()
        text = self.tok.decode(gen, skip_special_tokens=True)
        self._n += 1
        reason = "length" if len(gen) >= n else "stop"
        with self._lock:
            self._done[reason] += 1
        stats = {"prompt_tokens": len(ids), "think_tokens": len(gen), "answer_tokens": 0}
        return Output(self._n, ids, gen, text, text, "", reason, stats)


def serve_in_thread(app):
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    return server, th, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def run_load(url, clients, requests, max_tokens):
    """Latencies (s) of ``requests`` chat requests sent by ``clients`` concurrent clients."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    lat, tokens = [], 0

    async def client(cl):
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": "m", "max_tokens": max_tokens, "temperature": 0, "cotrt": {"ignore_eos": True},
                    "messages": [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in simple "
                                                              f"words (question {i})."}]}
            t0 = time.perf_counter()
            r = await cl.post(url + "/v1/chat/completions", json=body)
            lat.append(time.perf_counter() - t0)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as cl:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(cl) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return lat, tokens, wall


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def bench(name, backend, args):
    server, th, url = serve_in_thread(create_app(backend, "m"))
    try:
        asyncio.run(run_load(url, 2, 2, args.max_tokens))  # warm-up
        lat, tokens, wall = asyncio.run(run_load(url, args.clients, args.requests, args.max_tokens))
    finally:
        server.should_exit = True
        th.join(30)
    assert tokens == args.requests * args.max_tokens, (tokens, "every request must generate max_tokens")
    return {"backend": name, "wall": wall, "rps": args.requests / wall, "tps": tokens / wall,
            "p50": statistics.median(lat), "p99": pct(lat, 99)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--backends", default="cotrt,hf")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model, quiet=True)
    rows = []
    for name in args.backends.split(","):
        if name == "cotrt":
            backend = AsyncEngine(cotrt.wrap(model, tok, max_batch=args.max_batch, max_len=args.max_len),
                                  max_queue=args.requests)
        elif name == "hf":
            backend = HFGenerateBackend(model, tok, args.max_len)
        else:
            raise SystemExit(f"unknown backend {name!r}")
        rows.append(bench(name, backend, args))
        print(f"[bench_serve] {name}: {rows[-1]['tps']:.1f} tok/s", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["backend"] == "hf"), None)
    print(f"\n{args.model if args.model != 'default' else 'SmolLM2-135M-Instruct'} fp32, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; {args.clients} concurrent clients, "
          f"{args.requests} chat requests x {args.max_tokens} tokens (greedy, EOS ignored), cotrt max_batch="
          f"{args.max_batch}; hf = HF generate, one request at a time, same endpoint.\n")
    print("| backend | wall s | req/s | tok/s | p50 latency s | p99 latency s | throughput vs hf |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tps'] / base['tps']:.2f}x" if base else "-"
        print(f"| {r['backend']} | {r['wall']:.2f} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
