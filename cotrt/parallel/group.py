"""The process group of a tensor-parallel run, and the errors it raises.

``init(tp)`` joins the group ``torchrun`` launched (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` in the environment), before the model is loaded, so that
transformers' ``from_pretrained(..., tp_plan="auto")`` uses it instead of making its own
with a two-hour timeout. Every collective of the run (the model's all-reduces, the
lockstep broadcasts) then fails after ``timeout`` seconds instead of hanging when a rank
stalls; a rank that exits is noticed at once (its peers' sockets close).

Two groups: the default one (gloo on CPU, NCCL for CUDA tensors) carries the model's
collectives; a second, gloo-only group carries the lockstep's small host messages (what
changed before each step, a digest of what each step did), so they never queue behind
device work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_TIMEOUT_S = 120.0


class TPGroupError(RuntimeError):
    """The tensor-parallel group cannot go on: a rank died, stalled past the timeout, or
    the ranks no longer agree on what they decoded."""


def available() -> bool:
    """torch.distributed with gloo (what the CPU path and the lockstep messages need)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def world_size(env=None) -> int:
    """The number of processes the launcher started (1 outside torchrun)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not an integer") from None


def check_tp(tp, env=None) -> int:
    """``tp`` checked against the launch: an int >= 1 equal to ``WORLD_SIZE``; returns it."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp must be an int >= 1, got {tp!r}")
    ws = world_size(env)
    if tp != ws:
        if ws == 1:
            raise ValueError(f"--tp {tp} needs {tp} processes, one per shard: launch with "
                             f"`torchrun --nproc-per-node {tp} -m cotrt serve ... --tp {tp}` (WORLD_SIZE is 1)")
        raise ValueError(f"--tp {tp} does not match the {ws} processes torchrun started (WORLD_SIZE={ws}); "
                         f"pass --tp {ws} or --nproc-per-node {tp}")
    return tp


@dataclass
class TPGroup:
    """This process's place in the run: ``rank`` of ``size``, the gloo ``control`` group
    for the lockstep's messages, and the collectives' ``timeout`` (seconds)."""

    rank: int
    size: int
    control: object
    timeout: float
    device: torch.device

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


_GROUP: TPGroup | None = None  # the group init() joined


def init(tp: int | None = None, timeout: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> TPGroup:
    """Join the tensor-parallel group (idempotent: later calls return the first group).
    ``tp``: the expected number of ranks (checked against ``WORLD_SIZE``); ``backend``:
    default "gloo" on CPU, "cpu:gloo,cuda:nccl" when CUDA is available (each rank on GPU
    ``LOCAL_RANK``). Call it before loading the model: where transformers made the default
    group, ``timeout`` covers the lockstep messages only."""
    import torch.distributed as dist

    if not available():
        raise RuntimeError("tensor parallelism needs torch.distributed with gloo, which this torch build lacks")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    ws = world_size()
    if tp is not None:
        check_tp(tp)
    if ws > 1 and "RANK" not in os.environ:
        raise ValueError("WORLD_SIZE is set but RANK is not: launch the ranks with torchrun")
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("cpu:gloo,cuda:nccl" if cuda else "gloo"),
                                timeout=timedelta(seconds=timeout))
    global _GROUP
    if _GROUP is None:
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        _GROUP = TPGroup(dist.get_rank(), dist.get_world_size(), control, float(timeout), device)
    return _GROUP


def broadcast(obj, group: TPGroup):
    """``obj`` from rank 0 to every rank (pickled); collective failures -> TPGroupError."""
    import torch.distributed as dist

    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0, group=group.control)
    except (RuntimeError, dist.DistError) as e:
        where = "sending to the other ranks" if group.is_driver else "waiting for rank 0"
        raise TPGroupError(f"rank {group.rank}: lost the tensor-parallel group while {where} "
                           f"(a rank died or stalled past {group.timeout:g} s): {e}") from e
    return box[0]


def agree(value: int, group: TPGroup, what: str) -> None:
    """Check that every rank holds the same int64 ``value``; TPGroupError naming ``what`` when not."""
    import torch.distributed as dist

    t = torch.tensor([value, -value], dtype=torch.int64)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.control)
    except (RuntimeError, dist.DistError) as e:
        raise TPGroupError(f"rank {group.rank}: lost the tensor-parallel group after {what} "
                           f"(a rank died or stalled past {group.timeout:g} s): {e}") from e
    if int(t[0]) + int(t[1]) != 0:
        raise TPGroupError(f"rank {group.rank}: the tensor-parallel ranks diverged at {what} "
                           "(they decoded different tokens from the same inputs)")
