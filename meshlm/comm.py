"""Collectives that every parallelism goes through, and the meter that counts them.

Every collective takes its process group explicitly and is a no-op when the group is None (size 1),
so single-process and distributed runs share one code path. `CommMeter` counts calls, bytes and
seconds per (operation, axis): the trainer reports them, and tests check the bytes against the
formula (an all-reduce of n bytes over one group is recorded as n bytes of payload).

The meter is also a flight recorder: `begin(...)` before a blocking collective and `end(entry)` after it
keep the last `flight_size` operations of this rank in a ring, each with a sequence number per (axis,
group), so that after a hang the dumps of the ranks show who never entered which collective
(`meshlm.diagnose`). `record(...)` adds a completed operation (for call sites that time it themselves).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStat:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


FLIGHT_SIZE = 2048
"""Operations kept per rank by the flight recorder (the oldest are dropped)."""

_group_ranks: dict[int, tuple[int, ...]] = {}


def group_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...] | None:
    """The global ranks of `group` (cached: asked once per group)."""
    if group is None:
        return None
    key = id(group)
    if key not in _group_ranks:
        _group_ranks[key] = tuple(dist.get_process_group_ranks(group))
    return _group_ranks[key]


@dataclass
class CommMeter:
    """Calls, payload bytes and wall seconds per (operation, axis); and the flight recorder's ring."""

    stats: dict[tuple[str, str], CommStat] = field(default_factory=lambda: defaultdict(CommStat))
    flight: deque = field(default_factory=lambda: deque(maxlen=FLIGHT_SIZE))
    """The last operations: dicts of seq, op, axis, ranks (of the group), bytes, shape, action, start, end."""
    seqs: dict[tuple[str, tuple[int, ...] | None], int] = field(default_factory=dict)
    """The number of operations entered so far per (axis, group ranks): sequence numbers count from 1."""
    recording: bool = True
    """Keep the flight ring (False: counters only, to measure the recorder's cost)."""

    def begin(self, op: str, axis: str, nbytes: int, *, group: dist.ProcessGroup | None = None,
              shape: tuple[int, ...] | None = None, action: str | None = None) -> dict | None:
        """Enter a collective: returns the ring entry that `end` completes (None when not recording)."""
        if not self.recording:
            return {"op": op, "axis": axis, "bytes": nbytes, "start": time.perf_counter()}
        ranks = group_ranks(group)
        key = (axis, ranks)
        seq = self.seqs.get(key, 0) + 1
        self.seqs[key] = seq
        entry = {"seq": seq, "op": op, "axis": axis, "ranks": ranks, "bytes": nbytes,
                 "shape": list(shape) if shape is not None else None, "action": action,
                 "start": time.perf_counter(), "end": None}
        self.flight.append(entry)
        return entry

    def end(self, entry: dict, *, seconds: float | None = None) -> None:
        """Leave the collective `begin` entered: its bytes and time (`seconds` when given: an asynchronous
        operation whose waiting is counted apart) go to the counters."""
        now = time.perf_counter()
        if "end" in entry:
            entry["end"] = now
        self._count(entry["op"], entry["axis"], entry["bytes"], now - entry["start"] if seconds is None else seconds)

    def record(self, op: str, axis: str, nbytes: int, seconds: float) -> None:
        """A completed operation (its time measured by the caller)."""
        self._count(op, axis, nbytes, seconds)
        if self.recording:
            key = (axis, None)
            seq = self.seqs.get(key, 0) + 1
            self.seqs[key] = seq
            now = time.perf_counter()
            self.flight.append({"seq": seq, "op": op, "axis": axis, "ranks": None, "bytes": nbytes, "shape": None,
                                "action": None, "start": now - seconds, "end": now})

    def _count(self, op: str, axis: str, nbytes: int, seconds: float) -> None:
        s = self.stats[(op, axis)]
        s.calls += 1
        s.bytes += nbytes
        s.seconds += seconds

    def open_entries(self) -> list[dict]:
        """Operations entered and not completed (what this rank is blocked in)."""
        return [e for e in list(self.flight) if e.get("end", 0) is None]  # list(): atomic, for a watchdog thread

    def flight_state(self) -> dict:
        """The ring and the sequence counters, as JSON-ready data (times in perf_counter seconds)."""
        return {"now": time.perf_counter(), "ops": [dict(e) for e in list(self.flight)],
                "seqs": [{"axis": a, "ranks": r, "seq": n} for (a, r), n in self.seqs.items()]}

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
    entry = meter.begin("all_reduce", axis, tensor.numel() * tensor.element_size(), group=group,
                        shape=tuple(tensor.shape)) if meter is not None else None
    dist.all_reduce(tensor, op=op, group=group)
    if entry is not None:
        meter.end(entry)
    return tensor

