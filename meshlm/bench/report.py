"""The bench's outputs: the derived figures of every row, the tables (console, report.md, the README's
short table) and the plain-words advice.

Every figure comes from the records in results.json; nothing here measures anything. A record is one
job (a strategy at a number of ranks, `world_size`): measured (`step_time_s`, ...), failed (`error`)
or not run (`skipped`: why). `enrich` adds what is derived from the others, so results.json holds it:

    speedup               the baseline's step time / this row's (the baseline: single, or moe-single for
                          the MoE rows, megatron-single for Megatron's), the same global batch
    scaling_efficiency    speedup / ranks
    loss_parity           max over the steps of |loss - baseline loss| / |baseline loss|
    mem_above_base_bytes  peak resident set - the one before the model was built (both the largest rank's)
    mem_other_bytes       mem_above_base_bytes - params - grads - optim - activations (see measure.py)
    comm_axes             {axis: {bytes, seconds}} per step: the ops of each axis summed ('all_reduce/dp'
                          and 'all_reduce_wait/dp' are both dp); seconds None where no op of it is timed
    comm_share            the busiest rank's communication seconds per step / the step time (None when not
                          timed)
    pred_step_error, pred_mem_error   predicted / measured - 1 (the planner's calibrated cpu model)

A cell that cannot be filled says why ("n/a: no pipeline", "n/a: not counted: ...") rather than
staying blank: every row has every column.
"""

from __future__ import annotations

import os
from collections import defaultdict

from ..train.metrics import fmt_count
from .measure import MEMORY_KINDS
from .strategies import PEER_OF, STRATEGIES

FRAMEWORK_PEER_OF = {**{f"zero{k}": f"deepspeed-zero{k}" for k in (1, 2, 3)},
                     "tp": "megatron-tp", "dp": "megatron-ddp"}
"""Our rows that also get a ratio to the framework users run instead (DeepSpeed, Megatron-core), when it ran."""

AXIS_ORDER = ("dp", "dp_experts", "tp", "cp", "ep", "pp", "embed", "data")
"""Communication axes in the order the cells list them ('data': the loss and token-count all-reduce;
'embed': the tied embedding's gradient between the first and last pipeline stage)."""

COLUMNS = ["strategy", "ranks", "step time", "tokens/s", "speed-up", "peak mem/rank", "state/rank", "comm/step",
           "comm share", "bubble", "loss parity", "pred step", "pred mem", "vs PyTorch peer"]
"""The console table (report.md has four tables with more)."""

TABLES = {
    "Throughput and scaling": ["step time", "tokens/s", "speed-up", "scaling eff.", "pred step (error)",
                               "vs PyTorch peer"],
    "Memory per rank": ["peak RSS", "above baseline", "params", "grads", "optimizer", "activations", "other",
                        "pred mem (error)"],
    "Communication per step": ["bytes by axis", "time by axis", "share of step"],
    "Pipeline bubble and loss parity": ["bubble measured", "bubble predicted", "final loss",
                                        "loss parity (max rel. diff)"],
}
"""report.md's tables: each has strategy and ranks first, then these columns."""


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_ms(s: float) -> str:
    return f"{1e3 * s:.1f} ms"


def fmt_pct(x: float, *, sign: bool = False) -> str:
    return f"{100 * x:+.0f}%" if sign else f"{100 * x:.1f}%"


def _ok(r: dict | None) -> bool:
    return r is not None and not r.get("error") and not r.get("skipped")


def key(r: dict) -> tuple[str, int]:
    return r["strategy"], r.get("world_size", 0)


def index(records: list[dict]) -> dict[tuple[str, int], dict]:
    return {key(r): r for r in records}


def ratio(a: dict | None, b: dict | None) -> float | None:
    """Step time of a over that of b, when both ran."""
    if not (_ok(a) and _ok(b)):
        return None
    return a["step_time_s"] / b["step_time_s"]


