"""The parallel layout: how many ways each parallelism splits the work, and the rules it must obey.

A `Layout` is a frozen dataclass of degrees. Ranks are arranged in one named axis order, `AXES`,
slowest to fastest: tensor parallelism is fastest so a tp group stays inside a node, pipeline
parallelism slowest so its point-to-point traffic is the part that crosses nodes.

    world = pp * dp * ep * cp * tp

The expert axis lies inside the data-parallel replicas: dense parameters are replicated over
(dp, ep, cp) and their gradients are reduced over all three; expert parameters are replicated over
(dp, cp) only. The batch is split over (dp, ep); cp splits each sequence.

`validate` is a pure function: it needs no processes, so every rule is tested in one process and a
bad layout is refused before anything is launched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import ModelConfig

AXES: tuple[str, ...] = ("pp", "dp", "ep", "cp", "tp")
"""Axis order of the rank grid, slowest to fastest: ranks = arange(world).reshape(pp, dp, ep, cp, tp)."""

DATA_AXES: tuple[str, ...] = ("dp", "ep")
"""Axes over which the batch is split (each (dp, ep) coordinate sees different sequences)."""

DENSE_GRAD_AXES: tuple[str, ...] = ("dp", "ep", "cp")
"""Axes over which dense (non-expert) parameters are replicated, so their gradients are summed."""

EXPERT_GRAD_AXES: tuple[str, ...] = ("dp", "cp")
"""Axes over which an expert's parameters are replicated."""


class LayoutError(ValueError):
    """A layout breaks a rule; the message names the field, its value and the constraint."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    dp: int = 1
    """Data-parallel degree. 1 means disabled."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-style column/row split). 1 means disabled."""
    pp: int = 1
    """Pipeline-parallel degree (number of stages). 1 means disabled."""
    ep: int = 1
    """Expert-parallel degree (mixture-of-experts models only). 1 means disabled."""
    cp: int = 1
    """Context-parallel degree (sequence split over ranks, ring attention). 1 means disabled."""
    zero: int = 0
    """ZeRO stage over the data-parallel ranks: 0 off, 1 optimizer states, 2 +gradients, 3 +parameters."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B). 1 means not interleaved."""
    sequence_parallel: bool = False
    """Sequence parallelism (Korthikanti et al. 2022) in the tensor-parallel regions; needs tp > 1."""
    micro_batches: int = 1
    """Micro-batches per step and data-parallel rank (gradient accumulation, and the pipeline's micro-batches)."""
    schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved, zb (zero-bubble ZB-H1)."""
    pp_balance: str = "layers"
    """How blocks are cut into pipeline stages: 'layers' (equal counts), 'params' or 'flops' (balancing the
    cost estimate, the embedding counted on the first stage and the head on the last)."""
    pp_split: str = ""
    """Explicit blocks per stage, e.g. '3,5' (pp*vpp counts summing to n_layers); overrides pp_balance."""

    @property
    def degrees(self) -> dict[str, int]:
        """Degree of every axis, in AXES order."""
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def world_size(self) -> int:
        return math.prod(self.degrees.values())

    @property
    def data_world(self) -> int:
        """Number of distinct batch shards (dp * ep)."""
        return self.dp * self.ep

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Short human form, e.g. 'dp2 x tp2 (zero 1)'."""
        parts = [f"{a}{d}" for a, d in self.degrees.items() if d > 1] or ["single process"]
        extras = []
        if self.zero:
            extras.append(f"zero {self.zero}")
        if self.sequence_parallel:
            extras.append("sp")
        if self.pp > 1:
            extras.append(self.schedule + (f" v{self.vpp}" if self.vpp > 1 else ""))
        if self.micro_batches > 1:
            extras.append(f"{self.micro_batches} micro-batches")
        return " x ".join(parts) + (f" ({', '.join(extras)})" if extras else "")


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")
PP_BALANCE = ("layers", "params", "flops")


