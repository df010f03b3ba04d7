"""`meshlm bench`: run each strategy as its own job, collect the records, write results.json and report.md.

    parse and check everything (strategies, world sizes, settings, data, layouts) before any job
    -> plan the jobs: each strategy at each world size, or the reason it does not run there
    -> for each job: launch_local(ranks, worker) -> rank 0's record, or the job's earliest error
    -> results.json (after every job; at the end with the derived figures), report.md, the plots,
       README_section.md, and the table on the console

A strategy that fails inside its job (a setting the trainer does not implement yet, a crash) becomes
a row with an `error` field; the others still run. `--suite full` runs every strategy at world sizes
1, 2, 4 and 8 on one small model; a strategy whose layout does not fit a world size (tp 8 with 4
heads, 16 pipeline stages of 8 layers) becomes a row with a `skipped` field saying why, and so does
every distributed strategy at world size 1 (its layout is the single process's).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..layout import validate
from ..settings import build_config, parse_overrides, settings_help, take_flags
from . import report
from .strategies import STRATEGIES, SUITES, Strategy, parse_strategies

USAGE = """usage: meshlm bench [--suite full] [--strategies A,B,...] [--world-size W | --world-sizes 1,2,4,8]
                    [--out DIR] [--quick] [--steps N] [--warmup W] [--repeat R] [--section.field VALUE ...]

Train the same model on the same data, seed and global batch under each strategy, one job per
strategy, and compare step time, tokens/s, memory, communication and the loss curve.

  --suite full       every strategy but the optional DeepSpeed/Megatron peers, at world sizes 1, 2, 4
                     and 8, {suite_steps}, on
                     {suite_model};
                     --strategies and --world-sizes narrow them
  --strategies LIST  comma-separated, from: {names}
                     (default: all). Our {ours}; PyTorch's {peers}.
  --world-size W     ranks of every strategy but single (default 2)
  --world-sizes LIST with --suite: the world sizes to sweep (default 1,2,4,8)
  --out DIR          results.json, report.md, README_section.md and the PNGs (default runs/bench-<date-time>)
  --quick            tiny model: gpt-tiny, seq_len 64, batch 8, 2 warm-up + 5 timed steps
  --steps N          timed steps after warm-up (default 10; --quick 5)
  --warmup W         untimed warm-up steps (default 3; --quick 2)
  --repeat R         run every job R times, in R rounds over all of them; each row keeps its fastest
                     round (default 1): a shared machine's slow spells then spoil one round, not a row
  --gpu-baseline     instead: meshlm against a plain nanoGPT-style loop on one GPU (--gpu-baseline --help)

The remaining --section.field VALUE settings are those of `meshlm train` (e.g. --model gpt-tiny
--train.batch_size 8); the layout is the bench's, except --layout.micro_batches.
"""

QUICK_SETTINGS = {"model.preset": "gpt-tiny", "train.seq_len": "64", "train.batch_size": "8"}
DEFAULT_STEPS, DEFAULT_WARMUP = 10, 3
QUICK_STEPS, QUICK_WARMUP = 5, 2
SUITE_SETTINGS = {"model.preset": "gpt-tiny", "model.n_layers": "8", "model.n_heads": "8", "train.seq_len": "64",
                  "train.batch_size": "16", "train.threads": "1"}
"""--suite: gpt-tiny made 8 layers and 8 heads deep, so that tp, pp and their peers divide it up to 8 ranks; a
global batch of 16 sequences (2 per rank at 8 data-parallel ranks, 1 per micro-batch at 8 stages). One thread
per process, the single one included: a rank stands for one device, so the speed-up against one process is
the parallel one (on C cores, at most C), and no process's thread pool spins against another's."""
SUITE_STEPS, SUITE_WARMUP = 4, 1
SUITE_WORLD_SIZES = (1, 2, 4, 8)
_VALUE_FLAGS = ("--strategies", "--world-size", "--world-sizes", "--out", "--steps", "--warmup", "--suite",
                "--repeat")


@dataclass(frozen=True, kw_only=True)
class BenchArgs:
    strategies: list[Strategy]
    world_size: int
    out: Path
    steps: int
    warmup: int
    settings: dict[str, str]
    """Settings overrides shared by every strategy (the --quick or --suite ones, then the user's)."""
    suite: str = ""
    """'full' under --suite full: sweep `world_sizes`, record the strategies that do not fit one as skipped."""
    world_sizes: tuple[int, ...] = ()
    """The world sizes to run: (world_size,) without a suite."""
    repeat: int = 1
    """Rounds over every job; each row keeps its fastest round."""


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} ({text!r}) must be an integer") from None


