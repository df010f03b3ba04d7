"""`meshlm bench`: every strategy on the same model, data, seed and global batch, side by side.

    strategies.py  the strategy matrix, the PyTorch peer of each of ours, the full suite
    run.py         the command: one job per strategy and world size, results.json, report.md
    worker.py      one job (one rank of it): steps, timings, memory, communication, pipeline timeline
    measure.py     training state by kind, saved activations, peak memory, reductions over ranks
    report.py      derived figures, the tables (report.md, console, README's short one), the advice
    plots.py       throughput, memory, communication share, scaling, loss curves, pipeline timelines
    peers/         torch DDP, FSDP2, DTensor TP and pipelining adapters (and the optional DeepSpeed and
                   Megatron-core ones), imported only when asked for
"""

from .run import BenchArgs, parse_args, run_bench, run_strategy
from .strategies import PEER_OF, STRATEGIES, SUITES, Strategy, parse_strategies

__all__ = ["BenchArgs", "PEER_OF", "STRATEGIES", "SUITES", "Strategy", "parse_args", "parse_strategies", "run_bench",
           "run_strategy"]