def baseline_name(name: str) -> str:
    return STRATEGIES[name].baseline if name in STRATEGIES else "single"


def baseline_of(r: dict, records: list[dict]) -> dict | None:
    """The one-process row this row's losses and step time are compared with (it ran, or None)."""
    name = baseline_name(r["strategy"])
    return next((b for b in records if b["strategy"] == name and _ok(b)), None)


def max_loss_diff(r: dict, single: dict | None) -> float | None:
    if not (_ok(r) and _ok(single)) or len(r["losses"]) != len(single["losses"]):
        return None
    return max(abs(a - b) for a, b in zip(r["losses"], single["losses"]))


def loss_parity(r: dict, base: dict | None) -> float | None:
    """max |loss - base| / |base| over the curve (None when either did not run or the curves differ in length)."""
    if not (_ok(r) and _ok(base)) or len(r["losses"]) != len(base["losses"]) or not r["losses"]:
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))


def measured_mem(r: dict) -> float | None:
    """What the memory prediction is compared with: peak minus the baseline before the model was built."""
    if r.get("peak_mem_bytes") is None:
        return None
    return r["peak_mem_bytes"] - (r.get("base_mem_bytes") or 0)


def comm_axes(r: dict) -> dict[str, dict]:
    """{axis: {bytes, seconds, untimed}} per step, the ops of an axis summed. An op that moves bytes but took
    no recorded time (an asynchronous collective whose wait is not metered) is listed in `untimed`, unless
    its wait is metered apart ('all_reduce_wait/dp' times 'all_reduce/dp'); seconds is None when no op of
    the axis is timed."""
    nbytes, seconds = r.get("comm_bytes_per_step") or {}, r.get("comm_seconds_per_step") or {}
    out: dict[str, dict] = defaultdict(lambda: {"bytes": 0.0, "seconds": 0.0, "timed": False, "untimed": []})
    for k in sorted(set(nbytes) | set(seconds)):
        op, _, axis = k.partition("/")
        a = out[axis or op]
        a["bytes"] += nbytes.get(k, 0.0)
        if seconds.get(k):
            a["seconds"] += seconds[k]
            a["timed"] = True
        elif nbytes.get(k) and not seconds.get(f"{op}_wait/{axis}"):
            a["untimed"].append(op)
    rank = {a: i for i, a in enumerate(AXIS_ORDER)}
    return {a: {"bytes": v["bytes"], "seconds": v["seconds"] if v["timed"] else None, "untimed": v["untimed"]}
            for a, v in sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
            if v["bytes"] or v["timed"]}


def timed(r: dict) -> bool:
    """Whether this row's collectives are timed (ours are; a peer's are counted at most)."""
    return r.get("comm_coverage", "measured") == "measured"


def enrich(records: list[dict]) -> list[dict]:
    """Add the derived figures (see the module doc) to every row that ran; returns the records."""
    for r in records:
        if not _ok(r):
            continue
        base = baseline_of(r, records)
        speedup = None if base is None else base["step_time_s"] / r["step_time_s"]
        split = r.get("mem_split") or {}
        above = measured_mem(r)
        axes = comm_axes(r)
        comm_s = sum(v["seconds"] or 0.0 for v in axes.values())
        any_timed = timed(r) and (not axes or any(v["seconds"] is not None for v in axes.values()))
        pred_step, pred_mem = r.get("predicted_step_time_s"), r.get("predicted_mem_bytes")
        r.update({
            "baseline": base["strategy"] if base else None,
            "speedup": speedup,
            "scaling_efficiency": None if speedup is None else speedup / r["world_size"],
            "loss_parity": loss_parity(r, base),
            "loss_max_abs_diff": max_loss_diff(r, base),
            "mem_above_base_bytes": above,
            "mem_other_bytes": None if above is None or not split else above - sum(split.values()),
            "comm_axes": axes,
            "comm_seconds_total": comm_s if any_timed else None,
            "comm_share": (r.get("comm_seconds_max_rank", comm_s) / r["step_time_s"]) if any_timed else None,
            "pred_step_error": pred_step / r["step_time_s"] - 1 if pred_step else None,
            "pred_mem_error": pred_mem / above - 1 if pred_mem and above and above > 0 else None,
        })
    return records


