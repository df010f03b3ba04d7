"""Collectives that every parallelism goes through, and the meter that counts them.

Every collective takes its process group explicitly and is a no-op when the group is None (size 1),
so single-process and distributed runs share one code path. `CommMeter` counts calls, bytes and
seconds per (operation, axis): the trainer reports them, and tests check the bytes against the
formula (an all-reduce of n bytes over one group is recorded as n bytes of payload).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStat:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class CommMeter:
    """Calls, payload bytes and wall seconds per (operation, axis)."""

    stats: dict[tuple[str, str], CommStat] = field(default_factory=lambda: defaultdict(CommStat))

    def record(self, op: str, axis: str, nbytes: int, seconds: float) -> None:
        s = self.stats[(op, axis)]
        s.calls += 1
        s.bytes += nbytes
        s.seconds += seconds

    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.stats.values())

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stats.values())

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"{op}/{axis}": {"calls": s.calls, "bytes": s.bytes, "seconds": round(s.seconds, 6)}
                for (op, axis), s in sorted(self.stats.items())}

    def reset(self) -> None:
        self.stats.clear()


def all_reduce_(tensor: torch.Tensor, group: dist.ProcessGroup | None, *, axis: str,
                meter: CommMeter | None = None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group` (SUM by default); returns the tensor. No-op for group None."""
    if group is None:
        return tensor
    start = time.perf_counter()
    dist.all_reduce(tensor, op=op, group=group)
    if meter is not None:
        meter.record("all_reduce", axis, tensor.numel() * tensor.element_size(), time.perf_counter() - start)
    return tensor

