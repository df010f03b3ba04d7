"""Dry run: plan any layout in one process, with no cluster and no memory (torchtitan's fake-backend mode).

    validate(layout)  ->  for each distinct rank kind (pp stage, tp index, ep index):
                          build that rank's shard on the meta device, count its parameters
                      ->  memory per rank: parameters, gradients, optimizer states under ZeRO,
                          activations (Korthikanti et al. 2022) for the schedule's in-flight micro-batches
                      ->  the pipeline schedule of rank 0 and its simulated bubble
                      ->  check: the shards, each counted once, add up to `param_count(model)["total"]`

Ranks that differ only in their dp or cp coordinate hold identical shards (dense parameters are
replicated over dp, ep and cp, experts over dp and cp), so one rank per (pp, tp, ep) coordinate is
built and the others are counted.

How a rank's shard is built without its processes. The layers take their tensor-, expert- and
context-parallel size and index from the `Mesh`, which knows them from the layout alone, so each rank
kind is built with a mesh of that rank's coordinates and no process groups. Parameters are created
on the meta device, so llama-70b at tp8 x pp8 allocates nothing; nothing is initialised (initial
values do not change shapes). The modules built are exactly those a real run builds
(`Transformer(cfg, mesh=, layers=, pre=, post=)`, one per chunk, as `PipelineStages` does), so the
counts cannot drift from the model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError, param_count
from .layout import AXES, Layout, LayoutError, validate
from .memory import korthikanti_bytes_per_layer
from .mesh import COMBINED_AXES, Mesh, rank_grid
from .parallel import schedules
from .parallel.pipeline import stage_ranges
from .parallel.zero import zero_state_bytes

GiB = 1024**3


@dataclass(frozen=True)
class RankKind:
    """One distinct shard: the ranks at pipeline stage `pp`, tensor index `tp` and expert index `ep`."""

    pp: int
    tp: int
    ep: int
    ranks: int
    """How many ranks hold this same shard (dp * cp)."""
    first_rank: int
    """The lowest global rank holding it (dp = cp = 0)."""
    layers: tuple[range, ...]
    """The blocks of each chunk this rank holds (one chunk per virtual stage)."""
    dense: int
    """Local parameters replicated over (dp, ep, cp): everything but the experts."""
    expert: int
    """Local expert parameters (replicated over dp, cp only)."""
    unique: int
    """Parameters this rank contributes to the sum of shards: each tensor slice counted once over the
    tp and ep ranks, the last stage's copy of a tied embedding not counted, vocabulary padding excluded."""
    in_flight: int
    """Most (micro-batch, chunk) pairs whose activations this rank holds at once (from the schedule)."""
    memory: dict[str, float]
    """Bytes per rank: params, grads, optim, activations, total."""

    @property
    def params(self) -> int:
        return self.dense + self.expert


@dataclass(frozen=True)
class DryRun:
    layout: Layout
    world_size: int
    vocab_size: int
    seq_len: int
    micro_batch: int
    """Sequences per micro-batch and data-parallel rank."""
    kinds: list[RankKind]
    total: int
    """param_count(model)['total']."""
    table: schedules.Table | None
    bubble: float | None

    @property
    def sum_of_shards(self) -> int:
        return sum(k.unique for k in self.kinds)


# --- building one rank's shard without its processes --------------------------------------------



def build_rank(model_cfg, layout: Layout, rank: int) -> list[torch.nn.Module]:
    """The chunks (one `Transformer` per virtual stage) that global `rank` holds, on the meta device.

    Exactly what `PipelineStages` (or `build_model` when pp = 1) builds on that rank, without the
    initial values. Needs no processes (the mesh gives every layer its axis sizes and indices).
    """
    from .model import Transformer

    ranges = stage_ranges(model_cfg, layout)
    n_stages = layout.pp * layout.vpp
    coords = dict(zip(AXES, (int(i) for i in (rank_grid(layout) == rank).nonzero()[0])))
    # the layers take each axis' size and this rank's index from the mesh: no process group is needed
    mesh = Mesh(layout=layout, rank=rank, coords=coords,
                _groups={k: None for k in [(a,) for a in AXES] + list(COMBINED_AXES)})
    chunks = []
    with torch.device("meta"):
        for c in range(layout.vpp):
            s = c * layout.pp + mesh.coords["pp"]
            chunks.append(Transformer(model_cfg, mesh=mesh, layers=ranges[s], pre=s == 0, post=s == n_stages - 1))
    return chunks


