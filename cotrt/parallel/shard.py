"""What a model loaded with a tensor-parallel plan looks like to the runtime.

transformers' ``from_pretrained(..., tp_plan="auto")`` shards each planned module's
parameters as DTensors over a 1-D device mesh and replaces the module's ``forward`` by one
that runs the local shard and does the plan's collective (``colwise``: the input is
replicated, the output keeps this rank's slice of the features; ``rowwise``: the input is
this rank's slice, the partial output is all-reduced and the bias added once;
``colwise_gather_output`` on the LM head: the slices are all-gathered;
``embedding_rowwise``: vocab-sharded lookups summed). Attention therefore runs on this
rank's heads, and what leaves each decoder layer (after o_proj's and down_proj's
all-reduce) is replicated: every rank holds the same residual stream, final-norm state
and logits.

So the runtime needs, per rank:

- ``TPInfo.local_kv_heads``: the KV heads this rank's attention sees (the slot cache holds
  only those);
- ``ShardedValveLinear``: a valve on a sharded linear, its LoRA factors cut as the base
  weight is (colwise: B's rows, A whole; rowwise: A's columns, B whole), so the delta is
  computed on the local shard and summed by the same all-reduce as the base product;
- ``TPEmbedding``: the input embedding table gathered whole for latent inputs
  (``E[tok]`` next to fed-back states), made on first use only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.valve_lora import ValveLinear

# Plan styles a valve can sit on (transformers' names): the weight's shard dim, and the
# collective the style does after the local product.
_VALVE_STYLES = {
    "colwise": (0, None),  # output features split; the next rowwise layer sums
    "colwise_gather_output": (0, "gather"),  # ... gathered at once (Phi-3's qkv_proj, LM heads)
    "colwise_rep": (0, "gather"),
    "rowwise": (1, "sum"),  # input features split: partial products summed, bias added once
    "rowwise_split_input": (1, "slice+sum"),  # ... from a replicated input, sliced here (Phi-3's o_proj)
    "rowwise_rep": (1, "slice+sum"),
}


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is a plain tensor)."""
    D = _dtensor_cls()
    return t.to_local() if D is not None and isinstance(t, D) else t


@dataclass
class TPInfo:
    """A tensor-parallel model: ``size`` ranks, this one ``rank``, the plan (module name
    pattern -> style) and the process group of the model's mesh."""

    size: int
    rank: int
    plan: dict
    group: object

    def style(self, name: str) -> str | None:
        """The plan's style for module ``name`` (layer numbers match ``*``), or None."""
        generic = re.sub(r"\.\d+\.", ".*.", f".{name}.")[1:-1]
        return self.plan.get(name, self.plan.get(generic))

    def local_kv_heads(self, kv_heads: int, heads: int) -> int:
        """KV heads of this rank's attention: divided by ``size`` when the plan shards the
        key projection column-wise (each rank then runs ``heads / size`` query heads)."""
        keys = ("k_proj", "qkv_proj", "query_key_value")
        if not any(k.rsplit(".", 1)[-1] in keys and s == "colwise" for k, s in self.plan.items()):
            return kv_heads
        from ..model.attention import UnsupportedModelError

        if kv_heads % self.size or heads % self.size:
            raise UnsupportedModelError(
                f"tensor parallel over {self.size} ranks needs the attention heads ({heads}) and KV heads "
                f"({kv_heads}) to divide evenly; use a tp size that divides {kv_heads}")
        return kv_heads // self.size


def tp_info(model: nn.Module) -> TPInfo | None:
    """The model's tensor-parallel layout, or None for a model on one device."""
    size = getattr(model, "_tp_size", None) or getattr(model, "tp_size", None)
    plan = getattr(model, "_tp_plan", None)
    if not size or int(size) <= 1:
        import torch.distributed as dist

        D = _dtensor_cls()  # (a process outside torch.distributed holds no DTensor)
        if dist.is_available() and dist.is_initialized() and D is not None and \
                any(isinstance(p, D) for p in model.parameters()):
            raise ValueError("the model has DTensor parameters but no tensor-parallel plan (model._tp_plan): "
                             "load it with from_pretrained(..., tp_plan='auto') under torchrun")
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("the model is tensor-parallel but torch.distributed is not initialized")
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None and mesh.ndim > 1:
        mesh = mesh["tp"]
    group = mesh.get_group() if mesh is not None else dist.group.WORLD
    return TPInfo(int(size), dist.get_rank(group), dict(plan or {}), group)


