"""The golden loss-parity suite: one tiny config trained under many layouts, every curve against one process.

Every layout of the mesh (data, ZeRO, tensor, sequence, pipeline, expert and context parallelism, and
their N-D combinations) must compute the same mathematics as one process: same seed, same data, same
global batch. So the loss curve of each layout must equal the single-process curve, step by step, to
the rounding of fp32 sums taken in another order. This file is the one place where that is checked
for all of them together (torchtitan's `scripts/loss_compare.py` does the same job):

    meshlm parity                 # the golden layouts, 30 steps, every curve against `single`
    meshlm parity --long          # and a longer sweep (every schedule, ZeRO stage and 3-D mix)
    meshlm parity --only dp4,tp4-sp --steps 10

Each layout runs as its own torchrun job; the table, parity.json and parity.png (the curves and their
differences from `single`) go to --out. The exit code is 1 if any curve leaves the tolerance.

The config is a Llama-style mixture-of-experts model with four blocks, two of them MoE (dropless), so
that one config serves every axis, the expert axis included. tests/test_golden.py runs the same cases
on the test-suite's process pools and compares the single curve with the one kept in tests/assets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from .layout import Layout

GOLDEN_SETTINGS: dict[str, str] = {
    "model.preset": "llama-moe-tiny", "model.n_layers": "4", "model.moe_every": "2",
    "train.batch_size": "8", "train.seq_len": "32", "train.lr": "3e-3", "train.warmup_steps": "5",
    "train.eval_every": "0", "train.seed": "0",
}
"""The one config every layout trains (its steps are set per run)."""

RTOL = 1e-4
"""Largest relative difference of any step's loss from the single-process loss (fp32)."""


@dataclass(frozen=True)
class Case:
    name: str
    layout: Layout

    @property
    def world(self) -> int:
        return self.layout.world_size


GOLDEN: list[Case] = [
    Case("single", Layout()),
    Case("dp4", Layout(dp=4)),
    Case("zero3-dp4", Layout(dp=4, zero=3)),
    Case("tp4-sp", Layout(tp=4, sequence_parallel=True)),
    Case("pp4-1f1b", Layout(pp=4, micro_batches=4)),
    Case("pp2-interleaved", Layout(pp=2, vpp=2, schedule="interleaved", micro_batches=4)),
    Case("cp2-dp2", Layout(cp=2, dp=2)),
    Case("dp2-tp2-pp2", Layout(dp=2, tp=2, pp=2, micro_batches=2)),
    Case("dp2-ep2-tp2", Layout(dp=2, ep=2, tp=2)),
    Case("tp2-cp2-pp2", Layout(tp=2, cp=2, pp=2, micro_batches=2)),
]
"""The layouts the test suite checks on every run."""

LONG: list[Case] = [
    Case("dp2-micro4", Layout(dp=2, micro_batches=4)),
    Case("zero1-dp2", Layout(dp=2, zero=1)),
    Case("zero2-dp4", Layout(dp=4, zero=2)),
    Case("tp2", Layout(tp=2)),
    Case("pp2-gpipe", Layout(pp=2, schedule="gpipe", micro_batches=4)),
    Case("pp2-zb", Layout(pp=2, schedule="zb", micro_batches=4)),
    Case("ep4", Layout(ep=4)),
    Case("cp4", Layout(cp=4)),
    Case("zero2-pp2-dp2", Layout(pp=2, dp=2, zero=2, micro_batches=2)),
    Case("zero1-ep2-dp2", Layout(dp=2, ep=2, zero=1)),
    Case("tp2-sp-cp2-dp2", Layout(dp=2, tp=2, cp=2, sequence_parallel=True)),
    Case("pp2-ep2-cp2", Layout(pp=2, ep=2, cp=2, micro_batches=2)),
    Case("zero3-dp2-tp2-sp", Layout(dp=2, tp=2, zero=3, sequence_parallel=True)),
]
"""The longer sweep behind --long (and MESHLM_GOLDEN=long in the tests)."""


def cases(*, long: bool = False, only: str = "") -> list[Case]:
    """The cases to run, `single` first; ValueError naming an unknown one in `only`."""
    pool = GOLDEN + (LONG if long or only else [])
    if not only:
        return pool
    by_name = {c.name: c for c in GOLDEN + LONG}
    chosen = [by_name["single"]]
    for name in (n.strip() for n in only.split(",") if n.strip()):
        if name not in by_name:
            raise ValueError(f"--only: unknown case {name!r}; cases are {', '.join(by_name)}")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    return chosen


def layout_settings(layout: Layout) -> dict[str, str]:
    return {f"layout.{f.name}": str(getattr(layout, f.name)).lower() for f in fields(layout)}


