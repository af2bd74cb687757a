"""cpu_attention (the paged CPU decode-attention kernel) against the alternatives, in one run.

    python bench/bench_cpu_attention.py [--batches 1,8] [--lengths 64,256,1024] [--page 16]
                                        [--dtype float32] [--repeats 15] [--threads N]

Providers, on SmolLM2-135M's attention shape (H 9, KVH 3, D 64), one decode query per row,
every row L keys (the same values in every layout):
  sdpa_slot       F.scaled_dot_product_attention over the slot cache's per-row views
                  (``[B, KVH, L, D]`` strided views and a [B, 1, 1, L] mask, q folded as
                  [B, KVH, G, D]): what cotrt/model/attention.py runs on CPU today
  gather_sdpa     the same SDPA after gathering each row's pages by its block table into
                  contiguous K/V: what a paged cache costs without a paged kernel
  cpu_attention   cotrt.ops.cpu_attention's kernel over the pages in place (random page
                  ids, PS = --page), called without the argument checks as a model would
  cpu_attn_slot   the kernel on the slot cache itself (1-D table: the slot layout)
  cpu_attn_1t     cpu_attention with threads=1

Each figure is the median [p20, p80] of --repeats interleaved samples, a sample being as
many back-to-back calls as fill ~5 ms. GB/s counts the K and V rows read once
(B·L·KVH·D·2 elements). A decode step of SmolLM2 calls attention 30 times (one per layer).
Runtime: ~1 min on a 2-core machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import batched, header, interleave, quantiles  # noqa: E402
from cotrt.ops.cpu_attention import _launch  # noqa: E402

H, KVH, D = 9, 3, 64


def providers(B, L, PS, dtype):
    g = torch.Generator().manual_seed(0)
    G, NP = H // KVH, -(-L // PS)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    # The slot cache: [B + 1, T, KVH, D] per layer (a scratch slot, headroom past L).
    T = L + 64
    kslot = torch.randn(B + 1, T, KVH, D, generator=g).to(dtype)
    vslot = torch.randn(B + 1, T, KVH, D, generator=g).to(dtype)
    # The paged cache: the same keys scattered over random pages of a pool twice as big.
    P = 2 * B * NP
    perm = torch.randperm(P, generator=g)[:B * NP]
    tables = perm.view(B, NP).to(torch.int32)
    kpage = torch.zeros(P, PS, KVH, D, dtype=dtype)
    vpage = torch.zeros(P, PS, KVH, D, dtype=dtype)
    kpad = torch.zeros(B, NP * PS, KVH, D, dtype=dtype)
    vpad = torch.zeros(B, NP * PS, KVH, D, dtype=dtype)
    kpad[:, :L], vpad[:, :L] = kslot[:B, :L], vslot[:B, :L]
    kpage[perm] = kpad.view(B * NP, PS, KVH, D)
    vpage[perm] = vpad.view(B * NP, PS, KVH, D)
    lengths = torch.full((B,), L, dtype=torch.int32)
    slots = torch.arange(B, dtype=torch.int32)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    qf = q.view(B, KVH, G, D)
    out = torch.empty(B, H, D, dtype=dtype)

    def sdpa_slot():
        k, v = kslot[:B, :L].transpose(1, 2), vslot[:B, :L].transpose(1, 2)
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask).view(B, H, D)

    def gather_sdpa():
        k = kpage[tables.long()].view(B, NP * PS, KVH, D)[:, :L].transpose(1, 2)
        v = vpage[tables.long()].view(B, NP * PS, KVH, D)[:, :L].transpose(1, 2)
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask).view(B, H, D)

    fns = {
        "sdpa_slot": sdpa_slot,
        "gather_sdpa": gather_sdpa,
        "cpu_attention": lambda: _launch(q, kpage, vpage, tables, lengths, None, None, None, out, 0),
        "cpu_attn_slot": lambda: _launch(q, kslot, vslot, slots[:, None], lengths, None, None, None, out, 0),
        "cpu_attn_1t": lambda: _launch(q, kpage, vpage, tables, lengths, None, None, None, out, 1),
    }
    ref = sdpa_slot().float()
    for name in ("gather_sdpa", "cpu_attention", "cpu_attn_slot"):  # the same numbers in every layout
        err = (fns[name]().float() - ref).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 5e-2), (name, err)
    return fns, B * L * KVH * D * 2 * kslot.element_size()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--page", type=int, default=16, help="tokens per page (PS)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    order = ["sdpa_slot", "gather_sdpa", "cpu_attention", "cpu_attn_slot", "cpu_attn_1t"]
    print(header(note=f"H {H}, KVH {KVH}, D {D}, PS {args.page}, {args.dtype}, "
                      f"median [p20, p80] of {args.repeats} interleaved samples"))
    print("| B | L | " + " | ".join(f"{p} us (GB/s)" for p in order)
          + " | sdpa_slot / cpu_attention | gather_sdpa / cpu_attention |")
    print("|---:|---:|" + "---:|" * (len(order) + 2))
    with torch.inference_mode():
        for B in map(int, args.batches.split(",")):
            for L in map(int, args.lengths.split(",")):
                fns, moved = providers(B, L, args.page, dtype)
                runs = {k: batched(f) for k, f in fns.items()}
                times = interleave({k: r for k, (r, _) in runs.items()}, args.repeats, warmup=1)
                per = {k: [t / runs[k][1] for t in ts] for k, ts in times.items()}
                cells = []
                for p in order:
                    m, lo, hi = quantiles(per[p])
                    cells.append(f"{m * 1e6:.1f} [{lo * 1e6:.1f}, {hi * 1e6:.1f}] ({moved / m / 1e9:.1f})")
                med = {k: quantiles(v)[0] for k, v in per.items()}
                print(f"| {B} | {L} | " + " | ".join(cells)
                      + f" | {med['sdpa_slot'] / med['cpu_attention']:.2f}x"
                      + f" | {med['gather_sdpa'] / med['cpu_attention']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
