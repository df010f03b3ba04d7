"""The bench's outputs: one table (console and report.md) and a bar chart of step times (when matplotlib is there).

Every figure comes from the records in results.json; nothing here measures anything.
"""

from __future__ import annotations

from pathlib import Path

from ..train.metrics import fmt_count
from .strategies import PEER_OF, STRATEGIES

FRAMEWORK_PEER_OF = {**{f"zero{k}": f"deepspeed-zero{k}" for k in (1, 2, 3)},
                     "tp": "megatron-tp", "dp": "megatron-ddp"}
"""Our rows that also get a ratio to the framework users run instead (DeepSpeed, Megatron-core), when it ran."""
"""Our ZeRO stages are also compared with DeepSpeed's (in the 'vs PyTorch peer' cell), when both ran."""

COLUMNS = ["strategy", "ranks", "step time", "tokens/s", "peak mem/rank", "state/rank", "comm/step", "final loss",
           "max |loss - single|", "pred step", "pred mem", "vs PyTorch peer", "vs single"]


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _ok(r: dict | None) -> bool:
    return r is not None and not r.get("error")


def ratio(a: dict | None, b: dict | None) -> float | None:
    """Step time of a over that of b, when both ran."""
    if not (_ok(a) and _ok(b)):
        return None
    return a["step_time_s"] / b["step_time_s"]


def max_loss_diff(r: dict, single: dict | None) -> float | None:
    if not (_ok(r) and _ok(single)) or len(r["losses"]) != len(single["losses"]):
        return None
    return max(abs(a - b) for a, b in zip(r["losses"], single["losses"]))


def measured_mem(r: dict) -> float | None:
    """What the memory prediction is compared with: peak minus the baseline before the model was built."""
    if r.get("peak_mem_bytes") is None:
        return None
    return r["peak_mem_bytes"] - (r.get("base_mem_bytes") or 0)


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


def _pred_cells(r: dict) -> list[str]:
    step, mem, m = r.get("predicted_step_time_s"), r.get("predicted_mem_bytes"), measured_mem(r)
    a = "-" if not step else f"{1e3 * step:.1f} ms ({step / r['step_time_s']:.2f}x)"
    b = "-" if not mem else fmt_bytes(mem) + (f" ({mem / m:.2f}x)" if m and m > 0 else "")
    return [a, b]


def rows(records: list[dict], *, comm_detail: bool) -> list[list[str]]:
    """One row of cells per record, in COLUMNS order."""
    by_name = {r["strategy"]: r for r in records}
    out = []
    for r in records:
        name = r["strategy"]
        single = by_name.get(STRATEGIES[name].baseline if name in STRATEGIES else "single")
        if not _ok(r):
            out.append([name, str(r.get("world_size", "-")), "failed"] + ["-"] * (len(COLUMNS) - 3))
            continue
        comm = {k: v for k, v in r["comm_bytes_per_step"].items() if v}
        total = fmt_bytes(sum(comm.values()))
        if comm_detail and comm:
            total += " (" + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in comm.items()) + ")"
        peers = (PEER_OF.get(name), FRAMEWORK_PEER_OF.get(name))
        vs_peers = ", ".join(f"{ratio(r, by_name[p]):.2f}x {p}" for p in peers if p and _ok(by_name.get(p)))
        vs_single = ratio(r, single)
        diff = max_loss_diff(r, single)
        out.append([name, str(r["world_size"]), f"{1e3 * r['step_time_s']:.1f} ms", fmt_count(r["tokens_per_s"]),
                    fmt_bytes(r["peak_mem_bytes"]), fmt_bytes(r["state_bytes_per_rank"]), total,
                    f"{r['losses'][-1]:.4f}", "-" if diff is None else f"{diff:.1e}", *_pred_cells(r),
                    vs_peers or "-",
                    "-" if vs_single is None else f"{vs_single:.2f}x"])
    return out


