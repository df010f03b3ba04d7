"""What the fused kernel buys ring attention: one layer's forward + backward at cp = 2, fused vs plain, in one run.

    python -m meshlm.bench.ring_kernel                   # the bench's cp=2 shape and a longer sequence
    python -m meshlm.bench.ring_kernel --pairs 20

Two local processes (1 thread each, gloo) run `ring_attention` on the same inputs with the block kernels
meshlm uses on the CPU (PyTorch's fused flash-attention kernel, `context._fused_*`) and with the plain
tensor formulas other devices run (`context._explicit_*`), in alternating order (fused/plain,
plain/fused, ...), so that drift in the machine's load falls on both sides alike; every trial starts at a
barrier. Rank 0 prints, per shape, the median time of each and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

SHAPES = ((16, 8, 32, 16), (4, 8, 256, 64))
"""(batch, heads, local tokens, head size): the full bench's cp=2 rows (gpt-tiny, 16 x 64 tokens) and a
longer sequence with larger heads."""


def _worker(rank: int, world: int, port: int, result: str, shapes, pairs: int) -> None:
    import json
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from ..parallel import context

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    kernels = {"fused": context._kernels(torch.device("cpu")),
               "plain": (context._explicit_forward, context._explicit_backward)}
    original = context._kernels
    out = []
    try:
        for b, h, t, d in shapes:
            q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
            times: dict[str, list[float]] = {name: [] for name in kernels}

            def trial(name: str) -> float:
                context._kernels = lambda device: kernels[name]
                dist.barrier()
                start = time.perf_counter()
                context.ring_attention(q, k, v, dist.group.WORLD, causal=True, cp=world, cp_rank=rank).sum().backward()
                return time.perf_counter() - start

            for name in kernels:  # warm-up
                trial(name)
            for i in range(pairs):
                order = list(kernels) if i % 2 == 0 else list(kernels)[::-1]
                for name in order:
                    times[name].append(trial(name))
            fused, plain = times["fused"], times["plain"]
            out.append({"shape": [b, h, t, d], "fused_s": statistics.median(fused), "plain_s": statistics.median(plain),
                        "speedup": statistics.median(p / f for p, f in zip(plain, fused))})
    finally:
        context._kernels = original
        dist.destroy_process_group()
    if rank == 0:
        Path(result).write_text(json.dumps(out))


def measure(shapes=SHAPES, pairs: int = 10) -> list[dict]:
    """[{shape, fused_s, plain_s, speedup}] of one ring-attention layer (forward + backward) at cp = 2."""
    from ..plan.hardware import _spawn

    return _spawn(_worker, 2, [list(s) for s in shapes], pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshlm.bench.ring_kernel",
                                description="Ring attention at cp=2: fused block kernel vs plain formulas.")
    p.add_argument("--pairs", type=int, default=10, help="fused/plain pairs of trials per shape (default 10)")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs ({args.pairs}) must be at least 1")
    print("ring attention, cp=2 (2 processes, 1 thread each), one layer's forward + backward per rank:")
    for row in measure(pairs=args.pairs):
        b, h, t, d = row["shape"]
        print(f"  batch {b}, {h} heads, {t} local tokens, head {d}: fused {row['fused_s'] * 1e3:.2f} ms, "
              f"plain {row['plain_s'] * 1e3:.2f} ms, {row['speedup']:.2f}x (median of per-pair ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
