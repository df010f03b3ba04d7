"""Pipeline schedules as data: for each pipeline rank, the list of actions it runs, in order.

A table is `list[list[Action]]`, one list per pipeline rank. The same table is executed by the
runtime, checked here without processes (`check`), costed by an event simulation (`simulate`) and
drawn (`draw`).

Stages. With p ranks and v model chunks per rank, virtual stage s = chunk * p + rank (Megatron's
interleaving: rank r holds stages r, r+p, r+2p, ...); a micro-batch's forward runs through stages
0..p*v-1, its backward back from p*v-1 to 0. Without interleaving (v = 1) the stage is the rank.

Communication. Every builder returns tables that already hold their SEND/RECV actions. A SEND or
RECV carries the (mb, chunk) of the F/B it belongs to on its own rank, and the peer rank:

    SEND_F after the F that produces an activation for another rank, RECV_F before the F that needs it,
    SEND_B after the B that produces a gradient for another rank,   RECV_B before the B that needs it.

`with_communication` puts each SEND right after its producer and each RECV right before its
consumer, so between two computations there is at most one SEND then one RECV (Megatron's
send_forward_recv_backward). The interleaved schedule batches per 1F1B step instead, as Megatron
does: F, B, then [SEND_F, SEND_B, RECV_F, RECV_B] for the next step's F and B (placing each
RECV right before its consumer deadlocks there). Stages on the same rank (only when p = 1) hand
tensors over locally, with no action.

The runtime contract, which `simulate` models: all communication actions between two computations
are one batch. Before posting a batch, wait for the sends of the rank's previous batch; post the
batch together (batch_isend_irecv, in table order); wait for its receives before the next
computation; at the end, wait for the last sends. A send completes only once its receive is posted
(rendezvous, as NCCL does for large tensors), and sends match receives in posting order per ordered
pair of ranks, whatever their direction (NCCL has no tags). `check` simulates the stricter runtime
that also waits for a batch's sends at once, so a table that passes runs under either.

Costs. `simulate(t_f, t_b, t_w)`: in tables with W actions (zero-bubble) a B costs t_b and a W t_w;
in tables without, B is the full backward and costs t_b + t_w, so the same arguments compare every
schedule on the same work. Bubble = 1 - total busy time / (p * makespan). With t_comm = 0 the
simulation gives exactly (tests/test_schedules.py):

    GPipe, 1F1B              (p-1) / (m + p - 1)                         Narayanan et al. 2021
    interleaved 1F1B, v      (p-1) / (v*m + p - 1)                       the bubble time divided by v
    ZB-H1, t_w <= t_f        (p-1)(t_f+t_b-t_w) / (m(t_f+t_b+t_w) + (p-1)(t_f+t_b-t_w))   Qi et al. 2024
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

COMPUTE = ("F", "B", "W")
COMMUNICATION = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


class ScheduleError(ValueError):
    """A schedule table is broken; the one-line message says which rank and action."""


@dataclass(frozen=True)
class Action:
    kind: str
    """F forward, B backward (input gradient under zero-bubble, else the full backward), W weight
    gradient (zero-bubble only), or SEND_F, RECV_F, SEND_B, RECV_B."""
    mb: int
    """Micro-batch index."""
    chunk: int = 0
    """Model chunk on this rank (0 unless interleaved: 0..v-1)."""
    peer: int | None = None
    """For sends and receives: the pipeline rank on the other side."""

    def __str__(self) -> str:
        text = f"{self.kind}{self.mb}.{self.chunk}"
        if self.kind.startswith("SEND"):
            return f"{text}->{self.peer}"
        if self.kind.startswith("RECV"):
            return f"{text}<-{self.peer}"
        return text

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of str(): 'F3.0', 'SEND_B2.1->0', 'RECV_F0.0<-1'."""
        match = re.fullmatch(r"(F|B|W|SEND_F|RECV_F|SEND_B|RECV_B)(\d+)\.(\d+)(?:(?:->|<-)(\d+))?", text)
        if match is None:
            raise ValueError(f"action ({text!r}) must look like 'F3.0', 'SEND_F3.0->1' or 'RECV_B3.0<-1'")
        kind, mb, chunk, peer = match.groups()
        return cls(kind, int(mb), int(chunk), None if peer is None else int(peer))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE


