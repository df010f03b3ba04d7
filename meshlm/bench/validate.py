"""`meshlm plan --validate runs/bench`: cost every row of a stored bench again with today's planner.

A bench run records, per row, the measured step time and peak memory beside the planner's prediction made
when it ran. After a new calibration (`meshlm plan --calibrate`) or a change to the cost model, this re-costs
the same rows, with the settings each row ran with (`settings` in its record; rows of older runs without
them are taken to be `--suite` rows), and prints measured, predicted and the error per row, and the median
absolute errors by world size and over all rows. The measurements are not touched.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from .report import _median, _ok, fmt_ms, measured_mem


def load_results(path: str | Path) -> list[dict]:
    """The records of a bench's results.json (or of the directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ConfigError(f"validate: {path} is not a bench results.json nor a directory holding one")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"validate: {p} is not JSON ({e})") from None
    rows = doc.get("results", doc) if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ConfigError(f"validate: {p} holds no list of bench records")
    return rows


def recost(records: list[dict]) -> list[dict]:
    """For each row that ran: {strategy, world_size, step_time_s, predicted_step_time_s, step_error, mem_bytes,
    predicted_mem_bytes, mem_error, cpu_s_per_rank, predicted_cpu_s_per_rank, note}; a row the planner cannot
    cost has None and its reason in `note`; cpu_s_per_rank (the ranks' mean CPU seconds per step) is None in
    records older than it, and its prediction None unless the ranks outnumber the cores (cost.py)."""
    from .. import data as data_mod
    from ..settings import build_config
    from ..train.trainer import resolve_vocab
    from .run import SUITE_SETTINGS
    from .strategies import STRATEGIES
    from .worker import predict_record

    default_data = None
    datasets: dict[str, object] = {}
    out = []
    for r in records:
        if not _ok(r) or r.get("strategy") not in STRATEGIES:
            continue
        strategy, world = STRATEGIES[r["strategy"]], r["world_size"]
        settings = r.get("settings")
        if settings is None:  # recorded before rows kept their settings: the suite's
            settings = {**SUITE_SETTINGS, **strategy.overrides(world)}
        settings = dict(settings)
        if "data.path" not in settings:
            if default_data is None:
                default_data = str(data_mod.ensure_default_dataset(progress=False))
            settings["data.path"] = default_data
        path = settings["data.path"]
        if path not in datasets:
            datasets[path] = data_mod.TokenDataset.open(path)
        cfg = resolve_vocab(build_config(overrides=settings), datasets[path])
        pred = predict_record(strategy.name, cfg, world)
        step, mem = r["step_time_s"], measured_mem(r)
        p_step, p_mem = pred.get("predicted_step_time_s"), pred.get("predicted_mem_bytes")
        out.append({"strategy": strategy.name, "world_size": world, "step_time_s": step,
                    "predicted_step_time_s": p_step, "step_error": p_step / step - 1 if p_step else None,
                    "mem_bytes": mem, "predicted_mem_bytes": p_mem,
                    "mem_error": p_mem / mem - 1 if p_mem and mem and mem > 0 else None,
                    "cpu_s_per_rank": _mean(r.get("cpu_s_per_step_ranks")),
                    "predicted_cpu_s_per_rank": (pred.get("predicted_detail") or {}).get("cpu_per_rank_s"),
                    "note": pred.get("prediction_note", "")})
    return out


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def summary(rows: list[dict]) -> dict:
    """Median absolute errors: {'step': {world: (median, n), ..., 'all': ...}, 'memory': {...}}."""
    out = {}
    for what, key in (("step", "step_error"), ("memory", "mem_error")):
        by: dict = {}
        for r in rows:
            if r[key] is not None:
                by.setdefault(r["world_size"], []).append(abs(r[key]))
                by.setdefault("all", []).append(abs(r[key]))
        out[what] = {w: (_median(v), len(v)) for w, v in sorted(by.items(), key=lambda kv: (kv[0] == "all", kv[0]))}
    return out


def format_validation(rows: list[dict]) -> str:
    """A table of the rows, then the median absolute errors by world size and overall."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:+.1f}%"

    def mb(x):
        return "n/a" if not x else f"{x / 1e6:.1f} MB"

    def ms(x):
        return fmt_ms(x) if x else "n/a"

    # CPU/rank: the ranks' mean CPU time per step, and the planner's figure where the ranks outnumber the
    # cores: there the step is the ranks' CPU time shared by the cores, times the calibrated crowding
    head = ("strategy", "ranks", "step", "predicted", "error", "CPU/rank", "predicted", "memory", "predicted",
            "error")
    lines = [head] + [(r["strategy"], str(r["world_size"]), fmt_ms(r["step_time_s"]), ms(r["predicted_step_time_s"]),
                       pct(r["step_error"]), ms(r.get("cpu_s_per_rank")), ms(r.get("predicted_cpu_s_per_rank")),
                       mb(r["mem_bytes"]), mb(r["predicted_mem_bytes"]), pct(r["mem_error"]))
                      for r in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]
    for what, by in summary(rows).items():
        cells = [f"{'all' if w == 'all' else f'{w} ranks'} {100 * med:.1f}% (n={n})" for w, (med, n) in by.items()]
        text.append(f"median absolute error of {what}: " + ", ".join(cells))
    return "\n".join(text)


def main(path: str, *, as_json: bool = False) -> int:
    rows = recost(load_results(path))
    if not rows:
        raise ConfigError(f"validate: {path} has no row that ran")
    if as_json:
        print(json.dumps({"rows": rows, "median_abs_error": {k: {str(w): m for w, m in v.items()}
                                                             for k, v in summary(rows).items()}}, indent=1))
    else:
        print(format_validation(rows))
    return 0
