"""`meshlm plan`: rank the layouts of a model on a cluster, or cost one layout.

    meshlm plan --model llama-70b --gpus 1024 --gpu h100 --global-batch 1024 --seq 4096
    meshlm plan --model llama-70b --gpus 1024 --gpu h100 --global-batch 1024 --seq 4096 \\
        --layout.tp 8 --layout.pp 8 --layout.zero 1 --layout.vpp 2 --micro-batch 1 --recompute selective

    meshlm plan --calibrate [--world-sizes 2,4,8]      # measure this machine for --gpu cpu
    meshlm plan --validate runs/bench                  # re-cost a stored bench's rows against its measurements

Every --layout.* given pins that field and the rest is searched; pinning all of them costs one layout.
Model dimensions override the preset: --model.n_layers 96 --model.d_model 12288 (alias --model.hidden)
--model.n_heads 96 --model.vocab_size 51200 (alias --model.vocab). Bad input raises ConfigError.
"""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError, check_model, preset
from ..layout import Layout, LayoutError, validate
from .cost import PRECISIONS, RECOMPUTE, Prediction
from .hardware import cluster
from .search import SearchResult, check_cluster, search

MODEL_FIELDS = {"n_layers": "n_layers", "d_model": "d_model", "hidden": "d_model", "n_heads": "n_heads",
                "n_kv_heads": "n_kv_heads", "d_ff": "d_ff", "vocab_size": "vocab_size", "vocab": "vocab_size",
                "n_experts": "n_experts", "experts_per_token": "experts_per_token"}