Table = list[list[Action]]


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")


def _neighbour(stage: int, step: int, rank: int, p: int, v: int) -> int | None:
    """Rank holding stage + step, or None when there is none or it is this rank (local hand-over)."""
    other = stage + step
    if not 0 <= other < p * v or other % p == rank:
        return None
    return other % p


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

def gpipe(*, p: int, m: int) -> Table:
    """GPipe (Huang et al. 2019): all forwards, then all backwards in the same order (mb 0 first)."""
    _positive(p=p, m=m)
    table = [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]
    return with_communication(table, p=p)


def _one_f_one_b_rank(p: int, m: int, rank: int) -> list[Action]:
    warmup = min(p - rank - 1, m)
    actions = [Action("F", i) for i in range(warmup)]  # warm-up: fill the pipeline
    for i in range(m - warmup):  # steady 1F1B: one forward, then the oldest backward
        actions += [Action("F", warmup + i), Action("B", i)]
    actions += [Action("B", i) for i in range(m - warmup, m)]  # cool-down: drain
    return actions


def one_f_one_b(*, p: int, m: int) -> Table:
    """1F1B / PipeDream-Flush (Narayanan et al. 2021): rank r warms up with p - r - 1 forwards, then
    alternates one forward and one backward, so at most p - r micro-batches are in flight.

    m < p is allowed: the warm-up is cut to m forwards and the schedule degenerates towards GPipe.
    """
    _positive(p=p, m=m)
    return with_communication([_one_f_one_b_rank(p, m, rank) for rank in range(p)], p=p)


def interleaved_1f1b(*, p: int, m: int, v: int) -> Table:
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2): v chunks per rank cut the bubble by v.

    Work goes round in groups of p micro-batches: chunk 0 of mb 0..p-1, chunk 1 of the same, ...,
    then the next p micro-batches; backwards visit the chunks in reverse. Rank r warms up with
    2 * (p - r - 1) + (v - 1) * p forwards (Megatron-LM). Needs m % p == 0; v = 1 is plain 1F1B.
    """
    _positive(p=p, m=m, v=v)
    if m % p:
        raise ValueError(f"m ({m}) must be a multiple of p ({p}) for the interleaved schedule")
    if v == 1:
        return one_f_one_b(p=p, m=m)
    total = m * v  # (micro-batch, chunk) pairs per rank

    def forward(k: int) -> Action:
        return Action("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def backward(k: int) -> Action:
        return Action("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    steps = []
    for rank in range(p):
        warmup = min(2 * (p - rank - 1) + (v - 1) * p, total)
        rank_steps = [[forward(k)] for k in range(warmup)]  # warm-up
        for k in range(total - warmup):  # steady 1F1B: one step of a forward and a backward
            rank_steps.append([forward(warmup + k), backward(k)])
        rank_steps += [[backward(k)] for k in range(total - warmup, total)]  # cool-down
        steps.append(rank_steps)
    return _place(steps, p=p, v=v)


def zb_h1(*, p: int, m: int) -> Table:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split.

    B computes only the input gradient, which is what the previous stage waits for; W (the weight
    gradient) waits on nobody, so rank r runs it `r` steps late and the late W's fill the cool-down
    bubbles. The F/B order is 1F1B's, so activations in flight (F done, B not) are the same; the
    last rank holds up to p micro-batches whose W has not run, rank 0's 1F1B peak (as in the paper,
    and torch.distributed.pipelining's ZB1P with one stage per rank).
    """
    _positive(p=p, m=m)
    table = []
    for rank in range(p):
        actions = []
        for a in _one_f_one_b_rank(p, m, rank):  # warm-up, steady 1F1B, cool-down; B is input-grad only
            actions.append(a)
            if a.kind == "B" and a.mb >= rank:  # W trails B by `rank` micro-batches
                actions.append(Action("W", a.mb - rank))
        actions += [Action("W", i) for i in range(max(0, m - rank), m)]  # the deferred W's close the tail
        table.append(actions)
    return with_communication(table, p=p)


