"""`meshlm bench`: run each strategy as its own job, collect the records, write results.json and report.md.

    parse and check everything (strategies, world size, settings, data, layouts) before any job
    -> for each strategy: launch_local(ranks, worker) -> rank 0's record, or the job's earliest error
    -> results.json (after every job), report.md, step_time.png, and the table on the console

A strategy that fails inside its job (a setting the trainer does not implement yet, a crash) becomes
a row with an `error` field; the others still run.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..layout import Layout, validate
from ..settings import build_config, parse_overrides, settings_help
from . import report
from .strategies import STRATEGIES, Strategy, parse_strategies

USAGE = """usage: meshlm bench [--strategies A,B,...] [--world-size W] [--out DIR] [--quick] [--steps N] [--warmup W]
                    [--section.field VALUE ...]

Train the same model on the same data, seed and global batch under each strategy, one job per
strategy, and compare step time, tokens/s, memory, communication and the loss curve.

  --strategies LIST  comma-separated, from: {names}
                     (default: all). Our {ours}; PyTorch's {peers}.
  --world-size W     ranks of every strategy but single (default 2)
  --out DIR          results.json, report.md and step_time.png (default runs/bench-<date-time>)
  --quick            tiny model: gpt-tiny, seq_len 64, batch 8, 2 warm-up + 5 timed steps
  --steps N          timed steps after warm-up (default 10; --quick 5)
  --warmup W         untimed warm-up steps (default 3; --quick 2)

The remaining --section.field VALUE settings are those of `meshlm train` (e.g. --model gpt-tiny
--train.batch_size 8); the layout is the bench's, except --layout.micro_batches.
"""

QUICK_SETTINGS = {"model.preset": "gpt-tiny", "train.seq_len": "64", "train.batch_size": "8"}
DEFAULT_STEPS, DEFAULT_WARMUP = 10, 3
QUICK_STEPS, QUICK_WARMUP = 5, 2
_VALUE_FLAGS = ("--strategies", "--world-size", "--out", "--steps", "--warmup")


@dataclass(frozen=True, kw_only=True)
class BenchArgs:
    strategies: list[Strategy]
    world_size: int
    out: Path
    steps: int
    warmup: int
    settings: dict[str, str]
    """Settings overrides shared by every strategy (the --quick ones, then the user's)."""


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} ({text!r}) must be an integer") from None