LAYOUT_FIELDS = ("tp", "pp", "dp", "cp", "ep", "zero", "vpp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 by the caller, no usage dump
        raise ConfigError(f"plan: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="meshlm plan", description="Rank parallel layouts of a model on a cluster by predicted step time.")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine (GEMM FLOP/s, gloo collectives) for --gpu cpu and store it")
    p.add_argument("--world-sizes", default="2,4,8", help="with --calibrate: process counts to time collectives at")
    p.add_argument("--validate", metavar="RESULTS", default=None,
                   help="a `meshlm bench` output directory (or its results.json): cost its rows with the current "
                        "calibration and model and print the errors against the measurements")
    p.add_argument("--model", required=False, help="preset name, e.g. llama-70b")
    p.add_argument("--gpus", type=int, required=False, help="number of GPUs (a multiple of --gpus-per-node)")
    p.add_argument("--gpu", default="h100", help="GPU kind: a100-40gb, a100-80gb, h100, h200, cpu")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the GPU's usual node (8)")
    p.add_argument("--global-batch", type=int, required=False, help="sequences per step")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's max_seq_len)")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--attention", default="flash", choices=("flash", "math"))
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--recompute", default=None, choices=RECOMPUTE)
    for name in LAYOUT_FIELDS:
        p.add_argument(f"--layout.{name}", dest=f"layout_{name}", type=int, default=None)
    p.add_argument("--layout.schedule", dest="layout_schedule", default=None,
                   choices=("gpipe", "1f1b", "interleaved", "zb"))
    for name in MODEL_FIELDS:
        p.add_argument(f"--model.{name}", dest=f"model_{name}", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.calibrate:
        return calibrate(args.world_sizes)
    if args.validate:
        from ..bench import validate

        return validate.main(args.validate, as_json=args.json)
    for flag in ("model", "gpus", "global_batch"):
        if getattr(args, flag) is None:
            raise ConfigError(f"plan: the following arguments are required: --{flag.replace('_', '-')}")
    model = preset(args.model)
    changes = {MODEL_FIELDS[k]: getattr(args, f"model_{k}") for k in MODEL_FIELDS
               if getattr(args, f"model_{k}") is not None}
    model = model.replace(**changes)
    check_model(model)
    if model.vocab_size == 0:
        raise ConfigError(f"model.vocab_size (0) must be given for planning ({args.model} takes it from the data)")
    seq = args.seq or model.max_seq_len
    if seq < 1:
        raise ConfigError(f"seq ({seq}) must be a positive integer")
    if args.global_batch < 1:
        raise ConfigError(f"global_batch ({args.global_batch}) must be a positive integer")
    net = cluster(args.gpu, gpus_per_node=args.gpus_per_node)
    check_cluster(args.gpus, net.gpus_per_node)
    fixed = {k: getattr(args, f"layout_{k}") for k in LAYOUT_FIELDS if getattr(args, f"layout_{k}") is not None}
    if args.layout_schedule:
        fixed["schedule"] = args.layout_schedule
    if args.micro_batch is not None:
        fixed["micro_batch"] = args.micro_batch
    if args.recompute is not None:
        fixed["recompute"] = args.recompute
    _check_fixed(fixed, model, args.gpus, seq)
    result = search(model, gpus=args.gpus, gpu=net.gpu, gpus_per_node=net.gpus_per_node, global_batch=args.global_batch,
                    seq_len=seq, precision=args.precision, top=args.top, fixed=fixed or None, attention=args.attention)
    if not result.considered:
        raise ConfigError(f"plan: no valid layout of {args.model} on {args.gpus} GPUs with global batch "
                          f"{args.global_batch}" + (f" and {fixed}" if fixed else "") + ": " +
                          "; ".join(f"{n} x {why}" for why, n in result.invalid.most_common(3)))
    if args.json:
        rejected = [{"prediction": r.as_dict(), "reason": why} for r, why in result.rejected[:args.top]]
        print(json.dumps({"ranked": [r.as_dict() for r in result.ranked], "rejected": rejected,
                          "considered": result.considered, "invalid": dict(result.invalid),
                          "smallest_cluster": result.smallest_cluster, "why": result.why}, indent=1))
        return 0
    print(f"{args.model}: {model.n_layers} layers, d_model {model.d_model}, {args.gpus} x {net.gpu.description}, "
          f"{net.gpus_per_node} per node; global batch {args.global_batch} x seq {seq}, {args.precision}")
    print(format_table(result.ranked))
    if result.ranked:  # where #1's axes run: the placement `meshlm train` prints at start, on nodes of this size
        from ..mesh import Placement
        print(f"#1: {Placement.contiguous(result.ranked[0].layout, net.gpus_per_node).describe()}")
    print(result.summary())
    if not result.ranked:
        print(f"nothing fits: {result.why}")
        if result.smallest_cluster:
            print(f"smallest cluster on which a layout fits: {result.smallest_cluster} GPUs")
        for r, why in result.rejected[:3]:
            print(f"  rejected {r.layout.describe()}, micro-batch {r.micro_batch}, {r.recompute}: {why}")
    return 0


def calibrate(world_sizes: str) -> int:
    """`meshlm plan --calibrate`: measure this machine, write the calibration file, print the figures."""
    import time

    from .hardware import calibrate_cpu, calibration_path

    try:
        sizes = sorted({int(w) for w in world_sizes.split(",") if w.strip()})
    except ValueError:
        raise ConfigError(f"--world-sizes ({world_sizes!r}) must be comma-separated integers") from None
    if not sizes or any(w < 2 for w in sizes):
        raise ConfigError(f"--world-sizes ({world_sizes!r}) must list process counts >= 2")
    start = time.perf_counter()
    print(f"meshlm plan --calibrate: GEMM at 1 and all threads, gloo collectives at world sizes "
          f"{', '.join(map(str, sizes))}")
    calibrate_cpu(world_sizes=sizes, log=lambda line: print("  " + line, flush=True))
    print(f"wrote {calibration_path()} in {time.perf_counter() - start:.1f} s")
    return 0


def _check_fixed(fixed: dict, model, gpus: int, seq: int) -> None:
    """Refuse a pinned field that no layout can satisfy, with the layout rule's message."""
    degrees = {k: v for k, v in fixed.items() if k in LAYOUT_FIELDS}
    try:
        Layout(**degrees)  # types
        if {"tp", "pp", "dp"} <= set(degrees):  # the whole grid is pinned: check it against --gpus
            schedule = fixed.get("schedule") or ("interleaved" if degrees.get("vpp", 1) > 1 else "1f1b")
            lay = Layout(**degrees, schedule=schedule, sequence_parallel=degrees["tp"] > 1)
            validate(lay.replace(micro_batches=lay.pp), model, world_size=gpus, seq_len=seq)
        else:
            validate(Layout(tp=degrees.get("tp", 1)), model)
    except (LayoutError, TypeError) as e:
        raise ConfigError(f"layout: {e}") from None


def format_table(rows: list[Prediction]) -> str:
    head = ("#", "layout", "mb", "recompute", "step s", "tokens/s", "TFLOP/s/GPU", "MFU", "mem GB/GPU", "bubble")
    lines = [head]
    for i, r in enumerate(rows, 1):
        lines.append((str(i), r.layout.describe(), str(r.micro_batch), r.recompute, f"{r.step_time_s:.3f}",
                      f"{r.tokens_per_s:,.0f}", f"{r.tflops_per_gpu:.0f}", f"{r.mfu:.1%}",
                      f"{r.total_memory_bytes / 1e9:.1f}", f"{r.bubble:.1%}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i in (1, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


__all__ = ["main", "parser", "format_table", "SearchResult"]