def build(schedule: str, *, p: int, m: int, v: int = 1) -> Table:
    """The table of `schedule` ('gpipe', '1f1b', 'interleaved' or 'zb') for p ranks and m micro-batches."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule ({schedule!r}) must be one of {', '.join(SCHEDULES)}")
    if schedule == "interleaved":
        return interleaved_1f1b(p=p, m=m, v=v)
    if v != 1:
        raise ValueError(f"v ({v}) needs schedule 'interleaved' (schedule is {schedule!r})")
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zb": zb_h1}[schedule](p=p, m=m)


def with_communication(table: Table, *, p: int, v: int = 1) -> Table:
    """Insert SEND/RECV actions into a compute-only table: each SEND right after the F/B that produces
    its tensor, each RECV right before the F/B that consumes it (see the module docstring)."""
    for rank, actions in enumerate(table):
        for a in actions:
            if not a.is_compute:
                raise ValueError(f"rank {rank}: {a} is already a communication action")
    return _place([[[a] for a in actions] for actions in table], p=p, v=v)


def _transfers(a: Action, rank: int, p: int, v: int) -> tuple[list[Action], list[Action]]:
    """The RECV a computation needs before it and the SEND it makes after it (none, or one each)."""
    if a.kind not in ("F", "B"):
        return [], []
    stage, flow = a.chunk * p + rank, (1 if a.kind == "F" else -1)  # activations flow up, gradients down
    src, dst = _neighbour(stage, -flow, rank, p, v), _neighbour(stage, flow, rank, p, v)
    recv = [] if src is None else [Action("RECV_" + a.kind, a.mb, a.chunk, src)]
    send = [] if dst is None else [Action("SEND_" + a.kind, a.mb, a.chunk, dst)]
    return recv, send


def _place(steps: list[list[list[Action]]], *, p: int, v: int) -> Table:
    """Flatten per-rank steps (groups of computations) with one communication batch between steps:
    the sends of what the previous step produced, then the receives of what the next step needs."""
    table = []
    for rank, rank_steps in enumerate(steps):
        actions, sends = [], []
        for step in rank_steps:
            transfers = [_transfers(a, rank, p, v) for a in step]
            actions += sends + [r for recv, _ in transfers for r in recv] + step
            sends = [s for _, send in transfers for s in send]
        table.append(actions + sends)
    return table


def format_table(table: Table) -> str:
    """One line per rank, e.g. 'rank 0: F0.0 SEND_F0.0->1 F1.0 ...'."""
    return "\n".join(f"rank {r}: " + " ".join(map(str, actions)) for r, actions in enumerate(table))


# ---------------------------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------------------------

def _edge(a: Action, rank: int, p: int) -> tuple[str, int, int]:
    """What a SEND/RECV carries, named the same on both sides: (direction, mb, receiving stage)."""
    stage = a.chunk * p + rank
    direction = a.kind[-1]
    if a.kind.startswith("SEND"):
        return direction, a.mb, stage + (1 if direction == "F" else -1)
    return direction, a.mb, stage


def check(table: Table, *, p: int, m: int, v: int = 1) -> None:
    """Raise ScheduleError, one line, on the first broken rule.

    Every (mb, chunk) of every rank has exactly one F and one B (and one W if the table has any), in
    the order F, B, W; every SEND has its RECV on the peer, posted in the same order between the two
    ranks; each tensor that crosses ranks is sent and received exactly once; and the table runs to
    the end in `simulate` under the strict runtime: no deadlock, every F after the previous stage's F,
    every B after the next stage's B (the last stage's after its F), every SEND after its producer.
    """
    _positive(p=p, m=m, v=v)
    if len(table) != p:
        raise ScheduleError(f"table has {len(table)} ranks, expected p ({p})")
    kinds = ("F", "B", "W") if any(a.kind == "W" for actions in table for a in actions) else ("F", "B")
    for rank, actions in enumerate(table):
        position: dict[tuple[str, int, int], int] = {}
        for i, a in enumerate(actions):
            if a.kind not in COMPUTE + COMMUNICATION or not (0 <= a.mb < m and 0 <= a.chunk < v):
                raise ScheduleError(f"rank {rank}: {a} is not an action of {m} micro-batches and {v} chunks")
            if a.is_compute and (a.kind, a.mb, a.chunk) in position:
                raise ScheduleError(f"rank {rank}: {a} appears twice")
            position[(a.kind, a.mb, a.chunk)] = i
        for chunk in range(v):
            for mb in range(m):
                for before, kind in zip((None,) + kinds, kinds):
                    if (kind, mb, chunk) not in position:
                        raise ScheduleError(f"rank {rank} has no {kind}{mb}.{chunk}")
                    if before and position[(kind, mb, chunk)] < position[(before, mb, chunk)]:
                        raise ScheduleError(f"rank {rank}: {kind}{mb}.{chunk} comes before {before}{mb}.{chunk}")

    sends: dict[tuple[int, int], list[Action]] = {}
    recvs: dict[tuple[int, int], list[Action]] = {}
    for rank, actions in enumerate(table):
        for a in actions:
            if a.kind.startswith("SEND"):
                sends.setdefault((rank, a.peer), []).append(a)
            elif a.kind.startswith("RECV"):
                recvs.setdefault((a.peer, rank), []).append(a)
    for src, dst in sorted(set(sends) | set(recvs), key=str):
        out = [(_edge(a, src, p), a) for a in sends.get((src, dst), [])]
        into = [(_edge(a, dst, p), a) for a in recvs.get((src, dst), [])]
        unsent = Counter(e for e, _ in into) - Counter(e for e, _ in out)
        unreceived = Counter(e for e, _ in out) - Counter(e for e, _ in into)
        for edge, a in into:
            if unsent[edge]:
                raise ScheduleError(f"rank {dst}: {a} has no matching SEND on rank {src}")
        for edge, a in out:
            if unreceived[edge]:
                raise ScheduleError(f"rank {src}: {a} has no matching RECV on rank {dst}")
        for (e1, a1), (e2, a2) in zip(out, into):
            if e1 != e2:
                raise ScheduleError(f"rank {src}: {a1} would be received by {a2} on rank {dst} "
                                    "(sends and receives between two ranks must be posted in the same order)")
    expected = with_communication([[a for a in actions if a.is_compute] for actions in table], p=p, v=v)
    for rank, (actions, want) in enumerate(zip(table, expected)):
        have, want = Counter(a for a in actions if not a.is_compute), Counter(a for a in want if not a.is_compute)
        for a in sorted(want - have, key=str):
            raise ScheduleError(f"rank {rank}: missing {a}")
        for a in sorted(have - want, key=str):
            raise ScheduleError(f"rank {rank}: unexpected {a}")
    simulate(table, overlap_sends=False)


# ---------------------------------------------------------------------------------------------
# Simulation and timelines
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """What each rank did and when: simulated by `simulate`, or measured (`from_records`)."""

    events: tuple[Event, ...]
    p: int

    @classmethod
    def from_records(cls, records, *, p: int | None = None) -> Timeline:
        """From measured (rank, action, start, end) records; action is an Action or its string form."""
        events = tuple(Event(int(r), a if isinstance(a, Action) else Action.parse(a), float(s), float(e))
                       for r, a, s, e in records)
        return cls(events, p if p is not None else 1 + max((e.rank for e in events), default=0))

    def on(self, rank: int) -> list[Event]:
        """Events of one rank in the order they started."""
        return sorted((e for e in self.events if e.rank == rank), key=lambda e: (e.start, e.end))

    @property
    def makespan(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(e.start for e in self.events)

    @property
    def busy(self) -> list[float]:
        """Per rank: time spent computing (F, B, W); communication is not counted."""
        busy = [0.0] * self.p
        for e in self.events:
            if e.action.is_compute:
                busy[e.rank] += e.end - e.start
        return busy

    @property
    def bubble(self) -> float:
        """1 - total busy / (p * makespan): the idle share of the pipeline."""
        span = self.makespan
        return 0.0 if span == 0 else 1.0 - sum(self.busy) / (self.p * span)

    @property
    def peak_in_flight(self) -> list[int]:
        """Per rank: most (micro-batch, chunk) pairs whose F has run and B has not (activation memory)."""
        peaks = []
        for rank in range(self.p):
            live: set[tuple[int, int]] = set()
            peak = 0
            for e in self.on(rank):
                if e.action.kind == "F":
                    live.add((e.action.mb, e.action.chunk))
                    peak = max(peak, len(live))
                elif e.action.kind == "B":
                    live.discard((e.action.mb, e.action.chunk))
            peaks.append(peak)
        return peaks


class _Simulation:
    """Each rank runs its actions in order; an action starts when the rank is free and its inputs are in.

    The communication actions between two computations form one batch, posted together once the
    sends of the rank's previous batch have completed. Each send is matched to the receive with the
    same position in posting order between the same two ranks; the pair completes at max(both posting
    times) + t_comm. The rank waits for the batch's receives before its next computation; its sends
    complete in the background (they are waited for at the next batch, or at the end).
    """

    def __init__(self, table: Table, cost: dict[str, float], t_comm: float, overlap_sends: bool = True,
                 extra: dict[str, float] | None = None):
        self.table, self.cost, self.t_comm = table, cost, t_comm
        self.extra = extra or {}  # added on the last stage
        self.overlap_sends = overlap_sends
        self.p = len(table)
        self.v = 1 + max((a.chunk for actions in table for a in actions), default=0)
        self.pos = [0] * self.p
        self.clock = [0.0] * self.p
        self.done: dict[tuple[str, int, int], float] = {}  # (kind, mb, stage) -> end time
        self.arrived: dict[tuple[str, int, int], float] = {}  # (direction, mb, receiving stage) -> time
        self.posted: dict[tuple, list[tuple[Action, float]]] = {}  # ("S"|"R", src, dst) -> posts in order
        # a posted operation: (action, (src, dst), index in posting order between src and dst, time posted)
        self.batch: dict[int, list[tuple[Action, tuple[int, int], int, float]]] = {}  # rank -> its batch
        self.sending: list[list[tuple[Action, tuple[int, int], int, float]]] = [[] for _ in table]
        self.events: list[Event] = []

    def finished(self, rank: int) -> bool:
        return self.pos[rank] == len(self.table[rank]) and not self.sending[rank]

    def run(self) -> Timeline:
        while not all(map(self.finished, range(self.p))):
            progressed = False
            for rank in range(self.p):
                while not self.finished(rank) and self.step(rank):
                    progressed = True
            if not progressed:
                stuck = [f"rank {r} at {self.blocked_at(r)}" for r in range(self.p) if not self.finished(r)]
                raise ScheduleError("deadlock: " + "; ".join(stuck))
        return Timeline(tuple(self.events), self.p)

    def blocked_at(self, rank: int) -> str:
        if self.sending[rank]:
            a = self.sending[rank][0][0]
            return f"{a} (rank {a.peer} has not posted the matching RECV)"
        a = self.table[rank][self.pos[rank]]
        if not a.is_compute:
            return f"{a} (rank {a.peer} has not posted the matching {'SEND' if a.kind.startswith('RECV') else 'RECV'})"
        how, (kind, mb, stage) = self.needs(rank, a)
        if how == "done":
            return f"{a} (needs {kind}{mb} of stage {stage} first)"
        return f"{a} (no RECV_{kind}{mb}.{a.chunk} ran before it)"

    def needs(self, rank: int, a: Action) -> tuple[str, tuple[str, int, int]] | None:
        """The input of a computation that comes from another stage: received, or done on this rank."""
        stage = a.chunk * self.p + rank
        step = {"F": -1, "B": 1}.get(a.kind)
        if step is None or not 0 <= stage + step < self.p * self.v:
            return None
        if (stage + step) % self.p == rank:
            return "done", (a.kind, a.mb, stage + step)
        return "arrived", (a.kind, a.mb, stage)

    def require_local(self, rank: int, a: Action) -> None:
        """B needs its F, W its B and a SEND its producer to have run earlier on the same rank."""
        before = {"B": "F", "W": "B", "SEND_F": "F", "SEND_B": "B"}.get(a.kind)
        if before is not None and (before, a.mb, a.chunk * self.p + rank) not in self.done:
            raise ScheduleError(f"rank {rank}: {a} comes before {before}{a.mb}.{a.chunk}")

    def step(self, rank: int) -> bool:
        if self.pos[rank] == len(self.table[rank]):
            return self.sent(rank)
        a = self.table[rank][self.pos[rank]]
        if not a.is_compute:
            return self.communicate(rank)
        self.require_local(rank, a)
        stage = a.chunk * self.p + rank
        start = self.clock[rank]
        if (need := self.needs(rank, a)) is not None:
            where = self.arrived if need[0] == "arrived" else self.done
            if need[1] not in where:
                return False
            start = max(start, where[need[1]])
        end = start + self.cost[a.kind] + (self.extra.get(a.kind, 0.0) if stage == self.p * self.v - 1 else 0.0)
        self.done[(a.kind, a.mb, stage)] = end
        self.events.append(Event(rank, a, start, end))
        self.clock[rank] = end
        self.pos[rank] += 1
        return True

    def match(self, a: Action, pair: tuple[int, int], index: int, posted: float) -> float | None:
        """Completion time of the send/receive pair at `index` between `pair`, or None if not yet posted."""
        sends, recvs = self.posted.get(("S",) + pair, []), self.posted.get(("R",) + pair, [])
        if index >= len(sends) or index >= len(recvs):
            return None
        (out, t_send), (into, t_recv) = sends[index], recvs[index]
        if _edge(out, pair[0], self.p) != _edge(into, pair[1], self.p):
            raise ScheduleError(f"rank {pair[0]}: {out} would be received by {into} on rank {pair[1]} "
                                "(sends and receives between two ranks must be posted in the same order)")
        return max(t_send, t_recv) + self.t_comm

    def sent(self, rank: int) -> bool:
        """Wait for the rank's sends still in flight; False while one is unmatched."""
        ends = [self.match(*op) for op in self.sending[rank]]
        if None in ends:
            return False
        for (a, _, _, posted), end in zip(self.sending[rank], ends):
            self.events.append(Event(rank, a, posted, end))
        self.clock[rank] = max([self.clock[rank]] + ends)
        self.sending[rank] = []
        return True

    def communicate(self, rank: int) -> bool:
        if rank not in self.batch:  # post every communication action up to the next computation
            if not self.sent(rank):
                return False
            batch, i, actions = [], self.pos[rank], self.table[rank]
            while i < len(actions) and not actions[i].is_compute:
                a = actions[i]
                self.require_local(rank, a)
                key = ("S", rank, a.peer) if a.kind.startswith("SEND") else ("R", a.peer, rank)
                side = self.posted.setdefault(key, [])
                batch.append((a, key[1:], len(side), self.clock[rank]))
                side.append((a, self.clock[rank]))
                i += 1
            self.batch[rank] = batch
        waited = [op for op in self.batch[rank] if op[0].kind.startswith("RECV") or not self.overlap_sends]
        ends = [self.match(*op) for op in waited]
        if None in ends:
            return False
        for (a, _, _, posted), end in zip(waited, ends):
            self.events.append(Event(rank, a, posted, end))
            if a.kind.startswith("RECV"):
                self.arrived[_edge(a, rank, self.p)] = end
        self.sending[rank] = [op for op in self.batch[rank] if op not in waited]
        self.clock[rank] = max([self.clock[rank]] + ends)
        self.pos[rank] += len(self.batch.pop(rank))
        return True


