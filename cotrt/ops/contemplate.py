"""contemplate: the next input embeddings of a mixed batch of token rows and latent rows.

    out[b] = latent_scale · (proj_weight · norm(hidden[b]) + proj_bias)   if latent_mask[b]
    out[b] = embed_scale · embed_weight[tokens[b]]                         otherwise

with ``norm(x) = x · rsqrt(mean(x²) + eps) · norm_weight`` (Llama's RMSNorm, in fp32) and
every stage optional. A latent row (Coconut, CCoT) feeds a hidden state back as its next
input instead of a sampled token; a token row is an ordinary embedding lookup. One pass
builds both, so a step's input needs no host-side split of the batch.

- :func:`contemplate` — the launcher: validates, then runs the Triton kernel on CUDA
  tensors (``kernels/contemplate.py``) and plain torch ops on CPU. ``impl="triton"`` forces
  the kernel, which on CPU tensors runs in Triton's interpreter (tests only: slow; needs
  ``TRITON_INTERPRET=1`` set before triton is first imported).
- :func:`contemplate_ref` — the fp32 reference, written for clarity: the test oracle and
  the benchmark baseline.

Scales: ``embed_scale`` multiplies token rows only (models whose embedding module scales
its output, e.g. Gemma3's ``sqrt(H)``: the engine passes ``inputs_embeds``, which bypasses
that module); ``latent_scale`` multiplies latent rows only. Coconut feeds the state back
unscaled, so the engine passes no ``latent_scale`` for it.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from ._triton import (FLOAT_DTYPES, HAS_TRITON, INDEX_DTYPES, cdiv, interpreted_for, launch, load_kernel,
                      next_pow2, shape_of)



def _check_scale(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise ValueError(f"contemplate: {name} must be a finite number or None, got {v!r}")


def _check_args(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight, proj_bias,
                embed_scale, latent_scale, out):
    """Validate shapes, dtypes, devices and strides (metadata only: no device sync).
    Returns (B, H, Hh, V)."""
    if not isinstance(embed_weight, torch.Tensor) or embed_weight.dim() != 2:
        raise ValueError(f"contemplate: embed_weight must be a 2-D tensor [V, H], got {shape_of(embed_weight)}")
    V, H = embed_weight.shape
    dtype, device = embed_weight.dtype, embed_weight.device
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"contemplate: embed_weight dtype must be fp16/bf16/fp32, got {dtype}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(f"contemplate: tokens must be a 1-D tensor [B], got {shape_of(tokens)}")
    B = tokens.shape[0]
    if tokens.dtype not in INDEX_DTYPES:
        raise ValueError(f"contemplate: tokens must be int32 or int64, got {tokens.dtype}")
    if not isinstance(latent_mask, torch.Tensor) or tuple(latent_mask.shape) != (B,):
        raise ValueError(f"contemplate: latent_mask must be a [B={B}] tensor, got {shape_of(latent_mask)}")
    if latent_mask.dtype != torch.bool:
        raise ValueError(f"contemplate: latent_mask must be bool, got {latent_mask.dtype}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[0] != B:
        raise ValueError(f"contemplate: hidden must be a 2-D tensor [B={B}, Hh], got {shape_of(hidden)}")
    Hh = hidden.shape[1]
    if norm_weight is not None and (not isinstance(norm_weight, torch.Tensor) or tuple(norm_weight.shape) != (Hh,)):
        raise ValueError(f"contemplate: norm_weight must be [Hh={Hh}] or None, got {shape_of(norm_weight)}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps >= 0 \
            or not math.isfinite(norm_eps):
        raise ValueError(f"contemplate: norm_eps must be a finite number >= 0, got {norm_eps!r}")
    if proj_weight is not None:
        if not isinstance(proj_weight, torch.Tensor) or tuple(proj_weight.shape) != (H, Hh):
            raise ValueError(f"contemplate: proj_weight must be [H={H}, Hh={Hh}] or None, got {shape_of(proj_weight)}")
        if proj_bias is not None and (not isinstance(proj_bias, torch.Tensor) or tuple(proj_bias.shape) != (H,)):
            raise ValueError(f"contemplate: proj_bias must be [H={H}] or None, got {shape_of(proj_bias)}")
    else:
        if proj_bias is not None:
            raise ValueError("contemplate: proj_bias is given without proj_weight")
        if Hh != H:
            raise ValueError(f"contemplate: hidden has Hh={Hh} columns but embed_weight has H={H}; "
                             "a state of another size needs proj_weight [H, Hh]")
    _check_scale("embed_scale", embed_scale)
    _check_scale("latent_scale", latent_scale)
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, H) or out.dtype != dtype):
        raise ValueError(f"contemplate: out must be [B={B}, H={H}] of dtype {dtype}, got {shape_of(out)}"
                         f"{' ' + str(out.dtype) if isinstance(out, torch.Tensor) else ''}")
    for name, t in (("hidden", hidden), ("norm_weight", norm_weight), ("proj_weight", proj_weight),
                    ("proj_bias", proj_bias)):
        if t is not None and t.dtype != dtype:
            raise ValueError(f"contemplate: {name} dtype {t.dtype} differs from embed_weight dtype {dtype}")
    for name, t in (("tokens", tokens), ("latent_mask", latent_mask), ("hidden", hidden),
                    ("norm_weight", norm_weight), ("proj_weight", proj_weight), ("proj_bias", proj_bias),
                    ("out", out)):
        if t is not None and t.device != device:
            raise ValueError(f"contemplate: {name} is on {t.device}, embed_weight is on {device}")
    # Rows may be strided (a [B, S, H][:, -1] tap is fine), columns must not: the kernel's
    # loads along H are vectorised, and a column-major projection would turn its GEMV into
    # a gather of scattered elements.
    for name, t in (("embed_weight", embed_weight), ("hidden", hidden), ("proj_weight", proj_weight),
                    ("out", out)):
        if t is not None and t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"contemplate: {name} must have unit stride along its last dim, got strides "
                             f"{tuple(t.stride())} (call .contiguous())")
    return B, H, Hh, V


def contemplate(tokens, latent_mask, hidden, embed_weight, norm_weight=None, norm_eps=1e-6, proj_weight=None,
                proj_bias=None, embed_scale=None, out=None, *, latent_scale=None, impl="auto"):
    """Next input embeddings for a batch mixing token rows and latent rows.

    Args:
        tokens: [B] int32/int64, the token of each token row (ignored on latent rows: any
            value, -1 included). Token ids outside [0, V) are not checked (a device sync):
            the torch path raises, the kernel writes zeros.
        latent_mask: [B] bool, True where the row is latent.
        hidden: [B, Hh] the fed-back state of each row (ignored on token rows: NaN is fine).
        embed_weight: [V, H] fp16/bf16/fp32, the input embedding table.
        norm_weight: [Hh] RMSNorm weight applied to latent rows, or None (no norm).
        norm_eps: the RMSNorm epsilon.
        proj_weight: [H, Hh] projection of latent rows (``nn.Linear`` layout), or None
            (then Hh must equal H).
        proj_bias: [H] or None (only with proj_weight).
        embed_scale: a number multiplying token rows, or None.
        out: [B, H] of embed_weight's dtype to write into (rows may be strided), or None.
        latent_scale: a number multiplying latent rows, or None.
        impl: "auto" (Triton on CUDA when triton is installed, torch ops otherwise),
            "triton" or "torch".

    Returns:
        [B, H] of embed_weight's dtype (``out`` when given). Without embed_scale, token rows
        equal ``F.embedding(tokens, embed_weight)`` bit for bit. The kernel computes latent
        rows in fp32 and rounds once; the torch path does too for fp32, and for 16-bit
        weights runs the projection in their dtype.
    """
    B, H, Hh, V = _check_args(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight,
                              proj_bias, embed_scale, latent_scale, out)
    if impl == "auto":
        impl = "triton" if embed_weight.is_cuda and HAS_TRITON else "torch"
    if impl == "torch":
        return _contemplate_torch(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight,
                                  proj_bias, embed_scale, latent_scale, out)
    if impl == "triton":
        return _contemplate_triton(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight,
                                   proj_bias, embed_scale, latent_scale, out, B, H, Hh, V)
    raise ValueError(f"contemplate: impl must be 'auto', 'triton' or 'torch', got {impl!r}")


def contemplate_ref(tokens, latent_mask, hidden, embed_weight, norm_weight=None, norm_eps=1e-6, proj_weight=None,
                    proj_bias=None, embed_scale=None, *, latent_scale=None):
    """The fp32 reference: both branches for every row, then a per-row select.
    Same arguments as :func:`contemplate`; returns fp32 [B, H]."""
    _check_args(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight, proj_bias,
                embed_scale, latent_scale, None)
    # token rows: E[tok] · embed_scale
    tok = tokens.long().masked_fill(latent_mask, 0)  # latent rows' ids are ignored, maybe -1
    emb = embed_weight[tok].float()  # (B, H)
    if embed_scale is not None:
        emb = emb * embed_scale
    # latent rows: latent_scale · (W · rmsnorm(h) + b)
    x = hidden.float()  # (B, Hh)
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm_eps) * norm_weight.float()
    if proj_weight is not None:
        x = x @ proj_weight.float().t()  # (B, H)
        if proj_bias is not None:
            x = x + proj_bias.float()
    if latent_scale is not None:
        x = x * latent_scale
    return torch.where(latent_mask[:, None], x, emb)


# ---------------------------------------------------------------------------------- torch


def _latent_torch(hidden, dtype, norm_weight, norm_eps, proj_weight, proj_bias, latent_scale):
    """Latent rows on the torch path: [n, Hh] -> [n, H] of ``dtype``."""
    x = hidden
    if norm_weight is not None:
        x32 = hidden.float()
        x = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm_eps) * norm_weight.float()
    if proj_weight is not None:
        # fp32 models: fp32 throughout. 16-bit: the GEMV in the weight's dtype (upcasting the
        # projection on every call would copy H·Hh elements to save one rounding of x).
        x = F.linear(x.to(dtype), proj_weight, proj_bias)
    if latent_scale is not None:
        x = x.float() * latent_scale
    return x.to(dtype)  # ``hidden`` itself when there is no stage: torch.where copies it


def _scaled_embedding(tokens, embed_weight, embed_scale):
    y = F.embedding(tokens, embed_weight)  # (B, H), a fresh tensor
    if embed_scale is None:
        return y
    if y.dtype == torch.float32:
        return y.mul_(embed_scale)
    return (y.float() * embed_scale).to(y.dtype)  # scaled in fp32, rounded once (as the ref)


def _contemplate_torch(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight, proj_bias,
                       embed_scale, latent_scale, out):
    """Torch path. A decode step is a handful of small ops and on CPU their count is the cost
    (~3-5 us each). Latent rows that are the state as is (Coconut) cost one select: both
    branches for every row (:func:`_contemplate_torch_where`, also the sync-free path for
    CUDA without triton). With feedback stages, on CPU, where reading the mask costs no
    sync, each branch runs on its own rows only (the projection on latent rows alone)."""
    has_stage = norm_weight is not None or proj_weight is not None or latent_scale is not None
    if latent_mask.device.type != "cpu" or not has_stage:
        return _contemplate_torch_where(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps,
                                        proj_weight, proj_bias, embed_scale, latent_scale, out)
    dtype = embed_weight.dtype
    rows = latent_mask.nonzero().squeeze(1)  # (n_lat,)
    n_lat, B = rows.shape[0], tokens.shape[0]
    if 0 < n_lat == B:
        y = _latent_torch(hidden, dtype, norm_weight, norm_eps, proj_weight, proj_bias, latent_scale)
    else:
        y = _scaled_embedding(tokens if n_lat == 0 else tokens.masked_fill(latent_mask, 0), embed_weight,
                              embed_scale)
        if n_lat:
            lat = _latent_torch(hidden.index_select(0, rows), dtype, norm_weight, norm_eps, proj_weight, proj_bias,
                                latent_scale)
            y.index_copy_(0, rows, lat)
    return y if out is None else out.copy_(y)


def _contemplate_torch_where(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight,
                             proj_bias, embed_scale, latent_scale, out):
    """Torch path free of host syncs (CUDA without triton): both branches for every row,
    then a per-row select."""
    emb = _scaled_embedding(tokens.masked_fill(latent_mask, 0), embed_weight, embed_scale)
    lat = _latent_torch(hidden, embed_weight.dtype, norm_weight, norm_eps, proj_weight, proj_bias, latent_scale)
    if out is None:
        return torch.where(latent_mask[:, None], lat, emb)
    return torch.where(latent_mask[:, None], lat, emb, out=out)


# ---------------------------------------------------------------------------------- Triton


def _kernel(interpreted: bool):
    return load_kernel("contemplate", "_contemplate_kernel", interpreted)


@functools.lru_cache(maxsize=64)
def _blocks(H, Hh, has_proj, dtype, interpreted):
    """(BLOCK_H, BLOCK_K, num_warps). Not yet tuned on a GPU. Without a projection a row is
    a copy of H elements: one wide block. With one, a latent row is a GEMV bound by reading
    the [H, Hh] weight: BLOCK_H = 64 spreads it over H/64 programs per row, and BLOCK_K
    keeps the fp32 tile at 8 K elements (64 registers a thread at 4 warps)."""
    if interpreted:  # numpy cost is per tile step: big tiles, few steps
        return min(next_pow2(H), 1024), min(next_pow2(Hh), 256), 4
    if not has_proj:
        return min(next_pow2(H), 1024), min(next_pow2(Hh), 1024), 4
    return 64, 128, 4


def _contemplate_triton(tokens, latent_mask, hidden, embed_weight, norm_weight, norm_eps, proj_weight, proj_bias,
                        embed_scale, latent_scale, out, B, H, Hh, V):
    interpreted = interpreted_for("contemplate", embed_weight)
    y = torch.empty((B, H), dtype=embed_weight.dtype, device=embed_weight.device) if out is None else out
    if B == 0 or H == 0:
        return y
    bh, bk, num_warps = _blocks(H, Hh, proj_weight is not None, embed_weight.dtype, interpreted)
    grid = (B, cdiv(H, bh))
    mask_u8 = latent_mask.view(torch.uint8)  # same itemsize: a free view, strides kept
    # Dummy pointers for absent optional tensors (never dereferenced: HAS_* is False).
    nw = norm_weight if norm_weight is not None else embed_weight
    pw = proj_weight if proj_weight is not None else embed_weight
    pb = proj_bias if proj_bias is not None else embed_weight
    args = dict(
        tok_ptr=tokens, mask_ptr=mask_u8, hid_ptr=hidden, emb_ptr=embed_weight, norm_ptr=nw, proj_ptr=pw,
        bias_ptr=pb, out_ptr=y,
        norm_eps=float(norm_eps), embed_scale=1.0 if embed_scale is None else float(embed_scale),
        latent_scale=1.0 if latent_scale is None else float(latent_scale),
        V=V, H=H, HH=Hh,
        stride_tok=tokens.stride(0), stride_mask=mask_u8.stride(0), stride_hid=hidden.stride(0),
        stride_emb=embed_weight.stride(0), stride_norm=nw.stride(0), stride_proj=pw.stride(0),
        stride_bias=pb.stride(0), stride_out=y.stride(0),
        HAS_NORM=norm_weight is not None, HAS_PROJ=proj_weight is not None, HAS_BIAS=proj_bias is not None,
        HAS_EMBED_SCALE=embed_scale is not None, HAS_LATENT_SCALE=latent_scale is not None,
        BLOCK_H=bh, BLOCK_K=bk,
    )
    kernel = _kernel(interpreted)
    launch(kernel, grid, args, interpreted, num_warps=num_warps)
    return y