def prediction_errors(records: list[dict]) -> tuple[list[float], list[float]]:
    """Relative errors (predicted / measured - 1) of step time and of memory, over the rows that have both."""
    step, mem = [], []
    for r in records:
        if not _ok(r):
            continue
        if r.get("predicted_step_time_s") and r.get("step_time_s"):
            step.append(r["predicted_step_time_s"] / r["step_time_s"] - 1)
        m = measured_mem(r)
        if r.get("predicted_mem_bytes") and m and m > 0:
            mem.append(r["predicted_mem_bytes"] / m - 1)
    return step, mem


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def error_line(records: list[dict]) -> str:
    """One line: the median absolute errors of the calibrated predictions (or why there are none)."""
    step, mem = prediction_errors(records)
    if not step and not mem:
        return "prediction: no row has a calibrated prediction"
    parts = []
    if step:
        parts.append(f"step time {100 * _median([abs(e) for e in step]):.1f}% over {len(step)} rows")
    if mem:
        parts.append(f"memory (peak - base) {100 * _median([abs(e) for e in mem]):.1f}% over {len(mem)} rows")
    return "prediction vs measurement, median absolute error: " + "; ".join(parts)


# --- cells --------------------------------------------------------------------------------------


def _vs_peers(r: dict, by: dict) -> str:
    peers = (PEER_OF.get(r["strategy"]), FRAMEWORK_PEER_OF.get(r["strategy"]))
    cells = [f"{ratio(r, by[(p, r['world_size'])]):.2f}x {p}" for p in peers
             if p and _ok(by.get((p, r["world_size"])))]
    if cells:
        return ", ".join(cells)
    if r["strategy"] in STRATEGIES and STRATEGIES[r["strategy"]].is_peer:
        return "n/a: a peer"
    peer = PEER_OF.get(r["strategy"]) or FRAMEWORK_PEER_OF.get(r["strategy"])
    if not peer:
        return "n/a: no peer"
    return f"n/a: {peer} not run at {r['world_size']} ranks"


def _axes_cell(r: dict, what: str) -> str:
    axes = r["comm_axes"]
    coverage = r.get("comm_coverage", "measured")
    if coverage.startswith("not counted"):
        return f"n/a: peer, {coverage}"
    if not axes:
        return "none"
    if what == "bytes":
        return ", ".join(f"{a} {fmt_bytes(v['bytes'])}" for a, v in axes.items())
    if not timed(r):
        return f"n/a: peer, {coverage}"
    return ", ".join(f"{a} {'not timed' if v['seconds'] is None else fmt_ms(v['seconds'])}"
                     + (f" (+ {'/'.join(v['untimed'])} not timed)" if v["untimed"] and v["seconds"] is not None
                        else "") for a, v in axes.items())


def _share_cell(r: dict) -> str:
    if not r["comm_axes"] and timed(r):
        return "0% (no communication)"
    if r["comm_share"] is None:
        return "n/a: not timed"
    untimed = [a for a, v in r["comm_axes"].items() if v["untimed"]]
    return fmt_pct(r["comm_share"]) + (f" (+ untimed {', '.join(untimed)} ops)" if untimed else "")


def _bubble_cell(value: float | None, note: str | None) -> str:
    return (note or "n/a: not recorded") if value is None else fmt_pct(value)


def _pred_step(r: dict) -> str:
    pred = r.get("predicted_step_time_s")
    if not pred:
        return "n/a: " + (r.get("prediction_note") or "no prediction")
    return f"{fmt_ms(pred)} ({fmt_pct(r['pred_step_error'], sign=True)})"


