"""Tensor parallelism over torch.distributed, with transformers' own TP plans.

A model loaded under ``torchrun`` with ``from_pretrained(path, tp_plan="auto")`` is wrapped
as any other (``cotrt.wrap``): each rank's slot cache holds its local KV heads, attention
runs on its local heads, and the plan's collectives make every layer's output, the
final-norm state and the logits the same on every rank. cotrt is SPMD: every rank runs the
same engine step on the same inputs and draws the same seeded tokens, so every rank holds
the same tokens; sampling, the token automaton and the controls run on every rank alike.

- ``group.py``: ``init(tp)`` joins the torchrun group with a timeout on every collective;
  ``check_tp``; ``TPGroupError``.
- ``shard.py``: the model's layout (``tp_info``: plan, local KV heads), valves on sharded
  linears (``ShardedValveLinear``), the embedding gathered for latent inputs.
- ``lockstep.py``: one driver (rank 0) takes requests and steps; before each step it
  broadcasts what changed (new requests with their params and prompt ids, aborts, valve
  changes) and the other ranks (``follow``) replay it and step with it.

    group = cotrt.parallel.init(tp=2)
    model, tok = cotrt.load_model(path, tp_plan="auto")
    rt = cotrt.wrap(model, tok)
    if group.rank == 0:
        engine = cotrt.parallel.lockstep(rt, group)   # rt.engine now broadcasts before each step
        ...                                     # rt.generate / AsyncEngine(rt) as usual
        engine.close()                          # the followers return
    else:
        cotrt.parallel.follow(rt, group)
"""
from .group import DEFAULT_TIMEOUT_S, TPGroup, TPGroupError, available, check_tp, init
from .lockstep import Lockstep, follow, lockstep
from .shard import ShardedValveLinear, TPInfo, tp_info

__all__ = ["DEFAULT_TIMEOUT_S", "Lockstep", "ShardedValveLinear", "TPGroup", "TPGroupError", "TPInfo", "available",
           "check_tp", "follow", "init", "lockstep", "tp_info"]
