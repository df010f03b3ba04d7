"""What the flight recorder costs: the default model trained with the recorder on and off, in one run.

    python -m meshlm.bench.recorder_overhead                      # gpt-small, the default corpus, dp 2
    python -m meshlm.bench.recorder_overhead --layout.tp 2 --layout.dp 1 --pairs 10

The `meshlm train` defaults (model, corpus, batch, sequence length), on a distributed layout since on
one process there is no collective to record (`--layout.*` picks it; dp 2 by default). After warm-up
steps, each pair of trials runs `--steps` steps with the ring on and `--steps` with it off, in
alternating order (on/off, off/on, ...), so that drift in the machine's load falls on both sides
alike; every trial starts at a barrier, so the ranks time the same steps. The recorder is switched
through `CommMeter.recording`, which every operation reads (off: counters only, as
`--train.flight_recorder false` runs). Rank 0 prints the ratio of the mean step time with the
recorder on to that with it off, the median of the per-pair ratios, and, as a check that does not
depend on the machine's noise, the cost of one begin/end pair times the ring entries of a step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_LAYOUT = {"layout.dp": "2"}


def _args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m meshlm.bench.recorder_overhead",
                                description="Step time with the flight recorder on vs off, interleaved.")
    p.add_argument("--pairs", type=int, default=8, help="on/off pairs of trials (default 8)")
    p.add_argument("--steps", type=int, default=2, help="steps per trial (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing (default 2)")
    return p.parse_known_args(argv)


def _config(rest: list[str]):
    from ..settings import build_config, parse_overrides
    overrides = parse_overrides(rest)
    if not any(k.startswith("layout.") for k in overrides):
        overrides.update(DEFAULT_LAYOUT)
    overrides.setdefault("train.progress", "false")
    return build_config(overrides=overrides)


def _entry_cost(meter_cls, group, n: int = 20000) -> tuple[float, float]:
    """Seconds per begin+end pair with the ring on and off (one process, no communication)."""
    out = []
    for on in (True, False):
        m = meter_cls(recording=on)
        start = time.perf_counter()
        for _ in range(n):
            m.end(m.begin("all_reduce", "dp", 1024, group=group, shape=(256,)))
        out.append((time.perf_counter() - start) / n)
    return out[0], out[1]


def worker(args: argparse.Namespace, rest: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from .. import data as data_mod
    from ..comm import CommMeter
    from ..layout import validate
    from ..mesh import Mesh
    from ..train.trainer import FlightRecorder, Trainer, init_distributed, resolve_vocab, set_threads

    cfg = _config(rest)
    set_threads(cfg.train.threads)
    rank, world, device = init_distributed(cfg.train.device, timeout_s=cfg.train.collective_timeout_s)
    try:
        data_path = cfg.data.path or str(data_mod.ensure_default_dataset(vocab_size=cfg.data.vocab_size,
                                                                          progress=False))
        dataset = data_mod.TokenDataset.open(data_path)
        cfg = resolve_vocab(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_path)), dataset)
        validate(cfg.layout, cfg.model, world, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
        mesh = Mesh.build(cfg.layout)
        trainer = Trainer(cfg, mesh=mesh, device=device, dataset=dataset)
        out_dir = Path(tempfile.mkdtemp(prefix="meshlm-recorder-"))
        recorder = FlightRecorder(trainer, out_dir)  # its watchdog polls the ring, as in a real run
        meter = trainer.meter

        def trial(on: bool) -> tuple[float, float, int]:
            """Wall seconds a step, this rank's CPU seconds a step, ring entries a step."""
            meter.recording = on
            if dist.is_initialized():
                dist.barrier()
            entered = sum(meter.seqs.values())
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                trainer.step()
            return ((time.perf_counter() - start) / args.steps, (time.process_time() - cpu) / args.steps,
                    (sum(meter.seqs.values()) - entered) // args.steps)

        for _ in range(args.warmup):
            trainer.step()
        times: dict[bool, list[float]] = {True: [], False: []}
        cpu = torch.zeros(2, dtype=torch.float64)  # CPU seconds a step summed over trials: on, off
        entries = 0
        for i in range(args.pairs):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                seconds, cpu_s, n = trial(on)
                times[on].append(seconds)
                cpu[0 if on else 1] += cpu_s
                entries = max(entries, n)
        recorder.close()
        if dist.is_initialized():  # the CPU time of every rank: less sensitive than wall time to other load
            dist.all_reduce(cpu)
        if rank == 0:
            on_s, off_s = statistics.mean(times[True]), statistics.mean(times[False])
            pair = statistics.median(a / b for a, b in zip(times[True], times[False]))
            cost_on, cost_off = _entry_cost(CommMeter, mesh.group("dp") or mesh.group("tp"))
            est = entries * (cost_on - cost_off) / off_s
            print(f"flight recorder: {cfg.preset} on {cfg.layout.describe()}, {cfg.train.batch_size}x"
                  f"{cfg.train.seq_len} tokens a step, {args.pairs} interleaved on/off pairs of {args.steps} steps",
                  flush=True)
            print(f"  step time: {on_s:.4f} s on, {off_s:.4f} s off: ratio on/off {on_s / off_s:.4f} "
                  f"(median of the pairs {pair:.4f})", flush=True)
            print(f"  CPU time of all ranks: ratio on/off {cpu[0] / cpu[1]:.4f}", flush=True)
            print(f"  trials (s/step), on:  {' '.join(f'{t:.3f}' for t in times[True])}\n"
                  f"                     off: {' '.join(f'{t:.3f}' for t in times[False])}", flush=True)
            print(f"  per step: {entries} ring entries x {(cost_on - cost_off) * 1e6:.2f} us more per begin/end "
                  f"({cost_on * 1e6:.2f} on, {cost_off * 1e6:.2f} off) = {est:.4%} of a step", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from ..config import ConfigError
    from ..launch import launch_local, under_torchrun

    argv = sys.argv[1:] if argv is None else argv
    args, rest = _args(argv)
    try:
        cfg = _config(rest)
    except ConfigError as e:
        print(f"meshlm: error: {e}", file=sys.stderr)
        return 2
    world = cfg.layout.world_size
    if under_torchrun() or world == 1:
        worker(args, rest)
        return 0
    if not any(a.startswith("--data.path") for a in rest):  # prepare the corpus once, not once per rank
        from .. import data as data_mod
        rest = [*rest, "--data.path", str(data_mod.ensure_default_dataset(vocab_size=cfg.data.vocab_size))]
    return launch_local(world, [*_own(argv), *rest], module="meshlm.bench.recorder_overhead",
                        threads=cfg.train.threads)


def _own(argv: list[str]) -> list[str]:
    """This script's own options from argv (what argparse took), to pass on to the ranks."""
    args, _ = _args(argv)
    return ["--pairs", str(args.pairs), "--steps", str(args.steps), "--warmup", str(args.warmup)]


if __name__ == "__main__":
    sys.exit(main())
