"""Run a function on N gloo processes and get each rank's result back: the harness of every distributed test.

Process start-up (starting Python, importing torch, `init_process_group`) costs seconds, so a
`DistPool` starts its N workers once and keeps them: each `pool.run(fn, *args)` sends the function to
every rank and returns the list of per-rank return values, ordered by rank. Tests share one pool per
world size for the whole session (see the `dist` fixture in conftest.py). The workers are forked from
multiprocessing's fork server, which imports torch once for all of them (see `_context`).

`fn` must be importable by name (a module-level function in a test module or in meshlm). An exception
on any rank fails the call with that rank's traceback; a rank that does not answer within the timeout
(a hang, say a collective one rank never joined) fails it too, and the pool is restarted for the next
test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from datetime import timedelta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "torch.distributed", "torch._dynamo"]
"""What the fork server imports before forking workers (torch.optim imports torch._dynamo on first use)."""


def _context():
    """The fork server with PRELOAD imported, where the platform has one: a worker forked from it starts with
    torch loaded, where a spawned one spends 4-5 s of CPU importing it (2.5 s torch, 2 s dynamo) - 14 workers
    a session, on 2 cores. The server is a fresh Python that ran no torch operation and has one thread
    (OMP_NUM_THREADS=1 keeps numpy's BLAS from starting a pool), so forking it is safe."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank: int, world: int, port: int, tasks, results, env: dict[str, str]) -> None:
    os.environ.clear()  # this process's environment is the fork server's; take the pool creator's, as spawn would
    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    while True:
        item = tasks.get()
        if item is None:
            break
        try:
            fn, args, kwargs = pickle.loads(item)
            value = fn(*args, **kwargs)
            results.put((rank, True, pickle.dumps(value)))
        except BaseException:  # noqa: BLE001 - report everything to the test
            results.put((rank, False, traceback.format_exc()))
        _release_groups(dist)
    dist.destroy_process_group()
    # out without the interpreter's teardown of torch (0.2-0.5 s of CPU per worker, 14 workers at the end of
    # a session), once the last result is flushed to the parent
    results.close()
    results.join_thread()
    os._exit(0)


def _release_groups(dist) -> None:
    """Destroy the process groups a task made (every Mesh.build makes its own). Each gloo group keeps a
    thread that wakes every 10 ms; the hundreds a session would pile up in the pool's workers slowed every
    later test several times over, the ones in this process included."""
    import gc

    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)
    gc.collect()  # the groups' last references may sit in cycles (a trainer and its modules)


class DistError(AssertionError):
    pass


class DistPool:
    """N persistent gloo worker processes (ranks 0..N-1) that run functions on request."""

    def __init__(self, world: int):
        self.world = world
        ctx = _context()
        port = _free_port()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        env = dict(os.environ)
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results, env),
                                  daemon=True) for r in range(world)]
        omp = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # for the fork server, if this starts it (see _context)
        try:
            for p in self.procs:
                p.start()
        finally:
            if omp is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = omp
        self.broken = False

    def run(self, fn, *args, timeout: float = 180.0, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; returns [result of rank 0, rank 1, ...]."""
        if self.broken:
            raise DistError("this pool is broken by an earlier failure")
        payload = pickle.dumps((fn, args, kwargs))
        for q in self.tasks:
            q.put(payload)
        out: dict[int, object] = {}
        errors: dict[int, str] = {}
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                missing = sorted(set(range(self.world)) - set(out) - set(errors))
                raise DistError(f"{fn.__name__}: ranks {missing} did not finish within {timeout:.0f} s"
                                + "".join(f"\n--- rank {r} ---\n{t}" for r, t in errors.items())) from None
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors[rank] = value
                if len(errors) == 1:  # the other ranks may be stuck in a collective: give them a short grace
                    timeout = min(timeout, 20.0)
        if errors:
            self.broken = True
            raise DistError(f"{fn.__name__} failed on ranks {sorted(errors)}"
                            + "".join(f"\n--- rank {r} ---\n{t}" for r, t in sorted(errors.items())))
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        if not self.broken:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
