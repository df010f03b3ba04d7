"""Hang diagnosis from the flight recorder: each rank's last collectives, dumped and compared.

Every collective that goes through meshlm's communication layer is entered in the rank's `CommMeter`
ring (comm.py) with a sequence number per (axis, group). When a collective times out, each rank that
can dumps its ring to `<out_dir>/flight/rank<R>.json` (also on SIGUSR1). A rank blocked in collective
#k of a group waits for the members whose dumps show fewer than k entries of that group, or that left
no dump at all (blocked outside a collective, or dead). Those are named:

    rank 3 (dp 1, tp 1) never entered all_reduce #14 on the tp axis (no dump: blocked outside a
    collective, or dead); ranks 0-2 waited 10 s

`meshlm doctor RUN_DIR` prints the same from the dumps afterwards.

SIGUSR1 (`kill -USR1 PID` on a rank) dumps that rank's ring while the job goes on, also when the rank
is blocked inside a collective: see `on_signal` for how.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError


def run_id() -> str:
    """An id the ranks of one job attempt share, and the next attempt or run does not."""
    env = os.environ
    return (f"{env.get('TORCHELASTIC_RUN_ID', 'local')}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
            f"/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def dump_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / "flight" / f"rank{rank}.json"


def dump(meter, out_dir: Path, *, rank: int, world: int, layout: dict, coords: dict, step: int,
         reason: str) -> Path:
    """Write this rank's flight ring; times are seconds before the dump (negative), open ops have end None."""
    state = meter.flight_state()
    now = state["now"]
    ops = [{**e, "start": round(e["start"] - now, 6), "end": None if e["end"] is None else round(e["end"] - now, 6)}
           for e in state["ops"]]
    doc = {"run_id": run_id(), "rank": rank, "world": world, "layout": layout, "coords": coords, "step": step,
           "reason": reason, "time": time.time(), "ops": ops, "seqs": state["seqs"]}
    path = dump_path(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{threading.get_ident()}.tmp")  # a signal and the watchdog may dump at once
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # a reader never sees half a dump
    return path


def on_signal(signum: int, action: Callable[[], None]) -> Callable[[], None]:
    """Run `action()` each time this process receives `signum`, even while the main thread is blocked
    inside a collective; returns a function that undoes it. Call both from the main thread.

    Why not `signal.signal(signum, handler)` alone: CPython runs a Python handler in the main thread,
    between two bytecodes, so a main thread blocked inside a gloo or NCCL call (C++, the GIL released)
    would run it only when the call returns, which in a hang is never. What does run at once is CPython's
    C-level handler (in whichever thread the kernel picks), and it writes the signal's number to the
    "wakeup fd" (`signal.set_wakeup_fd`). So a daemon thread blocks reading that pipe and calls `action`
    when the number arrives, while the main thread stays where it is. (`signal.sigwait` in a thread would
    need the signal blocked in every other thread, and gloo's and OpenMP's threads exist before we could
    block it there.) Where the wakeup fd is taken already (an asyncio loop in the main thread), the
    plain handler is installed instead: it dumps once the main thread is back in Python.
    """
    import signal

    r, w = os.pipe()
    os.set_blocking(w, False)  # the C handler must never block: a full pipe drops the byte
    previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    if previous_fd != -1:
        signal.set_wakeup_fd(previous_fd)
        os.close(r)
        os.close(w)
        previous = signal.signal(signum, lambda *_: action())
        return lambda: signal.signal(signum, previous)
    # The Python-level handler does nothing (the thread acts); it replaces the default action, which for
    # SIGUSR1 is to terminate the process.
    previous = signal.signal(signum, lambda *_: None)

    def pump() -> None:
        try:
            while data := os.read(r, 64):  # one byte per signal delivered (any signal with a Python handler)
                if signum in data:
                    try:
                        action()
                    except Exception as e:  # noqa: BLE001 - keep listening
                        print(f"meshlm: on signal {signum}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            os.close(r)

    thread = threading.Thread(target=pump, name=f"meshlm-signal-{signum}", daemon=True)
    thread.start()

    def undo() -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signum, previous)
        os.close(w)  # the thread reads end-of-file and ends ...
        # ... and is waited for: a daemon thread still blocked in read() when the interpreter exits is ended
        # by pthread_exit, whose unwinding through torch's C++ frames aborts the process ("terminate called
        # without an active exception"; CPython 3.12 no longer does this).
        thread.join(timeout=5.0)

    return undo


def load_dumps(run_dir: Path) -> dict[int, dict]:
    """The dumps of one run by rank; ConfigError when there are none, or when they are of different runs."""
    folder = Path(run_dir) / "flight"
    files = sorted(folder.glob("rank*.json")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{run_dir}: no flight-recorder dumps (flight/rank*.json); a rank writes one when a "
                          "collective times out or on SIGUSR1")
    dumps = {}
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{f}: not a flight-recorder dump ({e})") from None
        dumps[d["rank"]] = d
    ids = sorted({d["run_id"] for d in dumps.values()})
    if len(ids) > 1:
        raise ConfigError(f"{folder}: dumps of different runs ({', '.join(ids)}); remove the stale ones")
    return dumps


def wait_for_dumps(run_dir: Path, *, world: int, seconds: float, rid: str) -> dict[int, dict]:
    """The dumps of this run attempt that exist within `seconds` (all `world` of them, or fewer)."""
    deadline = time.monotonic() + seconds
    while True:
        dumps = {}
        for r in range(world):
            try:
                d = json.loads(dump_path(run_dir, r).read_text())
            except (OSError, ValueError):
                continue
            if d.get("run_id") == rid:
                dumps[r] = d
        if len(dumps) == world or time.monotonic() >= deadline:
            return dumps
        time.sleep(0.2)


def _coords_of(rank: int, dumps: dict[int, dict]) -> dict[str, int]:
    """A rank's mesh coordinates: from its dump, or from the layout (a rank that left no dump)."""
    if rank in dumps:
        return dumps[rank]["coords"]
    from .layout import AXES, Layout
    from .mesh import rank_grid
    layout = Layout(**next(iter(dumps.values()))["layout"])
    idx = (rank_grid(layout) == rank).nonzero()[0].tolist()
    return dict(zip(AXES, idx))


def _describe(rank: int, dumps: dict[int, dict]) -> str:
    coords = _coords_of(rank, dumps)
    inner = ", ".join(f"{a} {c}" for a, c in coords.items() if c or _axis_size(dumps, a) > 1)
    return f"rank {rank}" + (f" ({inner})" if inner else "")


def _axis_size(dumps: dict[int, dict], axis: str) -> int:
    return int(next(iter(dumps.values()))["layout"].get(axis, 1))


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, ranks = [], sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(f"{ranks[i]}-{ranks[j]}" if j > i + 1 else ", ".join(map(str, ranks[i:j + 1])))
        i = j + 1
    return ", ".join(out)


def _ranks(ranks: list[int]) -> str:
    """[3] -> 'rank 3'; [0, 1, 2] -> 'ranks 0-2'."""
    return f"rank{'s' if len(ranks) > 1 else ''} {_ranges(ranks)}"


def analyze(dumps: dict[int, dict]) -> list[str]:
    """Lines naming the ranks that never entered a collective others wait in (see the module docstring)."""
    if not dumps:
        return ["no flight-recorder dumps"]
    world = next(iter(dumps.values()))["world"]
    entered = {r: {(s["axis"], tuple(s["ranks"]) if s["ranks"] else None): s["seq"] for s in d["seqs"]}
               for r, d in dumps.items()}
    missing: dict[int, dict[tuple, dict]] = {}  # culprit -> {(op, axis, seq): entry}
    waiters: dict[int, float] = {}  # rank -> seconds it had waited when it dumped
    for r, d in dumps.items():
        for e in d["ops"]:
            if e["end"] is not None or not e["ranks"]:
                continue
            key = (e["axis"], tuple(e["ranks"]))
            behind = [p for p in e["ranks"] if p != r and (p not in dumps or entered[p].get(key, 0) < e["seq"])]
            for p in behind:
                missing.setdefault(p, {})[(e["op"], e["axis"], e["seq"])] = e
            if behind:
                waiters[r] = max(waiters.get(r, 0.0), -e["start"])
    if not missing:
        open_ops = [f"rank {r}: {e['op']} #{e['seq']} on {e['axis']}" for r, d in sorted(dumps.items())
                    for e in d["ops"] if e["end"] is None]
        lines = ["every rank entered every collective the others are in"
                 + (f"; still open: {'; '.join(open_ops)}" if open_ops else "")]
    else:
        # the root causes: ranks others wait for that are not themselves waiting in a collective
        roots = [p for p in missing if p not in waiters] or list(missing)
        lines = []
        for p in sorted(roots):
            ops = ", ".join(f"{op} #{seq} on the {axis} axis" for op, axis, seq in sorted(missing[p], key=str))
            why = "" if p in dumps else " (no dump: blocked outside a collective, or dead)"
            lines.append(f"{_describe(p, dumps)} never entered {ops}{why}")
        waited = max(waiters.values()) if waiters else 0.0
        lines[-1] += f"; {_ranks(sorted(waiters))} waited {waited:.0f} s"
    absent = [r for r in range(world) if r not in dumps]
    if absent:
        lines.append(f"no dump from {_ranks(absent)}")
    return lines


def doctor(run_dir: str) -> int:
    """`meshlm doctor RUN_DIR`: the analysis of a run's flight-recorder dumps."""
    dumps = load_dumps(Path(run_dir))
    first = next(iter(dumps.values()))
    steps = sorted({d["step"] for d in dumps.values()})
    print(f"meshlm doctor: {len(dumps)} of {first['world']} ranks dumped (run {first['run_id']}, step "
          f"{'-'.join(map(str, steps[::max(1, len(steps) - 1)]))}): {first['reason']}")
    for line in analyze(dumps):
        print(line)
    return 0
