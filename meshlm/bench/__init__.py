"""`meshlm bench`: every strategy on the same model, data, seed and global batch, side by side.

    strategies.py  the strategy matrix and the PyTorch peer of each of ours
    run.py         the command: one job per strategy, results.json, report.md
    worker.py      one job (one rank of it): steps, timings, memory, communication
    measure.py     training-state bytes, peak memory, step-time reduction over ranks
    report.py      the table and the step-time chart
    peers/         torch DDP and FSDP2 adapters, imported only when asked for
"""

from .run import BenchArgs, parse_args, run_bench, run_strategy
from .strategies import PEER_OF, STRATEGIES, Strategy, parse_strategies

__all__ = ["BenchArgs", "PEER_OF", "STRATEGIES", "Strategy", "parse_args", "parse_strategies", "run_bench",
           "run_strategy"]
