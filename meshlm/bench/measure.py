"""What a bench job measures on each rank: step times, training-state bytes, peak memory.

`state_bytes` is the memory that the parallel strategy decides about: parameters + gradients +
optimizer states held by this rank. For DDP-style data parallelism it is 16 bytes per parameter
in fp32 (4 weights + 4 gradients + 8 AdamW moments); ZeRO-1/2/3 and FSDP shard parts of it over the
ranks. It is counted from the tensors themselves, by distinct storage (views into one flat buffer
count once, a freed storage counts 0; a DTensor counts its local shard), at the moment it is
largest in a step: right after the optimizer step, before the gradients are freed.

Peak memory on CPU is the process's peak resident set (getrusage), which includes the Python and
torch baseline of a few hundred MB; the bench also records that baseline, taken before the model
is built.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor (FSDP2): this rank's shard
    return to_local() if callable(to_local) else t


def state_bytes(params: Iterable[torch.Tensor], optimizer: object | None = None) -> int:
    """Bytes of distinct storages behind params, their .grad, and the optimizer's params, grads and states."""
    tensors: list[torch.Tensor] = []
    for p in params:
        tensors += [p, p.grad] if p.grad is not None else [p]
    if isinstance(optimizer, torch.optim.Optimizer):
        for group in optimizer.param_groups:  # a sharded optimizer may hold flat shards the model does not
            for p in group["params"]:
                tensors += [p, p.grad] if p.grad is not None else [p]
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = _local(t).untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class StateProbe:
    """Counts `state_bytes` right after every optimizer step (gradients still held); keeps the largest."""

    def __init__(self, params: list[torch.Tensor], optimizer: object):
        self.params, self.optimizer, self.peak = params, optimizer, 0
        self.handle = None
        if isinstance(optimizer, torch.optim.Optimizer):
            self.handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.count())

    def count(self) -> None:
        self.peak = max(self.peak, state_bytes(self.params, self.optimizer))

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum of a list of numbers over all ranks (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def max_per_key_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """{key: the largest value any rank has for it}: a parameter server's ranks send different things."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    every: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, values)
    out: dict[str, float] = {}
    for d in every:
        for k, v in d.items():
            out[k] = max(out.get(k, 0.0), v)
    return dict(sorted(out.items()))


def median_step_time(step_times: list[float], *, warmup: int) -> float:
    """Median of the step times after the warm-up steps (all of them if there are no others)."""
    timed = step_times[warmup:] or step_times
    return statistics.median(timed)