def simulate(table: Table, *, t_f: float = 1.0, t_b: float = 2.0, t_w: float = 0.0,
             t_comm: float = 0.0, overlap_sends: bool = True, last: tuple[float, float, float] = (0.0, 0.0, 0.0)
             ) -> Timeline:
    """Run the table in an event simulation; raise ScheduleError('deadlock: ...') if it cannot finish.

    t_f, t_b, t_w are the times of one micro-batch through a rank's whole share of the model: an
    action on one of v chunks takes 1/v of it, so makespans of different schedules compare. A B
    costs t_b and a W t_w when the table has W actions; otherwise B is the full backward and costs
    t_b + t_w. `last` = (f, b, w) is added to the actions of the last stage only (the output layer and
    the loss, which no other stage runs). Each send/receive pair takes t_comm once both sides have
    posted it. With overlap_sends (the runtime contract) a batch's sends are waited for at the rank's
    next batch; without, at once, with its receives (stricter: what `check` uses).
    """
    split = any(a.kind == "W" for actions in table for a in actions)
    v = 1 + max((a.chunk for actions in table for a in actions), default=0)
    cost = {"F": t_f / v, "B": (t_b if split else t_b + t_w) / v, "W": t_w / v}
    extra = {"F": last[0], "B": last[1] if split else last[1] + last[2], "W": last[2]}
    return _Simulation(table, cost, t_comm, overlap_sends, extra).run()


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