def loss_curve(layout: Layout, *, data_path: str, steps: int, settings: dict[str, str] | None = None) -> list[float]:
    """Train `steps` steps of the golden config under `layout` in this process group; the losses (every rank)."""
    import torch

    from .data import TokenDataset
    from .layout import require_implemented, validate
    from .mesh import Mesh
    from .settings import build_config
    from .train.trainer import Trainer, resolve_vocab

    overrides = {**GOLDEN_SETTINGS, **(settings or {}), **layout_settings(layout),
                 "data.path": data_path, "train.steps": str(steps)}
    dataset = TokenDataset.open(data_path)
    cfg = resolve_vocab(build_config(overrides=overrides), dataset)
    validate(cfg.layout, cfg.model, layout.world_size, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
    require_implemented(cfg.layout)
    trainer = Trainer(cfg, mesh=Mesh.build(layout), device=torch.device("cpu"), dataset=dataset)
    return [trainer.step().loss for _ in range(steps)]


def max_rel_diff(curve: list[float], ref: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(curve, ref, strict=True))


def data_fingerprint(data_path: str) -> str:
    """What the reference curve depends on besides the code: the tokens (and so the Python version's stdlib)."""
    from .data import TokenDataset
    d = TokenDataset.open(data_path)
    h = hashlib.sha256(str(d.vocab_size).encode())
    h.update(bytes(memoryview(d.train[: 1 << 16])))
    return h.hexdigest()[:16]


# --- the command ----------------------------------------------------------------------------------


def _worker(argv: list[str]) -> int:
    """One case as one torchrun job: rank 0 writes its curve to --result."""
    import torch.distributed as dist

    p = argparse.ArgumentParser(prog="meshlm.parity --worker")
    p.add_argument("--case", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    case = {c.name: c for c in GOLDEN + LONG}[args.case]
    dist.init_process_group("gloo")
    try:
        losses = loss_curve(case.layout, data_path=args.data, steps=args.steps)
        if dist.get_rank() == 0:
            Path(args.result).write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    """`meshlm parity`: run the cases, compare, report; 0 when every curve is within RTOL of `single`."""
    from .config import ConfigError
    from .data import ensure_default_dataset
    from .launch import launch_local

    p = argparse.ArgumentParser(prog="meshlm parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per layout (default 30)")
    p.add_argument("--long", action="store_true", help="add the longer sweep of layouts")
    p.add_argument("--only", default="", help="comma-separated case names (single is always run)")
    p.add_argument("--data", default="", help="a prepared dataset (default: the stdlib corpus)")
    p.add_argument("--out", default="", help="output folder (default runs/parity-<date-time>)")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise ConfigError(f"--steps ({args.steps}) must be >= 1")
    try:
        chosen = cases(long=args.long, only=args.only)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data_path = args.data or str(ensure_default_dataset())
    out = Path(args.out or Path("runs") / time.strftime("parity-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[float] | None] = {}
    for i, case in enumerate(chosen, 1):
        start = time.perf_counter()
        print(f"[{i}/{len(chosen)}] {case.name} ({case.layout.describe()}, {case.world} processes) ...", flush=True)
        if case.world == 1:
            curves[case.name] = loss_curve(case.layout, data_path=data_path, steps=args.steps)
        else:
            result = out / f"{case.name}.json"
            code = launch_local(case.world, ["--worker", "--case", case.name, "--data", data_path,
                                             "--steps", str(args.steps), "--result", str(result)],
                                module="meshlm.parity", threads=1)
            curves[case.name] = json.loads(result.read_text()) if code == 0 and result.exists() else None
        print(f"[{i}/{len(chosen)}] {case.name}: done in {time.perf_counter() - start:.1f} s", flush=True)
    ref = curves["single"]
    rows, failed = [], []
    for case in chosen:
        c = curves[case.name]
        diff = None if c is None else max_rel_diff(c, ref)
        ok = diff is not None and diff <= RTOL
        if not ok:
            failed.append(case.name)
        rows.append({"case": case.name, "layout": case.layout.describe(), "ranks": case.world,
                     "final_loss": None if c is None else c[-1], "max_rel_diff": diff, "ok": ok})
    print(f"\n{'case':<18}{'layout':<34}{'ranks':>6}{'final loss':>12}{'max rel diff':>14}  ok")
    for r in rows:
        loss = "failed" if r["final_loss"] is None else f"{r['final_loss']:.5f}"
        diff = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        print(f"{r['case']:<18}{r['layout']:<34}{r['ranks']:>6}{loss:>12}{diff:>14}  {'yes' if r['ok'] else 'NO'}")
    (out / "parity.json").write_text(json.dumps({"settings": GOLDEN_SETTINGS, "steps": args.steps, "rtol": RTOL,
                                                 "data": data_path, "rows": rows, "curves": curves}, indent=1))
    plotted = _plot(curves, out / "parity.png")
    print(f"\nmeshlm parity: {len(rows) - len(failed)}/{len(rows)} layouts within rtol {RTOL:g} of single; "
          f"wrote {out / 'parity.json'}" + (f" and {plotted}" if plotted else ""))
    if failed:
        print(f"meshlm parity: outside the tolerance or failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _plot(curves: dict[str, list[float] | None], path: Path) -> Path | None:
    """Loss curves (left) and each layout's |loss - single| / single per step (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ref = curves["single"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in curves.items():
        if c is None:
            continue
        steps = range(1, len(c) + 1)
        a.plot(steps, c, label=name, lw=1)
        if name != "single":
            b.semilogy(steps, [max(abs(x - y) / abs(y), 1e-12) for x, y in zip(c, ref)], label=name, lw=1)
    a.set(xlabel="step", ylabel="loss", title="loss curves (they lie on top of each other)")
    b.axhline(RTOL, color="k", ls="--", lw=1, label=f"tolerance {RTOL:g}")
    b.set(xlabel="step", ylabel="|loss - single| / single", title="difference from one process")
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