def _pred_mem(r: dict) -> str:
    pred = r.get("predicted_mem_bytes")
    if not pred:
        return "n/a: " + (r.get("prediction_note") or "no prediction")
    err = r.get("pred_mem_error")
    return fmt_bytes(pred) + (f" ({fmt_pct(err, sign=True)})" if err is not None else "")


def _parity(r: dict) -> str:
    if r["loss_parity"] is not None:
        return f"{r['loss_parity']:.1e}"
    if r["strategy"] == baseline_name(r["strategy"]):
        return "0 (the reference)"
    return f"n/a: no {baseline_name(r['strategy'])} row" if r["baseline"] is None else "n/a: curve lengths differ"


def cells(r: dict, by: dict) -> dict[str, str]:
    """Every column of every table for one row that ran (enriched)."""
    split = r.get("mem_split") or {}
    speed = r["speedup"]
    no_base = f"n/a: no {baseline_name(r['strategy'])} row"
    mem = {kind: fmt_bytes(split[kind]) if kind in split else "n/a: not probed" for kind in MEMORY_KINDS}
    return {
        "step time": fmt_ms(r["step_time_s"]), "tokens/s": fmt_count(r["tokens_per_s"]),
        "speed-up": no_base if speed is None else f"{speed:.2f}x",
        "scaling eff.": no_base if speed is None else fmt_pct(r["scaling_efficiency"]),
        "pred step (error)": _pred_step(r), "pred step": _pred_step(r),
        "vs PyTorch peer": _vs_peers(r, by),
        "peak RSS": fmt_bytes(r["peak_mem_bytes"]), "peak mem/rank": fmt_bytes(r["peak_mem_bytes"]),
        "above baseline": fmt_bytes(r["mem_above_base_bytes"]),
        "params": mem["params"], "grads": mem["grads"], "optimizer": mem["optim"],
        "activations": mem["activations"],
        "other": "n/a: not probed" if r["mem_other_bytes"] is None else fmt_bytes(r["mem_other_bytes"]),
        "pred mem (error)": _pred_mem(r), "pred mem": _pred_mem(r),
        "state/rank": fmt_bytes(r.get("state_bytes_per_rank")),
        "state": fmt_bytes(_state(r)) if split else "n/a: not probed",
        "bytes by axis": _axes_cell(r, "bytes"), "time by axis": _axes_cell(r, "seconds"),
        "comm/step": (_axes_cell(r, "bytes") if r.get("comm_coverage", "measured").startswith("not counted")
                      else fmt_bytes(sum(v["bytes"] for v in r["comm_axes"].values()))),
        "share of step": _share_cell(r), "comm share": _share_cell(r),
        "bubble measured": _bubble_cell(r.get("bubble_measured"), r.get("bubble_measured_note")),
        "bubble predicted": _bubble_cell(r.get("bubble_predicted"), r.get("bubble_predicted_note")),
        "bubble": (f"{fmt_pct(r['bubble_measured'])} (pred {fmt_pct(r['bubble_predicted'])})"
                   if r.get("bubble_measured") is not None and r.get("bubble_predicted") is not None
                   else _bubble_cell(r.get("bubble_measured"), r.get("bubble_measured_note"))),
        "final loss": f"{r['losses'][-1]:.4f}",
        "loss parity (max rel. diff)": _parity(r), "loss parity": _parity(r),
    }


def table_rows(records: list[dict], columns: list[str], *, every: list[dict] | None = None) -> list[list[str]]:
    """[strategy, ranks, *columns] per row that ran or failed (skipped rows are listed apart); `every`: all
    the records, when `records` is a selection of them (peers and baselines are looked up there)."""
    enrich(every or records)
    by = index(every or records)
    out = []
    for r in records:
        if r.get("skipped"):
            continue
        head = [r["strategy"], str(r.get("world_size", "-"))]
        if not _ok(r):
            out.append(head + ["failed"] + ["-"] * (len(columns) - 1))
            continue
        c = cells(r, by)
        out.append(head + [c[name] for name in columns])
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows])