def console_table(records: list[dict]) -> str:
    table = [COLUMNS] + rows(records, comm_detail=False)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in records:
        if r.get("error"):
            lines.append(f"{r['strategy']} failed: {r['error']}")
    lines.append(error_line(records))
    return "\n".join(lines)


def markdown(records: list[dict], *, command: str, context: str, plot_note: str = "") -> str:
    """report.md: the command, the table, what each column means, errors and notes."""
    lines = ["# meshlm bench", "", "```", command, "```", "", context, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows(records, comm_detail=True)]
    lines += ["", "- **step time**: median over the steps after warm-up of the slowest rank's time per step; "
              "**tokens/s**: global tokens per step / step time.",
              "- **peak mem/rank**: the largest peak over the ranks (CPU: peak resident set, which includes the "
              "Python/torch baseline" + _baseline(records) + "; CUDA: the allocator's peak).",
              "- **state/rank**: bytes of parameters + gradients + optimizer states that rank 0 holds, counted "
              "from the tensors inside its last optimizer step.",
              "- **comm/step**: payload bytes per step and rank by collective/axis, the largest over the ranks "
              "(an all-reduce of n bytes counts n; a parameter server's ranks send different things).",
              "- **max |loss - single|**: the largest difference from the single-process loss over all steps "
              "(warm-up included); every strategy runs the same model, seed, data and global batch.",
              "- **vs PyTorch peer**: step time ours / the peer's (" +
              ", ".join(f"{a} vs {b}" for a, b in PEER_OF.items()) + "; and " +
              ", ".join(f"{a} vs {b}" for a, b in FRAMEWORK_PEER_OF.items()) +
              " when that peer ran); below 1 means ours is faster. "
              "**vs single**: step time / the single process's (for the MoE rows, moe-single's).",
              "- **pred step**, **pred mem**: the planner's calibrated cpu model (`meshlm plan --calibrate`, "
              "meshlm/plan/cost.py) for the row's layout (a peer: the equivalent one: dp=W with its ZeRO stage, "
              "tp=W, pp=W), with predicted / measured; memory is compared with peak mem/rank minus the "
              "baseline before the model was built.",
              "- " + error_line(records) + "."]
    failed = [r for r in records if r.get("error")]
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{r['strategy']}`: {r['error']}" for r in failed]
    notes = [r for r in records if _ok(r) and r.get("note")]
    if notes or plot_note:
        lines += ["", "## Notes", ""] + [f"- `{r['strategy']}`: {r['note']}" for r in notes]
        if plot_note:
            lines.append(f"- {plot_note}")
    return "\n".join(lines) + "\n"


def _baseline(records: list[dict]) -> str:
    base = [r["base_mem_bytes"] for r in records if _ok(r) and r.get("base_mem_bytes")]
    return f", {fmt_bytes(min(base))} to {fmt_bytes(max(base))} before the model was built" if base else ""


def plot_step_times(records: list[dict], path: Path) -> str | None:
    """Horizontal bars of step time per strategy, PyTorch peers hatched; None, or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no step_time.png (pip install matplotlib for the chart)"
    done = [r for r in records if _ok(r)]
    if not done:
        return "no strategy finished; no step_time.png"
    names = [r["strategy"] for r in done]
    times = [1e3 * r["step_time_s"] for r in done]
    peer = [STRATEGIES[n].is_peer for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(done) + 1.2))
    bars = ax.barh(range(len(done)), times, color=["tab:orange" if p else "tab:blue" for p in peer],
                   hatch=None, edgecolor="black")
    for bar, p in zip(bars, peer):
        if p:
            bar.set_hatch("//")
    ax.set_yticks(range(len(done)), names)
    ax.invert_yaxis()
    ax.set_xlabel("step time (ms, median after warm-up)")
    ax.bar_label(bars, labels=[f"{t:.1f}" for t in times], padding=3)
    ax.set_xlim(0, 1.15 * max(times))  # room for the labels
    ax.set_title("meshlm (solid) and PyTorch peers (hatched)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
