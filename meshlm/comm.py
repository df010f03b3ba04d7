"""Collectives that every parallelism goes through, and the meter that counts them.

Every collective takes its process group explicitly and is a no-op when the group is None (size 1),
so single-process and distributed runs share one code path. `CommMeter` counts calls, bytes and
seconds per (operation, axis): the trainer reports them, and tests check the bytes against the
formula (an all-reduce of n bytes over one group is recorded as n bytes of payload).

The meter is also a flight recorder: `begin(...)` before a blocking collective and `end(entry)` after it
keep the last `flight_size` operations of this rank in a ring, each with a sequence number per (axis,
group), so that after a hang the dumps of the ranks show who never entered which collective
(`meshlm.diagnose`). `span(meter, ...)` brackets a block the same way (off the hot path; a meter of None
records nothing). An asynchronous operation is entered when it is launched and left when it has been
waited on. `record(...)` adds a completed operation without a group (one that no peer must match).

While `profiling` is on (train.profile_steps), `begin` also opens a profiler range named by the
operation and axis ("all_reduce dp", "all_to_all ep") and `end` closes it, so that the PyTorch
profiler's trace shows meshlm's collectives by name; off, no range object is created.
"""

from __future__ import annotations

import contextlib
import time
import weakref
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

_group_ranks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""group -> its global ranks; an entry goes with its group (keyed by id, a destroyed group's id could be
reused by a new group and answer with the old one's ranks)."""


def group_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...] | None:
    """The global ranks of `group` (cached: asked once per group)."""
    if group is None:
        return None
    try:
        ranks = _group_ranks.get(group)
    except TypeError:  # not weakly referenceable: not a ProcessGroup; let torch say what it is
        return tuple(dist.get_process_group_ranks(group))
    if ranks is None:
        ranks = _group_ranks[group] = tuple(dist.get_process_group_ranks(group))
    return ranks


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
    profiling: bool = False
    """Open a profiler range (`torch.profiler.record_function`) per operation, named "op axis"."""

    def begin(self, op: str, axis: str, nbytes: int, *, group: dist.ProcessGroup | None = None,
              shape: tuple[int, ...] | None = None, action: str | None = None) -> dict:
        """Enter a collective: returns the entry that `end` completes (in the ring when recording)."""
        if not self.recording:
            entry = {"op": op, "axis": axis, "bytes": nbytes, "start": time.perf_counter()}
        else:
            ranks = group_ranks(group)
            key = (axis, ranks)
            seq = self.seqs.get(key, 0) + 1
            self.seqs[key] = seq
            entry = {"seq": seq, "op": op, "axis": axis, "ranks": ranks, "bytes": nbytes,
                     "shape": list(shape) if shape is not None else None, "action": action,
                     "start": time.perf_counter(), "end": None}
            self.flight.append(entry)
        if self.profiling:
            entry["_range"] = _open_range(f"{op} {axis}" + (f": {action}" if action else ""))
        return entry

    def end(self, entry: dict, *, seconds: float | None = None, count: bool = True) -> None:
        """Leave the collective `begin` entered: its bytes and time (`seconds` when given: an asynchronous
        operation whose waiting is counted apart) go to the counters, unless `count` is False."""
        now = time.perf_counter()
        if "end" in entry:
            entry["end"] = now
        if "_range" in entry:
            entry.pop("_range").__exit__(None, None, None)
        if count:
            self._count(entry["op"], entry["axis"], entry["bytes"],
                        now - entry["start"] if seconds is None else seconds)

    @contextlib.contextmanager
    def span(self, op: str, axis: str, nbytes: int, *, group: dist.ProcessGroup | None = None,
             shape: tuple[int, ...] | None = None):
        """`begin` ... `end` around a block (for call sites off the hot path). An exception leaves the
        entry open: the dump then shows the operation this rank failed in."""
        entry = self.begin(op, axis, nbytes, group=group, shape=shape)
        yield entry
        self.end(entry)

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
        """The ring and the sequence counters, as JSON-ready data (times in perf_counter seconds).

        Safe from another thread (the watchdog, a signal): list() copies the ring and the counters
        atomically under the GIL, so the main thread may go on appending while this runs."""
        return {"now": time.perf_counter(),
                "ops": [_without_range(dict(e)) for e in list(self.flight)],
                "seqs": [{"axis": a, "ranks": r, "seq": n} for (a, r), n in list(self.seqs.items())]}

    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.stats.values())

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stats.values())

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"{op}/{axis}": {"calls": s.calls, "bytes": s.bytes, "seconds": round(s.seconds, 6)}
                for (op, axis), s in sorted(self.stats.items())}

    def reset(self) -> None:
        self.stats.clear()


def _without_range(entry: dict) -> dict:
    entry.pop("_range", None)
    return entry


def _open_range(name: str):
    """An entered profiler range, closed by `end` (possibly after other ranges: an asynchronous operation)."""
    r = torch.profiler.record_function(name)
    r.__enter__()
    return r


def span(meter: CommMeter | None, op: str, axis: str, tensor: torch.Tensor | None = None, *,
         group: dist.ProcessGroup | None = None, nbytes: int | None = None):
    """`meter.span(...)` for a meter that may be None (then nothing is recorded); the bytes are the
    tensor's unless `nbytes` is given."""
    if meter is None:
        return contextlib.nullcontext()
    if nbytes is None:
        nbytes = tensor.numel() * tensor.element_size() if tensor is not None else 0
    return meter.span(op, axis, nbytes, group=group, shape=tuple(tensor.shape) if tensor is not None else None)


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