def tp_kwargs(tp_plan="auto") -> dict:
    """``from_pretrained`` keyword arguments that shard a model with ``tp_plan``:
    ``distributed_config=DistributedConfig(tp_plan=...)`` where transformers has it (5.x;
    a bare ``tp_plan=`` is deprecated there), else ``tp_plan=`` (4.57)."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": tp_plan}
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan)}


def _shard_range(weight: torch.Tensor, dim: int, info: TPInfo) -> tuple[int, int]:
    """``(offset, length)`` along ``dim`` of this rank's shard of ``weight``: torch.chunk's
    split (the last rank may hold less), checked against the local shard's shape."""
    full = weight.shape[dim]
    n = local(weight).shape[dim]
    chunk = -(-full // info.size)
    off = min(chunk * info.rank, full)
    if n != max(0, min(chunk, full - off)):
        raise ValueError(f"unexpected shard: {n} of {full} rows on rank {info.rank} of {info.size}")
    return off, n


def valve_style(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The plan style of the linear a valve would sit on (None: not sharded); ValueError
    for a sharded linear whose style a valve cannot follow. Reads only."""
    info = tp_info(model)
    if info is None:
        return None
    if isinstance(module, ShardedValveLinear):
        return module.style
    style = info.style(name)
    if style is None:
        D = _dtensor_cls()
        if D is not None and isinstance(getattr(module, "weight", None), D):
            raise ValueError(f"module {name!r} is sharded but the tensor-parallel plan names no style for it")
        return None
    if style not in _VALVE_STYLES:
        raise ValueError(f"module {name!r} is sharded {style!r} by the tensor-parallel plan; a valve follows "
                         f"only {', '.join(_VALVE_STYLES)} linears")
    return style


class ShardedValveLinear(ValveLinear):
    """A ValveLinear on this rank's shard of a tensor-parallel linear.

    ``weight`` / ``bias`` stay the model's (DTensor) Parameters; the product runs on their
    local shards and repeats the plan's collective: colwise returns this rank's slice of
    the output features (no collective: the next rowwise layer sums), or all-gathers the
    slices (``colwise_gather_output``); rowwise all-reduces the partial output over the
    model's group, then adds the bias once (``rowwise_split_input`` first takes this
    rank's slice of a replicated input). The LoRA banks hold this rank's part of each
    adapter: colwise ``B[off:off+n]`` and all of A (the input is replicated), rowwise
    ``A[:, off:off+k]`` and all of B; so ``x_local A_localᵀ`` is a partial sum of ``x Aᵀ``
    and the all-reduce that sums the base product sums the delta too. ``in_features`` /
    ``out_features`` stay the full sizes (what adapters are checked against); the banks
    have the local ones.
    """

    def __init__(self, base: nn.Module, state, style: str, info: TPInfo):
        if style not in _VALVE_STYLES:
            raise ValueError(f"ShardedValveLinear: style must be one of {_VALVE_STYLES}, got {style!r}")
        if not isinstance(base, nn.Linear):
            raise ValueError(f"ShardedValveLinear: a {style} shard of a {type(base).__name__} is not supported")
        super().__init__(base, state)
        self.style, self.info = style, info
        w = local(self.weight)
        self.dim, self.collective = _VALVE_STYLES[style]
        self.shard = _shard_range(self.weight, self.dim, info)
        K, N = w.shape[1], w.shape[0]
        dev, dt = w.device, w.dtype
        self.lora_a = torch.zeros(0, 1, K, dtype=dt, device=dev)
        self.lora_b = torch.zeros(N, 0, 1, dtype=dt, device=dev).permute(1, 0, 2)

    def set_adapter(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """``a [r, K]``, ``b [N, r]`` of the full linear; this rank keeps its part."""
        if a is not None:
            off, n = self.shard
            if self.dim == 0:
                b = b[off:off + n]
            else:
                a = a[:, off:off + n]
        super().set_adapter(slot, a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        w, bias = local(self.weight), self.bias
        bias = None if bias is None else local(bias)
        if self.dim == 0:
            y = self.linear(x, w, bias)
            return y if self.collective is None else _gather_last(y, self.out_features, self.info)
        if self.collective == "slice+sum":  # a replicated input: this rank's slice of it
            off, k = self.shard
            x = x[..., off:off + k]
        y = self.linear(x, w, None)
        dist.all_reduce(y, group=self.info.group)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, style={self.style}, shard={self.shard}"


def _gather_last(y: torch.Tensor, full: int, info: TPInfo) -> torch.Tensor:
    """Every rank's slice of the last dim, in rank order (torch.chunk's split, padded to
    equal sizes for the all-gather)."""
    import torch.distributed as dist

    chunk = -(-full // info.size)
    if y.shape[-1] != chunk:
        y = torch.nn.functional.pad(y, (0, chunk - y.shape[-1]))
    parts = [torch.empty_like(y) for _ in range(info.size)]
    dist.all_gather(parts, y.contiguous(), group=info.group)
    return torch.cat(parts, dim=-1)[..., :full]


def sharded_valve_linear(model: nn.Module, name: str, module: nn.Module, state) -> ValveLinear | None:
    """The ShardedValveLinear for module ``name`` of a tensor-parallel model; None when the
    module is not sharded (the caller makes a plain ValveLinear)."""
    style = valve_style(model, name, module)
    if style is None:
        return None
    return ShardedValveLinear(module, state, style, tp_info(model))


class TPEmbedding:
    """``runner.embed`` of a tensor-parallel model: ``weight`` is the whole input
    embedding ``[V, E]``, gathered from the vocab shards when first read (every rank reads
    it at the same step: the first latent input), then kept. Models without latent rows
    never pay its memory. Calling it runs the model's own (sharded) embedding."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._full = None

    def __call__(self, ids):
        return self.module(ids)

    @property
    def weight(self) -> torch.Tensor:
        if self._full is None:
            w = self.module.weight
            D = _dtensor_cls()
            with torch.no_grad():
                self._full = w.full_tensor() if D is not None and isinstance(w, D) else w
        return self._full