_COLOURS = {"F": "Blues", "B": "Greens", "W": "Purples"}


def draw(timeline: Timeline, path: str | Path, *, title: str = "") -> Path:
    """Write a PNG: one row per rank, F/B/W boxes labelled with the micro-batch (a lighter shade per
    later chunk), idle time as gaps; sends and receives are not drawn."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    v = 1 + max((e.action.chunk for e in timeline.events), default=0)
    origin = min((e.start for e in timeline.events), default=0.0)
    span = timeline.makespan or 1.0
    longest = max((sum(e.action.is_compute for e in timeline.on(r)) for r in range(timeline.p)), default=0)
    fig = Figure(figsize=(min(24, 6 + 0.3 * longest), 0.6 * timeline.p + 1.4))
    ax = fig.add_subplot()
    for e in timeline.events:
        if not e.action.is_compute:
            continue
        shade = 0.75 - 0.4 * e.action.chunk / max(1, v - 1)
        colour = matplotlib.colormaps[_COLOURS[e.action.kind]](shade)
        ax.barh(e.rank, e.end - e.start, left=e.start - origin, height=0.8, color=colour, edgecolor="black",
                linewidth=0.4)
        if (e.end - e.start) / span > 0.012:
            ax.text((e.start + e.end) / 2 - origin, e.rank, str(e.action.mb), ha="center", va="center",
                    fontsize=7, color="white" if shade > 0.5 else "black")
    ax.set_yticks(range(timeline.p), [f"rank {r}" for r in range(timeline.p)])
    ax.set_ylim(timeline.p - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel("time")
    kinds = sorted({e.action.kind for e in timeline.events if e.action.is_compute}, key=COMPUTE.index)
    ax.legend(handles=[Patch(color=matplotlib.colormaps[_COLOURS[k]](0.75), label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncols=len(kinds), frameon=False)
    ax.set_title(f"{title}{' - ' if title else ''}bubble {timeline.bubble:.1%}", fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