def validate(layout: Layout, model: ModelConfig, world_size: int | None = None, *,
             batch_size: int | None = None, seq_len: int | None = None) -> None:
    """Check every rule that a layout must obey for this model; raise LayoutError on the first broken one.

    Pure: no processes, no tensors. `world_size`, `batch_size` (global, in sequences) and `seq_len`
    are checked when given.
    """
    for field in ("dp", "tp", "pp", "ep", "cp", "vpp", "micro_batches"):
        value = getattr(layout, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"{field} ({value!r}) must be a positive integer")
    if layout.zero not in (0, 1, 2, 3):
        raise LayoutError(f"zero ({layout.zero!r}) must be 0, 1, 2 or 3")
    if layout.schedule not in SCHEDULES:
        raise LayoutError(f"schedule ({layout.schedule!r}) must be one of {', '.join(SCHEDULES)}")

    if world_size is not None and layout.world_size != world_size:
        raise LayoutError(
            f"product of degrees pp*dp*ep*cp*tp ({layout.world_size}) must equal the world size ({world_size})"
        )

    tp = layout.tp
    if model.n_heads % tp:
        raise LayoutError(f"tp ({tp}) must divide n_heads ({model.n_heads})")
    kv = model.kv_heads
    if kv % tp and tp % kv:
        raise LayoutError(f"tp ({tp}) must divide n_kv_heads ({kv}) or be a multiple of it")
    if model.d_ff % tp:
        raise LayoutError(f"tp ({tp}) must divide d_ff ({model.d_ff})")
    if layout.sequence_parallel and tp == 1:
        raise LayoutError("sequence_parallel (True) needs tp > 1 (tp is 1)")

    if layout.pp * layout.vpp > model.n_layers:
        raise LayoutError(
            f"pp*vpp ({layout.pp * layout.vpp}) must not exceed n_layers ({model.n_layers})"
        )
    if layout.vpp > 1 and layout.pp == 1:
        raise LayoutError(f"vpp ({layout.vpp}) needs pp > 1 (pp is 1)")
    if layout.vpp > 1 and layout.schedule != "interleaved":
        raise LayoutError(f"vpp ({layout.vpp}) needs schedule 'interleaved' (schedule is {layout.schedule!r})")
    if layout.pp > 1 and layout.schedule != "gpipe" and layout.micro_batches < layout.pp:
        raise LayoutError(
            f"micro_batches ({layout.micro_batches}) must be >= pp ({layout.pp}) for the {layout.schedule} schedule"
        )
    if layout.vpp > 1 and model.n_layers % (layout.pp * layout.vpp):
        raise LayoutError(
            f"vpp ({layout.vpp}) must divide the layers per stage (n_layers {model.n_layers} / pp {layout.pp})"
        )
    if layout.schedule == "interleaved" and layout.pp > 1 and layout.micro_batches % layout.pp:
        raise LayoutError(
            f"micro_batches ({layout.micro_batches}) must be a multiple of pp ({layout.pp}) "
            "for the interleaved schedule"
        )

    if layout.pp_balance not in PP_BALANCE:
        raise LayoutError(f"pp_balance ({layout.pp_balance!r}) must be one of {', '.join(PP_BALANCE)}")
    if layout.pp_split:
        n_stages = layout.pp * layout.vpp
        try:
            counts = [int(c) for c in layout.pp_split.split(",")]
        except ValueError:
            counts = []
        if len(counts) != n_stages or min(counts) < 1 or sum(counts) != model.n_layers:
            raise LayoutError(f"pp_split ({layout.pp_split!r}) must give pp*vpp ({n_stages}) positive block "
                              f"counts summing to n_layers ({model.n_layers})")

    if layout.ep > 1 and model.n_experts == 0:
        raise LayoutError(f"ep ({layout.ep}) needs a mixture-of-experts model (n_experts is 0)")
    if model.n_experts and model.n_experts % layout.ep:
        raise LayoutError(f"ep ({layout.ep}) must divide n_experts ({model.n_experts})")

    if seq_len is not None:
        if layout.sequence_parallel and seq_len % tp:
            raise LayoutError(f"tp ({tp}) must divide seq_len ({seq_len}) under sequence parallelism")
        if layout.cp > 1:
            chunks = 2 * layout.cp if model.causal else layout.cp
            if seq_len % chunks:
                raise LayoutError(
                    f"seq_len ({seq_len}) must be divisible by {chunks} "
                    f"({'2*cp for the load-balanced causal split' if model.causal else 'cp'})"
                )
            if layout.sequence_parallel and seq_len % (layout.cp * tp):
                raise LayoutError(f"seq_len ({seq_len}) must be divisible by cp*tp ({layout.cp * tp}) under "
                                  "context and sequence parallelism")
    if layout.cp > 1 and model.dropout > 0:
        raise LayoutError(f"cp ({layout.cp}) needs model.dropout 0 (ring attention has no attention dropout; "
                          f"model.dropout is {model.dropout})")

    if batch_size is not None:
        split = layout.data_world * layout.micro_batches
        if batch_size % split:
            raise LayoutError(
                f"batch_size ({batch_size}) must be divisible by dp*ep*micro_batches ({split})"
            )


NOT_IMPLEMENTED: dict[str, str] = {}


def require_implemented(layout: Layout) -> None:
    """Refuse, with a clear line, the degrees whose parallelism has not landed yet."""
    for field, what in NOT_IMPLEMENTED.items():
        value = getattr(layout, field)
        if value != 1:
            raise LayoutError(f"{field} ({value}) is not implemented yet: {what} has not landed; use {field} 1")