def parse_args(argv: list[str]) -> BenchArgs:
    """The bench's own flags, then `meshlm train` settings; ConfigError names the bad value."""
    flags: dict[str, str] = {}
    quick = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg == "--quick":
            quick = True
        elif name in _VALUE_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            flags[name] = value
        else:
            rest.append(arg)
        i += 1

    user = parse_overrides(rest)
    for key in user:
        if key.startswith("layout.") and key != "layout.micro_batches":
            raise ConfigError(f"--{key} is set by each strategy (use --world-size); of the layout, only "
                              "--layout.micro_batches may be given")
        if key == "train.steps":
            raise ConfigError("--train.steps is set by the bench; use --steps and --warmup")
        if any(key in s.settings for s in STRATEGIES.values()):
            raise ConfigError(f"--{key} is set by a strategy; choose strategies with --strategies")

    strategies = parse_strategies(flags.get("--strategies", ",".join(STRATEGIES)))
    world = _int("--world-size", flags.get("--world-size", "2"))
    if world < 1:
        raise ConfigError(f"--world-size ({world}) must be >= 1")
    steps = _int("--steps", flags.get("--steps", str(QUICK_STEPS if quick else DEFAULT_STEPS)))
    warmup = _int("--warmup", flags.get("--warmup", str(QUICK_WARMUP if quick else DEFAULT_WARMUP)))
    if steps < 1:
        raise ConfigError(f"--steps ({steps}) must be >= 1")
    if warmup < 0:
        raise ConfigError(f"--warmup ({warmup}) must be >= 0")
    out = Path(flags.get("--out") or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S"))
    settings = {**(QUICK_SETTINGS if quick else {}), **user}
    return BenchArgs(strategies=strategies, world_size=world, out=out, steps=steps, warmup=warmup, settings=settings)


# --- running ------------------------------------------------------------------------------------


def _failed(strategy: Strategy, world: int, error: str) -> dict:
    return {"strategy": strategy.name, "world_size": strategy.ranks(world), "step_time_s": None,
            "tokens_per_s": None, "peak_mem_bytes": None, "state_bytes_per_rank": None,
            "comm_bytes_per_step": None, "losses": [], "error": error}


def _job_error(result: Path, code: int) -> str:
    """The earliest error any rank wrote (the cause; later ones are usually its consequences)."""
    errors = []
    for f in result.parent.glob(result.name + ".rank*.err"):
        try:
            errors.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    if not errors:
        return f"the job exited with code {code} and wrote no result"
    first = min(errors, key=lambda e: e["time"])
    return f"rank {first['rank']}: {first['error']}"


def run_strategy(strategy: Strategy, *, world: int, warmup: int, steps: int, settings: dict[str, str],
                 threads: int = 0) -> dict:
    """One strategy as its own job (torch.distributed.run, `strategy.ranks(world)` processes); its record."""
    from ..launch import launch_local

    with tempfile.TemporaryDirectory(prefix="meshlm-bench-") as tmp:
        result = Path(tmp) / f"{strategy.name}.json"
        merged = {**settings, **strategy.overrides(world)}
        argv = ["--strategy", strategy.name, "--warmup", str(warmup), "--steps", str(steps), "--result", str(result)]
        for key, value in merged.items():
            argv += [f"--{key}", value]
        code = launch_local(strategy.ranks(world), argv, module="meshlm.bench.worker", threads=threads)
        if result.is_file():  # written after the last collective: every rank got that far
            record = json.loads(result.read_text())
            if code != 0:
                record["note"] = "; ".join(filter(None, [record.get("note"), f"the job exited with code {code} "
                                                          "after rank 0 wrote this record"]))
            return record
        return _failed(strategy, world, _job_error(result, code))


def _context(cfg, args: BenchArgs, n_params: int) -> str:
    import torch

    return (f"{cfg.preset} ({n_params / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}), global batch "
            f"{cfg.train.batch_size} x {cfg.train.seq_len} tokens, {cfg.train.precision}, {args.warmup} warm-up + "
            f"{args.steps} timed steps, world size {args.world_size}; torch {torch.__version__}, "
            f"{'cuda' if torch.cuda.is_available() and cfg.train.device != 'cpu' else 'cpu'}, "
            f"{os.cpu_count()} cores, {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}.")


def run_bench(args: BenchArgs, *, command: str) -> list[dict]:
    """Every strategy in turn; writes DIR/results.json (after each), DIR/report.md and DIR/step_time.png."""
    from .. import data as data_mod
    from ..config import param_count
    from ..launch import under_torchrun
    from ..train.trainer import resolve_vocab

    if under_torchrun():
        raise ConfigError("meshlm bench launches a job per strategy itself; run it without torchrun")
    cfg = build_config(overrides=args.settings)  # every setting checked here, before any job
    w, micro, batch = args.world_size, cfg.layout.micro_batches, cfg.train.batch_size
    if batch % (w * micro):
        raise ConfigError(f"--world-size ({w}) times layout.micro_batches ({micro}) must divide "
                          f"train.batch_size ({batch})")
    for s in args.strategies:  # before preparing any data: each of our strategies' own layout and model
        if s.is_peer:
            validate(Layout(dp=s.ranks(w), micro_batches=micro), cfg.model, batch_size=batch,
                     seq_len=cfg.train.seq_len)
            continue
        mine = build_config(overrides={**args.settings, **s.overrides(w)})
        try:
            validate(mine.layout, mine.model, s.ranks(w), batch_size=batch, seq_len=cfg.train.seq_len)
        except ValueError as e:
            raise ConfigError(f"strategy {s.name}: {e}") from None
    data_path = cfg.data.path or str(data_mod.ensure_default_dataset(vocab_size=cfg.data.vocab_size))
    cfg = resolve_vocab(cfg, data_mod.TokenDataset.open(data_path))
    settings = {**args.settings, "data.path": data_path}

    args.out.mkdir(parents=True, exist_ok=True)
    n_params = param_count(cfg.model)["total"]
    print(f"meshlm bench: {len(args.strategies)} strategies, {cfg.preset} ({n_params / 1e6:.2f}M params), "
          f"batch {batch}x{cfg.train.seq_len}, {args.warmup}+{args.steps} steps -> {args.out}", flush=True)
    records: list[dict] = []
    for i, s in enumerate(args.strategies, 1):
        ranks = s.ranks(w)
        print(f"[{time.strftime('%H:%M:%S')}] {i}/{len(args.strategies)} {s.name}: {s.about}, "
              f"{ranks} process{'es' if ranks > 1 else ''}", flush=True)
        start = time.perf_counter()
        record = run_strategy(s, world=w, warmup=args.warmup, steps=args.steps, settings=settings,
                              threads=cfg.train.threads)
        took = time.perf_counter() - start
        if record.get("error"):
            print(f"[{time.strftime('%H:%M:%S')}] {i}/{len(args.strategies)} {s.name}: FAILED after {took:.1f} s: "
                  f"{record['error']}", flush=True)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {i}/{len(args.strategies)} {s.name}: done in {took:.1f} s, step "
                  f"{1e3 * record['step_time_s']:.1f} ms, {record['tokens_per_s']:,.0f} tokens/s, final loss "
                  f"{record['losses'][-1]:.4f}", flush=True)
        records.append(record)
        (args.out / "results.json").write_text(json.dumps(records, indent=1))

    plot_note = report.plot_step_times(records, args.out / "step_time.png")
    (args.out / "report.md").write_text(report.markdown(records, command=command, context=_context(cfg, args, n_params),
                                                        plot_note=plot_note or ""))
    print()
    print(report.console_table(records))
    if plot_note:
        print(f"meshlm bench: {plot_note}")
    print(f"meshlm bench: wrote {args.out / 'results.json'} and {args.out / 'report.md'}"
          + ("" if plot_note else f" and {args.out / 'step_time.png'}"), flush=True)
    return records


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE.format(names=", ".join(STRATEGIES),
                           ours=", ".join(n for n, s in STRATEGIES.items() if not s.is_peer),
                           peers=", ".join(n for n, s in STRATEGIES.items() if s.is_peer)))
        print(settings_help())
        return 0
    args = parse_args(argv)
    run_bench(args, command=shlex.join(["meshlm", "bench", *argv]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
