"""The bench's PNGs, drawn from the records of results.json (after `report.enrich`); matplotlib only here.

    throughput.png   tokens/s per strategy, a bar per world size (PyTorch peers hatched)
    memory.png       per row: parameters, gradients, optimizer states, activations stacked (the largest rank)
    comm_share.png   per row: the share of the step blocked in communication, stacked by axis
    scaling.png      tokens/s against ranks, one panel per family, with the linear ideal from one process
    loss.png         every loss curve over the baseline's, and the relative distance from it per step
    timelines/       the measured last-step timeline of every pipeline row (schedules.draw)
    step_time.png    step time per row (the bench's first chart)

`plot_all` returns {title: path relative to the output folder} and a note when something could not be
drawn (matplotlib missing, nothing ran).
"""

from __future__ import annotations

from pathlib import Path

from .measure import MEMORY_KINDS
from .report import _ok, enrich
from .strategies import FAMILIES, STRATEGIES

_WORLD_COLOURS = {1: "tab:gray", 2: "tab:blue", 4: "tab:green", 8: "tab:red", 16: "tab:purple"}
_KIND_COLOURS = {"params": "tab:blue", "grads": "tab:orange", "optim": "tab:green", "activations": "tab:red"}
_AXIS_COLOURS = {"dp": "tab:blue", "dp_experts": "tab:cyan", "tp": "tab:orange", "cp": "tab:green",
                 "ep": "tab:purple", "pp": "tab:red", "embed": "tab:pink", "data": "tab:gray"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _is_peer(name: str) -> bool:
    return name in STRATEGIES and STRATEGIES[name].is_peer


def _label(r: dict) -> str:
    return f"{r['strategy']} ({r['world_size']})"


def plot_step_times(records: list[dict], path: Path) -> str | None:
    """Horizontal bars of step time per row, PyTorch peers hatched; None, or why there is no plot."""
    try:
        plt = _pyplot()
    except ImportError:
        return "matplotlib is not installed; no step_time.png (pip install matplotlib for the chart)"
    done = [r for r in records if _ok(r)]
    if not done:
        return "no strategy finished; no step_time.png"
    times = [1e3 * r["step_time_s"] for r in done]
    peer = [_is_peer(r["strategy"]) for r in done]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(done) + 1.2))
    bars = ax.barh(range(len(done)), times, color=["tab:orange" if p else "tab:blue" for p in peer],
                   edgecolor="black")
    for bar, p in zip(bars, peer):
        if p:
            bar.set_hatch("//")
    ax.set_yticks(range(len(done)), [_label(r) for r in done], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("step time (ms, median after warm-up)")
    ax.bar_label(bars, labels=[f"{t:.1f}" for t in times], padding=3, fontsize=6)
    ax.set_xlim(0, 1.15 * max(times))  # room for the labels
    ax.set_title("meshlm (solid) and PyTorch peers (hatched); (ranks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_throughput(records: list[dict], path: Path) -> None:
    """tokens/s per strategy: one bar per world size it ran at."""
    plt = _pyplot()
    done = [r for r in records if _ok(r)]
    names = list(dict.fromkeys(r["strategy"] for r in done))
    sizes = sorted({r["world_size"] for r in done})
    by = {(r["strategy"], r["world_size"]): r for r in done}
    height = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(names) * max(2, len(sizes)) + 1.5))
    for j, w in enumerate(sizes):
        ys = [i + (j - (len(sizes) - 1) / 2) * height for i, n in enumerate(names) if (n, w) in by]
        rows = [by[(n, w)] for n in names if (n, w) in by]
        bars = ax.barh(ys, [r["tokens_per_s"] for r in rows], height=height, label=f"{w} rank{'s' * (w > 1)}",
                       color=_WORLD_COLOURS.get(w, "tab:brown"), edgecolor="black", linewidth=0.4)
        for bar, r in zip(bars, rows):
            if _is_peer(r["strategy"]):
                bar.set_hatch("//")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (global batch / median step time)")
    ax.set_title("Throughput per strategy (PyTorch peers hatched)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row_panels(plt, done: list[dict], width: float = 8):
    """One panel per world size, rows of that size; heights by row count."""
    sizes = sorted({r["world_size"] for r in done})
    groups = [[r for r in done if r["world_size"] == w] for w in sizes]
    fig, axes = plt.subplots(len(sizes), 1, figsize=(width, 0.2 * len(done) + 0.9 * len(sizes) + 0.6),
                             gridspec_kw={"height_ratios": [len(g) + 1.5 for g in groups]}, squeeze=False)
    return fig, [a[0] for a in axes], sizes, groups


def plot_memory(records: list[dict], path: Path) -> None:
    """Per row, the largest rank's parameters, gradients, optimizer states and activations, stacked (MB);
    the text after each bar is the peak resident set above the baseline."""
    plt = _pyplot()
    done = [r for r in records if _ok(r) and r.get("mem_split")]
    fig, axes, sizes, groups = _row_panels(plt, done)
    top = max(sum(r["mem_split"].values()) for r in done) / 1e6
    for ax, w, rows in zip(axes, sizes, groups):
        left = [0.0] * len(rows)
        for kind in MEMORY_KINDS:
            vals = [r["mem_split"].get(kind, 0) / 1e6 for r in rows]
            ax.barh(range(len(rows)), vals, left=left, color=_KIND_COLOURS[kind], edgecolor="black", linewidth=0.3,
                    label={"optim": "optimizer states"}.get(kind, kind))
            left = [a + b for a, b in zip(left, vals)]
        for i, (r, x) in enumerate(zip(rows, left)):
            ax.text(x + 0.01 * top, i, f"peak-base {r['mem_above_base_bytes'] / 1e6:.0f} MB", va="center", fontsize=6)
        ax.set_yticks(range(len(rows)), [r["strategy"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.35)
        ax.set_title(f"{w} rank{'s' * (w > 1)}", fontsize=8, loc="left")
    axes[0].legend(fontsize=7, ncols=4, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    axes[-1].set_xlabel("MB per rank (the rank holding the most)")
    fig.suptitle("Memory per rank: training state and activations", fontsize=10, x=0.02, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comm_share(records: list[dict], path: Path) -> None:
    """Per row, the share of the step blocked in communication, stacked by axis; rows whose collectives are
    not timed (peers) say so."""
    plt = _pyplot()
    done = [r for r in records if _ok(r) and r["world_size"] > 1]
    fig, axes, sizes, groups = _row_panels(plt, done)
    seen: set[str] = set()
    for ax, w, rows in zip(axes, sizes, groups):
        for i, r in enumerate(rows):
            if r["comm_share"] is None:
                ax.text(0.002, i, "not timed" + (" (peer)" if _is_peer(r["strategy"]) else ""), va="center",
                        fontsize=6, color="dimgray")
                continue
            left = 0.0
            for axis, v in r["comm_axes"].items():
                share = (v["seconds"] or 0.0) / r["step_time_s"]
                ax.barh(i, 100 * share, left=100 * left, color=_AXIS_COLOURS.get(axis, "tab:brown"),
                        edgecolor="black", linewidth=0.3, label=None if axis in seen else axis)
                seen.add(axis)
                left += share
            ax.text(100 * left + 0.5, i, f"{100 * left:.0f}%", va="center", fontsize=6)
        ax.set_yticks(range(len(rows)), [r["strategy"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 110)
        ax.set_title(f"{w} ranks", fontsize=8, loc="left")
    fig.legend(fontsize=7, ncols=8, loc="upper right", frameon=False)
    axes[-1].set_xlabel("% of the step blocked in communication (per axis; pp includes waiting for a stage)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(records: list[dict], path: Path, *, cores: int | None = None) -> None:
    """tokens/s against ranks, one panel per family; each line starts at its one-process baseline; dashed: the
    linear ideal from it; dotted: one process (on a machine with fewer cores than ranks, the ceiling)."""
    plt = _pyplot()
    done = [r for r in records if _ok(r)]
    base = {r["strategy"]: r for r in done if r["world_size"] == 1}
    fams = [f for f in FAMILIES if f != "single"
            and any(STRATEGIES.get(r["strategy"]) and STRATEGIES[r["strategy"]].family == f for r in done)]
    if not fams:
        fams = ["data"]
    cols = min(3, len(fams))
    nrows = -(-len(fams) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    sizes = sorted({r["world_size"] for r in done} | {1})
    for ax, fam in zip([a for row in axes for a in row], fams):
        names = list(dict.fromkeys(r["strategy"] for r in done
                                   if STRATEGIES.get(r["strategy"]) and STRATEGIES[r["strategy"]].family == fam))
        baselines = {STRATEGIES[n].baseline for n in names}
        for b in baselines & set(base):
            x = [w for w in sizes]
            ax.plot(x, [base[b]["tokens_per_s"] * w for w in x], "k--", linewidth=0.8,
                    label=f"ideal (linear from {b})")
            ax.axhline(base[b]["tokens_per_s"], color="k", linestyle=":", linewidth=0.8, label=f"{b} (1 process)")
        for n in names:
            pts = sorted((r["world_size"], r["tokens_per_s"]) for r in done if r["strategy"] == n)
            b = base.get(STRATEGIES[n].baseline)
            if b is not None and STRATEGIES[n].world == 0:
                pts = [(1, b["tokens_per_s"])] + pts
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if STRATEGIES[n].world == 0 else "s",
                    linestyle="--" if _is_peer(n) else "-" if STRATEGIES[n].world == 0 else "none",
                    markersize=4, linewidth=1, label=n)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("ranks")
        ax.set_ylabel("tokens/s")
        ax.set_title(fam, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5.5, loc="lower left")
    for ax in [a for row in axes for a in row][len(fams):]:
        ax.axis("off")
    fig.suptitle("Scaling: tokens/s against ranks (peers dashed)"
                 + (f"; this machine has {cores} cores" if cores else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(records: list[dict], path: Path) -> None:
    """Left: every row's loss curve, the baselines bold. Right: |loss - baseline| / baseline per step (log)."""
    plt = _pyplot()
    done = [r for r in records if _ok(r)]
    by_name = {r["strategy"]: r for r in done if r["world_size"] == 1}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in done:
        is_base = r["strategy"] == STRATEGIES.get(r["strategy"], STRATEGIES["single"]).baseline
        a.plot(range(len(r["losses"])), r["losses"], linewidth=2.2 if is_base else 0.6,
               color="black" if is_base else None, alpha=1.0 if is_base else 0.5,
               label=r["strategy"] if is_base else None, zorder=3 if is_base else 2)
        base = by_name.get(r.get("baseline") or "")
        if base is not None and not is_base and len(base["losses"]) == len(r["losses"]):
            diff = [max(abs(x - y) / abs(y), 1e-9) for x, y in zip(r["losses"], base["losses"])]
            b.plot(range(len(diff)), diff, linewidth=0.8, alpha=0.7,
                   label=_label(r) if r["loss_parity"] and r["loss_parity"] > 1e-4 else None)
    steps = max(len(r["losses"]) for r in done)
    for ax in (a, b):
        ax.set_xticks(range(steps))
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title(f"{len(done)} loss curves (baselines bold)", fontsize=9)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("|loss - baseline| / baseline (floor 1e-9)")
    b.set_title("distance from the one-process curve (rows above 1e-4 named)", fontsize=9)
    if b.get_legend_handles_labels()[0]:
        b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timelines(records: list[dict], folder: Path) -> list[Path]:
    """The measured last-step timeline of every pipeline row (its stages; seconds from each stage's step start)."""
    from ..parallel.schedules import Timeline, draw

    out = []
    for r in records:
        if not _ok(r) or not r.get("timeline"):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tl = Timeline.from_records(r["timeline"])
        path = folder / f"{r['strategy']}-{r['world_size']}.png"
        pred = r.get("bubble_predicted")
        draw(tl, path, title=f"{r['strategy']}, {r['world_size']} ranks, measured"
             + (f" (simulated bubble {pred:.1%})" if pred is not None else ""))
        out.append(path)
    return out


def plot_all(records: list[dict], out: Path, *, cores: int | None = None) -> tuple[dict[str, str], str]:
    """Every chart into `out`; ({title: path relative to out}, a note when some could not be drawn)."""
    note = plot_step_times(records, out / "step_time.png")
    if note:
        return {}, note
    enrich(records)
    plots = {}
    for title, name, fn in (("Throughput per strategy", "throughput.png", plot_throughput),
                            ("Scaling", "scaling.png", lambda rs, p: plot_scaling(rs, p, cores=cores)),
                            ("Memory per rank", "memory.png", plot_memory),
                            ("Communication share of the step", "comm_share.png", plot_comm_share),
                            ("Loss curves", "loss.png", plot_losses)):
        if name == "comm_share.png" and not any(_ok(r) and r["world_size"] > 1 for r in records):
            continue
        if name == "memory.png" and not any(_ok(r) and r.get("mem_split") for r in records):
            continue
        fn(records, out / name)
        plots[title] = name
    plots["Step time"] = "step_time.png"
    for path in plot_timelines(records, out / "timelines"):
        plots[f"Pipeline timeline: {path.stem}"] = f"timelines/{path.name}"
    return plots, ""