def _count(chunks: list[torch.nn.Module], *, tp: int, ep: int) -> tuple[int, int, int]:
    """(dense, expert, unique) parameters of one rank's chunks; see RankKind.unique."""
    from .parallel.expert import is_expert

    dense = expert = unique = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            n = p.numel()
            if is_expert(p):
                expert += n
            else:
                dense += n
            if name == "tok_emb" and not chunk.pre:
                continue  # the last stage's copy of a tied embedding
            shard = p.meshlm_shard
            split = {shard.axis} if shard is not None else set()
            if ("tp" not in split and tp) or ("ep" not in split and ep):
                continue  # replicated over this axis: counted on index 0 only
            padding = math.prod(p.meshlm_full_shape) - math.prod(p.meshlm_init_shape)
            if padding and (shard is None or shard.index == 0):
                n -= padding  # a vocabulary padded to a multiple of tp: the zeros are not parameters
            unique += n
    return dense, expert, unique


# --- the plan --------------------------------------------------------------------------------


def plan(cfg, *, world_size: int | None = None) -> DryRun:
    """Validate `cfg` (a RunConfig) and size every distinct rank of its layout."""
    layout, model, train = cfg.layout, cfg.model, cfg.train
    if model.vocab_size < 1:  # 0 means 'from the data': the tokenizer trained for the default corpus
        model = model.replace(vocab_size=cfg.data.vocab_size)
    seq_len = train.seq_len or model.max_seq_len
    if seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len ({seq_len}) must not exceed model.max_seq_len ({model.max_seq_len})")
    validate(layout, model, world_size if world_size is not None else layout.world_size,
             batch_size=train.batch_size, seq_len=seq_len)
    micro_batch = train.batch_size // (layout.data_world * layout.micro_batches)

    table, bubble, in_flight = None, None, [1] * layout.pp
    if layout.pp > 1:
        table = schedules.build(layout.schedule, p=layout.pp, m=layout.micro_batches, v=layout.vpp)
        timeline = schedules.simulate(table, t_f=1.0, t_b=2.0)
        bubble, in_flight = timeline.bubble, timeline.peak_in_flight

    # Korthikanti et al. count 16-bit activations; fp32 training holds twice the bytes
    act_scale = 2 if train.precision == "fp32" else 1
    per_layer = act_scale * korthikanti_bytes_per_layer(
        s=seq_len // layout.cp, b=micro_batch, h=model.d_model, a=model.n_heads, t=layout.tp,
        sequence_parallel=layout.sequence_parallel, recompute=train.recompute)
    dense_world = layout.dp * layout.ep * layout.cp  # ZeRO shards each kind over the ranks that replicate it
    expert_world = layout.dp * layout.cp
    grid, ranges = rank_grid(layout), stage_ranges(model, layout)
    kinds = []
    for pp in range(layout.pp):
        for ep in range(layout.ep):
            for tp in range(layout.tp):
                rank = int(grid[pp, 0, ep, 0, tp])
                chunks = build_rank(model, layout, rank)
                dense, expert, unique = _count(chunks, tp=tp, ep=ep)
                layers = tuple(ranges[c * layout.pp + pp] for c in range(layout.vpp))
                held = sum(len(r) for r in layers)
                d, e = zero_state_bytes(dense, dense_world, layout.zero), zero_state_bytes(expert, expert_world,
                                                                                           layout.zero)
                memory = {k: d[k] + e[k] for k in ("params", "grads", "optim")}
                memory["activations"] = per_layer * held / layout.vpp * in_flight[pp]
                memory["total"] = sum(memory.values())
                kinds.append(RankKind(pp=pp, tp=tp, ep=ep, ranks=layout.dp * layout.cp, first_rank=rank,
                                      layers=layers, dense=dense, expert=expert, unique=unique,
                                      in_flight=in_flight[pp], memory=memory))
    return DryRun(layout=layout, world_size=layout.world_size, vocab_size=model.vocab_size, seq_len=seq_len,
                  micro_batch=micro_batch, kinds=kinds, total=param_count(model)["total"], table=table,
                  bubble=bubble)


# --- the report ------------------------------------------------------------------------------


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _layers(ranges: tuple[range, ...]) -> str:
    return ",".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in ranges)