def parse_args(argv: list[str]) -> BenchArgs:
    """The bench's own flags, then `meshlm train` settings; ConfigError names the bad value."""
    flags, rest = take_flags(argv, _VALUE_FLAGS)
    quick = "--quick" in rest
    rest = [a for a in rest if a != "--quick"]

    user = parse_overrides(rest)
    for key in user:
        if key.startswith("layout.") and key != "layout.micro_batches":
            raise ConfigError(f"--{key} is set by each strategy (use --world-size); of the layout, only "
                              "--layout.micro_batches may be given")
        if key == "train.steps":
            raise ConfigError("--train.steps is set by the bench; use --steps and --warmup")
        if any(key in s.settings for s in STRATEGIES.values()):
            raise ConfigError(f"--{key} is set by a strategy; choose strategies with --strategies")

    suite = flags.get("--suite", "")
    if suite and suite not in SUITES:
        raise ConfigError(f"--suite ({suite!r}) must be one of: {', '.join(SUITES)}")
    if suite and "--world-size" in flags:
        raise ConfigError("--world-size is for a single world size; with --suite use --world-sizes")
    if "--world-sizes" in flags and not suite:
        raise ConfigError("--world-sizes sweeps a suite; give --suite full (or --world-size W)")
    default_names = ",".join(SUITES[suite]) if suite else ",".join(STRATEGIES)
    strategies = parse_strategies(flags.get("--strategies", default_names))
    world = _int("--world-size", flags.get("--world-size", "2"))
    if world < 1:
        raise ConfigError(f"--world-size ({world}) must be >= 1")
    sizes = (world,)
    if suite:
        text = flags.get("--world-sizes", ",".join(map(str, SUITE_WORLD_SIZES)))
        sizes = tuple(sorted({_int("--world-sizes", w.strip()) for w in text.split(",") if w.strip()}))
        if not sizes or sizes[0] < 1:
            raise ConfigError(f"--world-sizes ({text!r}) must list world sizes >= 1")
        world = sizes[-1]
    mode_steps, mode_warmup = ((SUITE_STEPS, SUITE_WARMUP) if suite else (QUICK_STEPS, QUICK_WARMUP) if quick
                               else (DEFAULT_STEPS, DEFAULT_WARMUP))
    steps = _int("--steps", flags.get("--steps", str(mode_steps)))
    warmup = _int("--warmup", flags.get("--warmup", str(mode_warmup)))
    if steps < 1:
        raise ConfigError(f"--steps ({steps}) must be >= 1")
    if warmup < 0:
        raise ConfigError(f"--warmup ({warmup}) must be >= 0")
    repeat = _int("--repeat", flags.get("--repeat", "1"))
    if repeat < 1:
        raise ConfigError(f"--repeat ({repeat}) must be >= 1")
    out = Path(flags.get("--out") or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S"))
    settings = {**(SUITE_SETTINGS if suite else QUICK_SETTINGS if quick else {}), **user}
    return BenchArgs(strategies=strategies, world_size=world, out=out, steps=steps, warmup=warmup, settings=settings,
                     suite=suite, world_sizes=sizes, repeat=repeat)


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
            record["settings"] = merged  # what it ran with (`meshlm plan --validate` costs it again)
            if code != 0:
                record["note"] = "; ".join(filter(None, [record.get("note"), f"the job exited with code {code} "
                                                          "after rank 0 wrote this record"]))
            return record
        return _failed(strategy, world, _job_error(result, code))


def best_round(records: list[dict]) -> dict:
    """One row from a job's rounds: the fastest that ran (its step times in `step_time_rounds_s`), else the
    first failure."""
    ok = [r for r in records if r.get("step_time_s")]
    if not ok:
        return records[0]
    best = dict(min(ok, key=lambda r: r["step_time_s"]))
    if len(records) > 1:
        best["step_time_rounds_s"] = [r.get("step_time_s") for r in records]
    return best


def _context(cfg, args: BenchArgs, n_params: int) -> str:
    import torch

    sizes = ", ".join(map(str, args.world_sizes)) if args.suite else str(args.world_size)
    rounds = f" (the fastest of {args.repeat} rounds)" if args.repeat > 1 else ""
    model = cfg.preset + (f" with {cfg.model.n_layers} layers and {cfg.model.n_heads} heads" if args.suite else "")
    return (f"{model} ({n_params / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}), global batch "
            f"{cfg.train.batch_size} x {cfg.train.seq_len} tokens, {cfg.train.precision}, {args.warmup} warm-up + "
            f"{args.steps} timed steps{rounds}, world size{'s' * bool(args.suite)} {sizes}, "
            f"{cfg.train.threads or 'the cores shared out:'} thread{'s' * (cfg.train.threads != 1)} per process; "
            f"torch {torch.__version__}, "
            f"{'cuda' if torch.cuda.is_available() and cfg.train.device != 'cpu' else 'cpu'}, "
            f"{os.cpu_count()} cores, {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}.")


@dataclass(frozen=True)
class Job:
    strategy: Strategy
    world: int
    """The world size this job stands for (its ranks: strategy.ranks(world))."""
    skip: str = ""
    """Why it does not run ('' when it does)."""

    @property
    def ranks(self) -> int:
        return self.strategy.ranks(self.world)


def why_not(strategy: Strategy, world: int, settings: dict[str, str]) -> str:
    """'' when `strategy` can run at `world` with these settings, else the reason (the layout rule it breaks)."""
    from .worker import predicted_layout

    ranks = strategy.ranks(world)
    try:
        cfg = build_config(overrides={**settings, **strategy.overrides(world)})
        layout = predicted_layout(strategy.name, cfg, ranks) if strategy.is_peer else cfg.layout
        validate(layout, cfg.model, ranks, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
        if strategy.is_peer and strategy.distributed and layout.world_size == 1 and ranks > 1:
            raise ConfigError("the peer's equivalent layout has one rank")
    except (ConfigError, ValueError) as e:
        return " ".join(str(e).split())
    return ""


def plan_jobs(args: BenchArgs, settings: dict[str, str]) -> list[Job]:
    """The jobs, in the order they run. Without a suite: each strategy in the order given, at --world-size (a
    hybrid at its own); ConfigError names the first that cannot run. With one: the one-process strategies
    (with the baselines the others compare with), then every world size in turn, each strategy at it or
    skipped with the reason."""
    if not args.suite:
        jobs = [Job(s, args.world_size) for s in args.strategies]
        for job in jobs:
            reason = why_not(job.strategy, job.world, settings)
            if reason:
                raise ConfigError(f"strategy {job.strategy.name}: {reason}")
        return jobs
    sizes = args.world_sizes
    swept = [s for s in args.strategies if s.distributed and (s.world in sizes or not s.world and max(sizes) > 1)]
    ones = dict.fromkeys([s.baseline for s in swept] + [s.name for s in args.strategies if not s.distributed])
    jobs = [Job(STRATEGIES[n], 1, why_not(STRATEGIES[n], 1, settings)) for n in ones]
    for w in sizes:
        for s in args.strategies:
            if not s.distributed or (s.world and s.world != w):
                continue
            if w == 1:
                jobs.append(Job(s, 1, "world size 1: every degree is 1, the single process's layout (its row: "
                                      f"{s.baseline})"))
                continue
            jobs.append(Job(s, w, why_not(s, w, settings)))
    for s in args.strategies:
        if s.world and s.world not in sizes:
            jobs.append(Job(s, s.world, f"a layout of {s.world} ranks; the world sizes swept are "
                                        f"{', '.join(map(str, sizes))}"))
    return jobs


def _relative(path: Path) -> str:
    """`path` as the README (at the working directory, where the command ran) links it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_bench(args: BenchArgs, *, command: str) -> list[dict]:
    """Every job in turn; writes DIR/results.json (after each), then DIR/report.md, the plots and
    DIR/README_section.md."""
    from .. import data as data_mod
    from ..config import param_count
    from ..launch import under_torchrun
    from ..train.trainer import resolve_vocab
    from . import plots

    if under_torchrun():
        raise ConfigError("meshlm bench launches a job per strategy itself; run it without torchrun")
    began = time.perf_counter()
    cfg = build_config(overrides=args.settings)  # every setting checked here, before any job
    w, micro, batch = args.world_size, cfg.layout.micro_batches, cfg.train.batch_size
    if not args.suite and batch % (w * micro):
        raise ConfigError(f"--world-size ({w}) times layout.micro_batches ({micro}) must divide "
                          f"train.batch_size ({batch})")
    jobs = plan_jobs(args, args.settings)  # before preparing any data: each strategy's own layout and model
    data_path = cfg.data.path or str(data_mod.ensure_default_dataset(vocab_size=cfg.data.vocab_size))
    cfg = resolve_vocab(cfg, data_mod.TokenDataset.open(data_path))
    settings = {**args.settings, "data.path": data_path}

    args.out.mkdir(parents=True, exist_ok=True)
    n_params = param_count(cfg.model)["total"]
    running = [j for j in jobs if not j.skip]
    print(f"meshlm bench: {len(running)} jobs ({len(jobs) - len(running)} not run), {cfg.preset} "
          f"({n_params / 1e6:.2f}M params), batch {batch}x{cfg.train.seq_len}, {args.warmup}+{args.steps} steps "
          f"-> {args.out}", flush=True)
    records: list[dict] = []
    # every round runs every job once, so a slow spell on this shared machine hits one round of each row, not
    # all of one row; a row keeps its fastest round (timeit's convention) and lists every round's step time
    rounds: list[list[dict]] = [[] for _ in jobs]
    done = 0
    for rnd in range(args.repeat):
        for i, job in enumerate(jobs):
            s, ranks = job.strategy, job.ranks
            if job.skip:
                if rnd == 0:
                    print(f"[{time.strftime('%H:%M:%S')}] -- {s.name} at {ranks} ranks: not run: {job.skip}",
                          flush=True)
                rounds[i] = [{"strategy": s.name, "world_size": ranks, "skipped": job.skip}]
                continue
            done += 1
            tag = f"{done}/{len(running) * args.repeat} {s.name}" + (f" ({ranks})" if args.suite else "")
            print(f"[{time.strftime('%H:%M:%S')}] {tag}: {s.about}, {ranks} process{'es' if ranks > 1 else ''}",
                  flush=True)
            start = time.perf_counter()
            record = run_strategy(s, world=job.world, warmup=args.warmup, steps=args.steps, settings=settings,
                                  threads=cfg.train.threads)
            took = time.perf_counter() - start
            record["job_wall_s"] = round(took, 2)
            if record.get("error"):
                print(f"[{time.strftime('%H:%M:%S')}] {tag}: FAILED after {took:.1f} s: {record['error']}",
                      flush=True)
            else:
                print(f"[{time.strftime('%H:%M:%S')}] {tag}: done in {took:.1f} s, step "
                      f"{1e3 * record['step_time_s']:.1f} ms, {record['tokens_per_s']:,.0f} tokens/s, final loss "
                      f"{record['losses'][-1]:.4f}", flush=True)
            rounds[i].append(record)
            records = [best_round(r) for r in rounds if r]
            (args.out / "results.json").write_text(json.dumps(records, indent=1))
    records = [best_round(r) for r in rounds]

    report.enrich(records)
    advice = report.advise(records, cores=os.cpu_count())
    plot_paths, plot_note = plots.plot_all(records, args.out, cores=os.cpu_count())
    took = time.perf_counter() - began
    context = _context(cfg, args, n_params)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    (args.out / "report.md").write_text(report.markdown(
        records, command=command, context=context + f" The whole bench took {took / 60:.1f} min.",
        plot_note=plot_note, plots=plot_paths, advice=advice))
    (args.out / "README_section.md").write_text(report.readme_section(
        records, command=command, took_s=took, context=context, cores=os.cpu_count(),
        plot=_relative(args.out / "scaling.png") if "Scaling" in plot_paths else None))
    print()
    print(report.console_table(records))
    if plot_note:
        print(f"meshlm bench: {plot_note}")
    print(f"meshlm bench: {len(running)} jobs in {took / 60:.1f} min; wrote {args.out / 'results.json'}, "
          f"{args.out / 'report.md'}, {args.out / 'README_section.md'}"
          + ("" if plot_note else f" and {len(plot_paths)} plots"), flush=True)
    return records


def main(argv: list[str]) -> int:
    if "--gpu-baseline" in argv:  # meshlm against a plain single-file PyTorch loop on one device (baseline.py)
        from .baseline import main as baseline_main
        return baseline_main([a for a in argv if a != "--gpu-baseline"])
    if "-h" in argv or "--help" in argv:
        print(USAGE.format(names=", ".join(STRATEGIES), suite_steps=f"{SUITE_WARMUP} warm-up + {SUITE_STEPS} steps",
                           suite_model="\n                     ".join(
                               textwrap.wrap(" ".join(f"--{k} {v}" for k, v in SUITE_SETTINGS.items()), 80)),
                           ours=", ".join(n for n, s in STRATEGIES.items() if not s.is_peer),
                           peers=", ".join(n for n, s in STRATEGIES.items() if s.is_peer)))
        print(settings_help())
        return 0
    args = parse_args(argv)
    run_bench(args, command=shlex.join(["meshlm", "bench", *argv]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