def console_table(records: list[dict]) -> str:
    table = [COLUMNS] + table_rows(records, COLUMNS[2:])
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in records:
        if r.get("error"):
            lines.append(f"{r['strategy']} failed: {r['error']}")
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        lines.append(f"not run: {len(skipped)} (strategy, world size) pairs, each with its reason in report.md")
    lines.append(error_line(records))
    return "\n".join(lines)


# --- report.md ----------------------------------------------------------------------------------

EXPLAIN = [
    "**step time**: median over the steps after warm-up of the slowest rank's time per step; **tokens/s**: "
    "global tokens per step / step time; **speed-up**: the baseline's step time / this row's (the baseline is "
    "single; moe-single for the MoE rows, megatron-single for Megatron's), on the same global batch; "
    "**scaling eff.**: speed-up / ranks.",
    "**peak RSS**: the largest peak over the ranks (CPU: peak resident set, which includes the Python/torch "
    "baseline{baseline}; CUDA: the allocator's peak); **above baseline**: minus the resident set before the "
    "model was built. **params**, **grads**, **optimizer**: the bytes of distinct storages that rank holds "
    "inside its optimizer step; **activations**: the peak bytes autograd holds for backward (a saved-tensors "
    "hook); both probed on the last warm-up step, on every rank, and shown for the rank with the most; "
    "**other**: above baseline minus the four (allocator free lists, temporaries such as logits and gradient "
    "buckets, libraries loaded after the baseline; negative when the four, each at its own peak, never "
    "coincide).",
    "**bytes by axis**: payload bytes per step and rank by axis (an all-reduce of n bytes counts n), the largest "
    "rank per operation; **time by axis**: seconds per timed step blocked in that axis' collectives, the slowest "
    "rank per operation (overlapped data-parallel reductions count only their wait; pipeline send/receive time "
    "includes waiting for the neighbouring stage; a collective's time includes waiting for the slowest rank to "
    "enter it; the cp ring counts from send to arrival, overlapping the attention it hides behind); **share of "
    "step**: the busiest rank's sum over its collectives / step time. 'data' is the loss and token-count "
    "all-reduce, 'embed' the tied embedding's gradient between the pipeline's ends; 'not timed': an "
    "asynchronous collective whose wait is not metered (ZeRO's), or a peer's.",
    "**bubble measured**: 1 - busy / (stages x makespan) of the last step's timeline of every stage; "
    "**bubble predicted**: the schedule simulator (meshlm/parallel/schedules.py) on the same action table, "
    "backward = 2 x forward, no communication time: (p-1)/(m+p-1) for GPipe and 1F1B.",
    "**loss parity**: max over every step (warm-up included) of |loss - baseline loss| / baseline loss; every "
    "strategy runs the same model, seed, data and global batch. **vs PyTorch peer**: step time ours / the "
    "peer's at the same ranks ({peers}); below 1 means ours is faster.",
    "**pred step**, **pred mem**: the planner's calibrated cpu model (`meshlm plan --calibrate`, "
    "meshlm/plan/cost.py) for the row's layout (a peer: the equivalent one: dp=W with its ZeRO stage, tp=W, "
    "pp=W), with the error predicted / measured - 1; memory is compared with above baseline.",
]


def _baseline(records: list[dict]) -> str:
    base = [r["base_mem_bytes"] for r in records if _ok(r) and r.get("base_mem_bytes")]
    return f", {fmt_bytes(min(base))} to {fmt_bytes(max(base))} before the model was built" if base else ""