def _compact(actions: list[schedules.Action], limit: int = 64) -> str:
    """Rank 0's computations in order ('F0 F1 B0 ...', '.c' the chunk when interleaved); sends/receives left out."""
    words = [f"{a.kind}{a.mb}" + (f".{a.chunk}" if a.chunk else "") for a in actions if a.is_compute]
    return " ".join(words[:limit]) + (f" ... ({len(words)} in all)" if len(words) > limit else "")


def report(run: DryRun, cfg) -> str:
    """The dry run as text: layout, ranks, memory per rank kind, schedule, the parameter check."""
    layout, train = run.layout, cfg.train
    lines = [
        f"dry run: {cfg.preset} ({cfg.model.family}, {run.total:,} parameters, vocabulary {run.vocab_size:,})",
        f"layout: {layout.describe()}",
        f"world size: {run.world_size} ranks = " + " x ".join(f"{a} {d}" for a, d in layout.degrees.items()),
        f"batch: {train.batch_size} sequences of {run.seq_len} tokens; micro-batch {run.micro_batch} per "
        f"data-parallel rank x {layout.micro_batches}; precision {train.precision}, recompute {train.recompute}",
        f"distinct shards: {len(run.kinds)} (pp x tp x ep), each held by {layout.dp * layout.cp} ranks (dp x cp)",
        "",
        f"{'pp':>3} {'tp':>5} {'ep':>5} {'ranks':>6} {'layers':>10} {'params':>15} {'param GiB':>10} "
        f"{'grad GiB':>9} {'optim GiB':>10} {'act GiB':>8} {'total GiB':>10}",
    ]
    # rows identical but for the tp/ep index are shown once, with the index ranges
    rows: dict[tuple, list[RankKind]] = {}
    for k in run.kinds:
        rows.setdefault((k.pp, k.layers, k.params, tuple(round(v) for v in k.memory.values())), []).append(k)
    for group in rows.values():
        k = group[0]
        m = {name: v / GiB for name, v in k.memory.items()}
        lines.append(f"{k.pp:>3} {_span([g.tp for g in group]):>5} {_span([g.ep for g in group]):>5} "
                     f"{k.ranks * len(group):>6} {_layers(k.layers):>10} {k.params:>15,} {m['params']:>10.2f} "
                     f"{m['grads']:>9.2f} {m['optim']:>10.2f} {m['activations']:>8.2f} {m['total']:>10.2f}")
    peak = max(run.kinds, key=lambda k: k.memory["total"])
    lines += [
        "",
        f"memory: peak {peak.memory['total'] / GiB:.2f} GiB per rank (pp {peak.pp}, tp {peak.tp}, ep {peak.ep}): "
        f"fp32 parameters and gradients, AdamW states (8 bytes), ZeRO stage {layout.zero} over "
        f"{layout.dp * layout.ep * layout.cp} ranks (experts over {layout.dp * layout.cp}); activations by "
        f"Korthikanti et al. (blocks only, {'with' if layout.sequence_parallel else 'no'} sequence parallelism) "
        f"x in-flight micro-batches {_span([k.in_flight for k in run.kinds])}",
    ]
    if run.table is None:
        lines.append(f"schedule: none (pp 1): {layout.micro_batches} micro-batch(es) one after another "
                     "(gradient accumulation)")
    else:
        lines.append(f"schedule: {layout.schedule}" + (f" v{layout.vpp}" if layout.vpp > 1 else "")
                     + f", {layout.pp} stages, {layout.micro_batches} micro-batches; rank 0: "
                     + _compact(run.table[0]))
        lines.append(f"bubble: {run.bubble:.1%} (simulated, t_f=1, t_b=2)")
    ok = run.sum_of_shards == run.total
    lines.append(f"parameters: sum of shards = total ({'OK' if ok else 'MISMATCH'})"
                 + ("" if ok else f": {run.sum_of_shards:,} != {run.total:,}"))
    return "\n".join(lines)


def main(cfg, *, world_size: int | None = None) -> int:
    """`meshlm train --dry-run`: print the plan of `cfg` (a RunConfig); 0 when the shards add up, else 1.

    Raises ConfigError or LayoutError (one line naming the field) for bad input.
    """
    if not isinstance(cfg.layout, Layout):
        raise LayoutError(f"layout ({cfg.layout!r}) must be a Layout")
    run = plan(cfg, world_size=world_size)
    print(report(run, cfg))
    return 0 if run.sum_of_shards == run.total else 1
