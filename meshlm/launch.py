"""Starting the processes of a job: PyTorch's own elastic launcher, never a launcher of our own.

`meshlm train` run by hand (no torchrun environment) re-launches itself on this machine through
torch.distributed.run with one process per rank of the layout, exactly as
`torchrun --standalone --nproc-per-node N -m meshlm train ...` would. Under torchrun (one machine or
many) it simply joins the job it is in.
"""

from __future__ import annotations

import os
import sys


def under_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (or another launcher that sets RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def launch_local(nproc: int, argv: list[str], *, threads: int = 0, module: str = "meshlm",
                 max_restarts: int = 0) -> int:
    """Run `python -m MODULE ARGV` as nproc local processes via torch.distributed.run; return an exit code.

    max_restarts: when a worker dies, the elastic agent stops the others and starts the whole group
    again, up to this many times (TORCHELASTIC_RESTART_COUNT tells the workers which attempt it is).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set OMP_NUM_THREADS=1 with a warning; share the cores out ourselves instead.
    per_proc = threads or max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_proc))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "--module", module, *argv]
    )
    try:
        run(args)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {r} (exit {f.exitcode})" for r, f in sorted(e.failures.items()))
        print(f"meshlm: error: {failed} failed; the first error is printed above", file=sys.stderr)
        return 1
    return 0