def markdown(records: list[dict], *, command: str, context: str, plot_note: str = "",
             plots: dict[str, str] | None = None, advice: list[str] | None = None) -> str:
    """report.md: the command, the four tables, what each column means, plots, what was not run, errors, notes."""
    enrich(records)
    lines = ["# meshlm bench", "", "```", command, "```", "", context, ""]
    for title, columns in TABLES.items():
        lines += [f"## {title}", ""] + _md_table(["strategy", "ranks", *columns], table_rows(records, columns)) + [""]
    pairs = [(a, b) for a, b in PEER_OF.items()] + [(a, b) for a, b in FRAMEWORK_PEER_OF.items()]
    peers = ", ".join(f"{a} vs {b}" for a, b in pairs) + " (DeepSpeed and Megatron-core when they ran)"
    lines += ["## Columns", ""] + ["- " + e.format(baseline=_baseline(records), peers=peers) for e in EXPLAIN]
    lines += ["- " + error_line(records) + "."]
    if plots:
        lines += ["", "## Plots", ""]
        for title, path in plots.items():
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    if advice:
        lines += ["", "## Which strategy should I use", ""] + [f"- {a}" for a in advice]
    skipped: dict[tuple[int, str], list[str]] = {}
    for r in records:
        if r.get("skipped"):
            skipped.setdefault((r.get("world_size", 0), r["skipped"]), []).append(r["strategy"])
    if skipped:
        lines += ["", "## Not run", ""] + _md_table(["strategies", "ranks", "why"], [
            [", ".join(names), str(w), why] for (w, why), names in skipped.items()])
    failed = [r for r in records if r.get("error")]
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{r['strategy']}`: {r['error']} ({r.get('world_size', '-')} ranks)"
                                          for r in failed]
    notes: dict[tuple[str, str], list[str]] = {}  # the same note at several world sizes, once
    for r in records:
        if _ok(r) and r.get("note"):
            notes.setdefault((r["strategy"], r["note"]), []).append(str(r["world_size"]))
    if notes or plot_note:
        lines += ["", "## Notes", ""] + [f"- `{name}` ({', '.join(ws)} ranks): {note}"
                                         for (name, note), ws in notes.items()]
        if plot_note:
            lines.append(f"- {plot_note}")
    return "\n".join(lines) + "\n"


# --- the README's short version and the advice ----------------------------------------------------

README_COLUMNS = ["tokens/s", "speed-up", "state", "activations", "share of step", "bubble measured",
                  "loss parity (max rel. diff)", "vs PyTorch peer"]


def readme_world(records: list[dict], cores: int | None = None) -> int:
    """The world size the README's table and the advice's speed figures use: the largest that ran and fits
    this machine's cores (one rank per core, none waiting for another's), else the smallest that ran."""
    sizes = sorted({r["world_size"] for r in records if _ok(r) and r["world_size"] > 1})
    if not sizes:
        return 1
    cores = cores or os.cpu_count() or 1
    return max([w for w in sizes if w <= cores] or sizes[:1])


def readme_section(records: list[dict], *, command: str, took_s: float, context: str, plot: str | None,
                   world: int | None = None, cores: int | None = None) -> str:
    """The README's short version: our strategies at one world size (readme_world) and their baselines, with
    the PyTorch peers as ratios; the command, the time it took and one plot."""
    enrich(records)
    w = world or readme_world(records, cores)
    rows = [r for r in records if not r.get("skipped") and (r.get("world_size") == 1 or (
        r.get("world_size") == w and not (r["strategy"] in STRATEGIES and STRATEGIES[r["strategy"]].is_peer)))]
    table = _md_table(["strategy", "ranks", *README_COLUMNS], table_rows(rows, README_COLUMNS, every=records))
    lines = [f"`{command}` ({took_s / 60:.1f} min on this machine; {context})", "",
             f"Our strategies at {w} ranks and their one-process baselines; the PyTorch peers as step-time ratios "
             "(every world size, the peers' own rows, the hybrid layouts, the memory, communication and planner "
             "columns and the plots are in `report.md` of the output folder):", ""] + table
    if plot:
        lines += ["", f"![scaling: tokens/s against ranks, per strategy family]({plot})"]
    return "\n".join(lines) + "\n"


def _at(records: list[dict], name: str, w: int) -> dict | None:
    r = index(records).get((name, w))
    return r if _ok(r) else None


def _axis_bytes(r: dict, axis: str) -> float:
    return (r["comm_axes"].get(axis) or {}).get("bytes") or 0.0


def _state(r: dict) -> float:
    s = r.get("mem_split") or {}
    return s.get("params", 0) + s.get("grads", 0) + s.get("optim", 0)


def advise(records: list[dict], *, cores: int | None = None) -> list[str]:
    """'Which strategy should I use', in plain words, from these measurements and the planner's predictions:
    one sentence per question, each with the figures it rests on (left out when its rows did not run). Speed
    is read at the largest world size that fits the cores (readme_world), memory at the largest that ran."""
    enrich(records)
    ok = [r for r in records if _ok(r)]
    sizes = sorted({r["world_size"] for r in ok if r["world_size"] > 1})
    if not sizes:
        return []
    cores = cores or os.cpu_count() or 1
    w, big = readme_world(records, cores), max(sizes)
    out = []
    single = _at(records, "single", 1)
    dp, dp_big = _at(records, "dp", w), _at(records, "dp", big)

    ranked = sorted((r for r in ok if r["world_size"] == w), key=lambda r: r["step_time_s"])
    if ranked:
        top = ", ".join(f"{r['strategy']} ({fmt_count(r['tokens_per_s'])} tokens/s)" for r in ranked[:3])
        base = f"; one process did {fmt_count(single['tokens_per_s'])}" if single else ""
        out.append(f"Fastest at {w} ranks (one per core of this {cores}-core machine): {top}{base}. Above {cores} "
                   "ranks the processes take turns on the cores, so those rows show each layout's overhead and "
                   "memory rather than its speed.")
    if dp and single:
        out.append(f"If the model, its gradients and optimizer states fit on one device, use data parallelism (dp): "
                   f"the same math (loss within {dp['loss_parity']:.0e} of one process), one all-reduce of the "
                   f"gradients per step ({fmt_bytes(_axis_bytes(dp, 'dp'))}), overlapped with backward; "
                   f"{dp['speedup']:.2f}x one process at {w} ranks.")
    zeros = [(k, _at(records, f"zero{k}", big)) for k in (1, 2, 3)]
    if dp_big and all(z for _, z in zeros):
        parts = ", ".join(f"ZeRO-{k} {fmt_bytes(_state(z))} ({_state(dp_big) / _state(z):.1f}x less)"
                          for k, z in zeros)
        sent = ", ".join(f"ZeRO-{k} {fmt_bytes(_axis_bytes(z, 'dp'))}" for k, z in zeros)
        times = [(k, _at(records, f"zero{k}", w)) for k in (1, 2, 3)]
        cost = ", ".join(f"ZeRO-{k} {z['step_time_s'] / dp['step_time_s']:.2f}x" for k, z in times if z and dp)
        out.append(f"If they do not fit, shard them with ZeRO: at {big} ranks dp holds {fmt_bytes(_state(dp_big))} "
                   f"of parameters, gradients and optimizer states per rank; {parts}. The sharding is paid in "
                   f"messages (payload per step and rank, where dp's all-reduce of n bytes counts n though on a ring "
                   f"it moves what a reduce-scatter and an all-gather of n do: dp "
                   f"{fmt_bytes(_axis_bytes(dp_big, 'dp'))}, {sent}; step "
                   f"time against dp at {w} ranks: {cost or 'n/a'}), so take the lowest stage that fits.")
    comp = [r for r in (_at(records, "dp-bf16", big), _at(records, "dp-powersgd", big)) if r]
    if dp_big and comp:
        dp_bytes = _axis_bytes(dp_big, "dp")
        parts = ", ".join(f"{r['strategy']} {fmt_bytes(_axis_bytes(r, 'dp'))} "
                          f"({dp_bytes / max(1.0, _axis_bytes(r, 'dp')):.0f}x less, loss within "
                          f"{r['loss_parity']:.0e})" for r in comp)
        out.append(f"If the network is what limits dp, compress the gradients: dp sends {fmt_bytes(dp_bytes)} a "
                   f"step; {parts}. bf16 is nearly exact; PowerSGD is approximate, so its loss curve drifts from "
                   "one process's.")
    tp, tp_w = _at(records, "tp", big), _at(records, "tp", w)
    if tp and dp_big:
        share = _share_cell(tp_w) if tp_w else "n/a"
        out.append(f"If one layer is too big, split the layers with tensor parallelism (tp): {fmt_bytes(_state(tp))} "
                   f"of state per rank at {big} ranks (dp {fmt_bytes(_state(dp_big))}) and fewer activations, but "
                   f"all-reduces inside every layer that block the step ({share} of it at {w} ranks): keep tp "
                   "within a node's fast links, and add sequence parallelism (tp-sp) to split the activations "
                   "further.")
    pps = [r for r in (_at(records, f"pp-{s}", w) for s in ("gpipe", "1f1b", "interleaved", "zb")) if r]
    if pps:
        parts = ", ".join(f"{r['strategy']} {_bubble_cell(r.get('bubble_measured'), r.get('bubble_measured_note'))} "
                          f"(simulated {_bubble_cell(r.get('bubble_predicted'), r.get('bubble_predicted_note'))})"
                          for r in pps)
        out.append(f"If the model has many layers or spans nodes, pipeline parallelism (pp) sends only activations "
                   f"between neighbouring stages, but stages wait for each other: idle share at {w} stages {parts}; "
                   "measured idleness also includes the head on the last stage and waiting for a core. Use many "
                   "more micro-batches than stages, and the interleaved or zero-bubble schedule.")
    cp = _at(records, "cp", big)
    if cp and single:
        out.append(f"If long sequences' activations do not fit, context parallelism (cp) splits each sequence: "
                   f"{fmt_bytes((cp.get('mem_split') or {}).get('activations'))} of activations per rank at {big} "
                   f"ranks against {fmt_bytes((single.get('mem_split') or {}).get('activations'))} in one process, "
                   "for a ring of key/value exchanges hidden behind attention when it is long enough.")
    ep, moe_dp = _at(records, "ep", big), _at(records, "moe-dp", big)
    ep_w, moe_w = _at(records, "ep", w), _at(records, "moe-dp", w)
    if ep and moe_dp:
        speed = (f", at {ep_w['step_time_s'] / moe_w['step_time_s']:.2f}x moe-dp's step time at {w} ranks"
                 if ep_w and moe_w else "")
        out.append(f"For a mixture of experts, spread the experts with expert parallelism (ep): "
                   f"{fmt_bytes(_state(ep))} of state per rank at {big} ranks against {fmt_bytes(_state(moe_dp))} "
                   f"when every rank keeps every expert (moe-dp){speed}.")
    step_err, mem_err = prediction_errors(records)
    if step_err:
        agree = []
        for size in sizes:
            rows = [r for r in ok if r["world_size"] == size and r.get("predicted_step_time_s")]
            if len(rows) > 1:
                best_pred = min(rows, key=lambda r: r["predicted_step_time_s"])["strategy"]
                best = min(rows, key=lambda r: r["step_time_s"])["strategy"]
                agree.append(f"{size} ranks: planner {best_pred}, measured {best}")
        med = lambda errs: f"{100 * _median([abs(e) for e in errs]):.0f}%" if errs else "n/a"  # noqa: E731
        out.append(f"For your own model and cluster, ask the planner (`meshlm plan`), which costs every layout and "
                   f"combines these. Against these rows its step time was off by a median of {med(step_err)} and "
                   f"its memory by {med(mem_err)}; its fastest layout against the measured one: "
                   f"{'; '.join(agree) or 'n/a'}.")
    return out
