"""One bench job: `python -m meshlm.bench.worker --strategy NAME --warmup W --steps N --result FILE [settings]`.

Launched by `meshlm bench` through torch.distributed.run (one fresh process group per strategy).
Every rank builds the run's config from the settings (the strategy's own overrides included, so a
strategy that the trainer does not implement yet fails here, inside its job), runs warmup + steps
optimizer steps, and times each step; then the ranks reduce their figures and rank 0 writes one
JSON record to FILE.

What one record holds (besides the losses and step times): the training state split into
parameters, gradients and optimizer states and the peak of saved activations (both probed on the
last warm-up step, so the probes' hooks cost no timed step), per rank; the communication per
'op/axis' (bytes per step over all steps; seconds and calls per timed step, the slowest or busiest rank's); for
pipeline rows the last step's measured timeline of every stage, its bubble, and the bubble the
schedule simulator predicts for the same table; and the planner's predicted step time and memory.

A rank that fails writes `FILE.rank<R>.err` (one line, with the time) and
exits 1; torch.distributed.run then stops the other ranks and the parent records the earliest
error.

`MESHLM_BENCH_FAIL=STRATEGY` makes the last rank of that strategy's job raise at its second step
(a fault injected on purpose, so tests can check that a failing job is recorded and the bench goes on).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError, param_count
from ..layout import LayoutError, require_implemented, validate
from ..settings import RunConfig, build_config, parse_overrides
from ..train.trainer import init_distributed, resolve_vocab, set_threads
from . import measure
from .strategies import STRATEGIES

FAIL_ENV = "MESHLM_BENCH_FAIL"


class MeshlmRunner:
    """Our Trainer, driven one step at a time (the same set-up as `train()`, without logs or checkpoints)."""

    def __init__(self, cfg: RunConfig, *, dataset, device: torch.device, world: int):
        from ..mesh import Mesh
        from ..train.trainer import Trainer

        validate(cfg.layout, cfg.model, world, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
        require_implemented(cfg.layout)
        self.trainer = Trainer(cfg, mesh=Mesh.build(cfg.layout), device=device, dataset=dataset)
        self.model, self.optimizer = self.trainer.model, self.trainer.optimizer

    def step(self) -> float:
        return self.trainer.step().loss

    @property
    def note(self) -> str:
        """MoE: the routing's load imbalance. Pipeline: rank 0's idle share over every step (the record's
        bubble columns hold the last step's, over every stage, and the simulated one)."""
        moe = self.trainer.moe_metrics
        if moe:  # the last step's routing
            return (f"MoE routing, last step: load imbalance {moe['moe_imbalance']:.2f} (max/mean tokens per "
                    f"expert, all blocks), tokens per expert {moe['moe_expert_tokens']}, "
                    f"dropped {100 * moe['moe_dropped']:.1f}%")
        pipe = self.trainer.pipeline
        if pipe is None:
            return ""
        return f"rank 0 idle {100 * pipe.bubble():.1f}% of its schedule over every step, warm-up included"

    def comm_bytes_per_step(self) -> dict[str, float]:
        steps = max(1, self.trainer.step_num)
        return {k: v["bytes"] / steps for k, v in self.trainer.meter.summary().items()}

    @property
    def meter(self):
        return self.trainer.meter

    comm_coverage = "measured"
    """What the meter covers: every collective of ours goes through it (bytes and seconds)."""


def predicted_layout(strategy: str, cfg: RunConfig, world: int):
    """The layout whose cost the planner predicts for `strategy`: ours, its own; a peer, the equivalent one
    (dp=W for DDP / FSDP / DeepSpeed, with their ZeRO stage; tp=W for torch-tp / megatron-tp; pp=W under
    the schedule of that name for torch-pp-*; the one-process peers, one rank)."""
    from ..layout import Layout

    spec = STRATEGIES[strategy]
    if not spec.is_peer:
        return cfg.layout
    mb = cfg.layout.micro_batches
    if world == 1:
        return Layout(micro_batches=mb)
    if strategy.startswith("torch-pp-"):  # torch's interleaved zero-bubble (two stages per rank): as interleaved v2
        sched = strategy.removeprefix("torch-pp-")
        if sched in ("interleaved", "zb"):
            return Layout(pp=world, schedule="interleaved", vpp=2, micro_batches=mb)
        return Layout(pp=world, schedule=sched, micro_batches=mb)
    if strategy.endswith("-tp"):
        return Layout(tp=world, micro_batches=mb)
    zero = {"torch-fsdp2": 3, "torch-fsdp2-z2": 2}.get(strategy, 0)
    if strategy.startswith("deepspeed-zero"):
        zero = int(strategy[-1])
    return Layout(dp=world, zero=zero, micro_batches=mb)


def predict_record(strategy: str, cfg: RunConfig, world: int) -> dict:
    """The calibrated cpu model's step time and memory per rank for this job (None and a reason when it
    cannot be costed). Memory compares with peak_mem_bytes - base_mem_bytes.

    The cpu model gives W processes cores // W threads each; with train.threads set (the suite's one per
    process) the job uses only min(cores, threads * W) of the cores, and the model is told so."""
    import dataclasses

    from ..plan import gpu_spec
    from ..plan.cost import predict

    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return {"predicted_step_time_s": None, "predicted_mem_bytes": None, "prediction_note": "not costed on GPU"}
    try:
        layout = predicted_layout(strategy, cfg, world)
        split = layout.dp * layout.ep * layout.micro_batches
        gpu = gpu_spec("cpu")
        if cfg.train.threads:
            gpu = dataclasses.replace(gpu, gpus_per_node=max(1, min(gpu.gpus_per_node, cfg.train.threads * world)))
        pred = predict(cfg.model, layout.replace(micro_batches=1), gpu=gpu, global_batch=cfg.train.batch_size,
                       micro_batch=max(1, cfg.train.batch_size // split), seq_len=cfg.train.seq_len,
                       precision=cfg.train.precision, recompute=cfg.train.recompute,
                       compression=cfg.train.compression)
    except (ConfigError, LayoutError, ValueError) as e:
        return {"predicted_step_time_s": None, "predicted_mem_bytes": None,
                "prediction_note": " ".join(f"{type(e).__name__}: {e}".split())}
    return {"predicted_step_time_s": pred.step_time_s, "predicted_mem_bytes": int(pred.total_memory_bytes),
            "predicted_layout": layout.describe(), "predicted_detail": {
                "compute_s": pred.compute_s, "comm_s": pred.comm_s, "bubble": pred.bubble,
                "overhead_s": pred.detail["overhead_s"], "cpu_per_rank_s": pred.detail["cpu_per_rank_s"],
                "memory_bytes": pred.memory_bytes}}


def _comm_totals(runner) -> dict[str, dict[str, float]]:
    """The meter's running totals {op/axis: {calls, bytes, seconds}} (empty for a runner without one)."""
    meter = getattr(runner, "meter", None)
    return meter.summary() if meter is not None else {}


def comm_per_step(before: dict, after: dict, steps: int, key: str = "seconds") -> dict[str, float]:
    """Seconds (or calls, bytes) per step by op/axis between two `_comm_totals` (the timed steps)."""
    return {k: (v[key] - before.get(k, {}).get(key, 0)) / max(1, steps) for k, v in after.items()}


def predicted_bubble(strategy: str, cfg: RunConfig, world: int) -> tuple[float | None, str]:
    """The schedule simulator's bubble for this row's table (t_f = 1, backward 2, t_comm = 0), or why none."""
    from ..parallel.schedules import build, simulate

    layout = predicted_layout(strategy, cfg, world)
    if layout.pp == 1:
        return None, "n/a: no pipeline"
    if strategy == "torch-pp-zb":
        return None, "n/a: no table of torch's interleaved zero-bubble schedule"
    table = build(layout.schedule, p=layout.pp, m=layout.micro_batches, v=layout.vpp)
    return simulate(table, t_f=1.0, t_b=1.0, t_w=1.0).bubble, ""


def pipeline_timeline(runner) -> tuple[list | None, float | None]:
    """The last step's (rank, action, start, end) of every stage of this rank's pipeline and its bubble
    (collective over the pp group; None for a runner without a pipeline)."""
    from ..parallel.schedules import Timeline

    trainer = getattr(runner, "trainer", None)
    if trainer is None or trainer.pipeline is None:
        return None, None
    group = trainer.mesh.group("pp")
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, trainer.pipeline.records, group=group)
    records = [list(r) for part in parts for r in part]
    return records, Timeline.from_records(records, p=trainer.cfg.layout.pp).bubble


def run_job(*, strategy: str, settings: dict[str, str], warmup: int, steps: int) -> dict:
    """Run one strategy on this rank; return its record (figures reduced over the ranks)."""
    from .. import data as data_mod

    spec = STRATEGIES[strategy]
    cfg = build_config(overrides={**settings, "train.steps": str(warmup + steps)})
    set_threads(cfg.train.threads)
    rank, world, device = init_distributed(cfg.train.device)
    base_mem = measure.peak_memory_bytes(device)  # before the data and the model: the Python/torch baseline
    dataset = data_mod.TokenDataset.open(cfg.data.path)
    cfg = resolve_vocab(cfg, dataset)
    if spec.is_peer:
        if not dist.is_initialized():  # a peer needs a process group even on one rank
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        from .peers import load_peer
        runner = load_peer(spec.runner)(cfg, dataset=dataset, device=device)
    else:
        runner = MeshlmRunner(cfg, dataset=dataset, device=device, world=world)

    fail_at = 1 if os.environ.get(FAIL_ENV) == strategy and rank == world - 1 else -1
    losses, times, cpu = [], [], []
    # the probes' hooks cost time: they go on the last warm-up step (the last step when there is none),
    # inside its optimizer step (gradients still held) and over its forwards and backwards
    probe_at = warmup - 1 if warmup else warmup + steps - 1
    state = acts = None
    comm_before: dict = {}
    for step in range(warmup + steps):
        if step == fail_at:
            raise RuntimeError(f"injected failure ({FAIL_ENV}={strategy}) on rank {rank} at step {step}")
        if step == warmup:
            comm_before = _comm_totals(runner)
        probing = step == probe_at
        if probing:
            params = list(runner.model.parameters())
            state, acts = measure.StateProbe(params, runner.optimizer), measure.ActivationProbe(params)
        start, start_cpu = time.perf_counter(), time.process_time()
        with acts if probing else contextlib.nullcontext():
            losses.append(runner.step())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)  # this process's CPU time, its gloo and OpenMP threads included
        if probing:
            state.remove()
            if state.handle is None:  # an optimizer without step hooks: count after the step
                state.count()
    comm_after = _comm_totals(runner)
    comm_seconds = comm_per_step(comm_before, comm_after, steps)
    comm_calls = comm_per_step(comm_before, comm_after, steps, "calls")

    times = measure.max_over_ranks(times, device)  # a step takes as long as its slowest rank
    peak_mem, base_mem = measure.max_over_ranks([measure.peak_memory_bytes(device), base_mem], device)
    comm = measure.max_per_key_over_ranks(runner.comm_bytes_per_step())
    (comm_rank_s,) = measure.max_over_ranks([sum(comm_seconds.values())], device)  # the busiest rank's total
    comm_seconds = measure.max_per_key_over_ranks(comm_seconds)
    comm_calls = measure.max_per_key_over_ranks(comm_calls)
    mine = {**state.split, "activations": acts.peak}
    # the median timed step's CPU seconds on each rank: with more ranks than cores, the step is at least
    # their sum over the cores
    my_cpu = statistics.median(cpu[warmup:] or cpu)
    splits, cpu_step = [mine], [my_cpu]
    if dist.is_initialized() and dist.get_world_size() > 1:
        splits = [None] * dist.get_world_size()
        dist.all_gather_object(splits, mine)
        cpu_step = [None] * dist.get_world_size()
        dist.all_gather_object(cpu_step, my_cpu)
    timeline, bubble = pipeline_timeline(runner)
    step_time = measure.median_step_time(times, warmup=warmup)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    if rank != 0:  # rank 0 writes the record; the rest is its own work
        return {}
    largest = max(range(len(splits)), key=lambda r: sum(splits[r].values()))
    pred_bubble, pred_note = predicted_bubble(strategy, cfg, world)
    measured_note = ""
    if timeline is None:  # a peer's pipeline: torch runs the schedule, nothing times its actions
        measured_note = ("n/a: no pipeline" if predicted_layout(strategy, cfg, world).pp == 1
                         else "n/a: torch.distributed.pipelining's actions are not timed")
    return {"strategy": strategy, "world_size": world, "step_time_s": step_time, "tokens_per_s": tokens / step_time,
            "peak_mem_bytes": int(peak_mem), "base_mem_bytes": int(base_mem),
            "state_bytes_per_rank": state.peak,
            "mem_split": splits[largest], "mem_split_rank": largest, "mem_split_per_rank": splits,
            "comm_bytes_per_step": comm, "comm_seconds_per_step": comm_seconds, "comm_calls_per_step": comm_calls,
            "comm_seconds_max_rank": comm_rank_s,
            "comm_coverage": runner.comm_coverage,
            "bubble_measured": bubble, "bubble_measured_note": measured_note,
            "bubble_predicted": pred_bubble, "bubble_predicted_note": pred_note,
            "timeline": timeline,
            "losses": losses, "step_times_s": times, "warmup": warmup, "cpu_s_per_step_ranks": cpu_step,
            "n_params": param_count(cfg.model)["total"],
            "device": device.type, "note": runner.note, **predict_record(strategy, cfg, world),
            "moe": runner.trainer.moe_metrics if isinstance(runner, MeshlmRunner) else {}}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # the parent never reads half a file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshlm.bench.worker", allow_abbrev=False)
    p.add_argument("--strategy", required=True, choices=list(STRATEGIES))
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--result", required=True, help="JSON file rank 0 writes the record to")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    result = Path(args.result)
    rank = int(os.environ.get("RANK", "0"))
    try:
        record = run_job(strategy=args.strategy, settings=parse_overrides(rest), warmup=args.warmup,
                         steps=args.steps)
        if rank == 0:
            _write_json(result, record)
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes the strategy's error row
        message = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        _write_json(result.with_name(f"{result.name}.rank{rank}.err"),
                    {"rank": rank, "time": time.time(), "error": message})
        if not isinstance(e, (ConfigError, LayoutError, KeyboardInterrupt)):
            traceback.print_exc()
        print(f"meshlm bench: {args.strategy}: rank {rank}: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalisation: on CPU, torch's static destructors sometimes abort
    # ("terminate called without an active exception") after an FSDP2 run, though all was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
