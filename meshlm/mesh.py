"""The runtime mesh: this rank's coordinates and one process group per axis (and per axis combination).

The rank grid is one tensor, `arange(world).reshape(pp, dp, ep, cp, tp)` (picotron does the same);
the group of an axis is a slice of it along that axis with every other coordinate fixed, and the group
of a combination of axes ("dp", "ep", "cp") is the sub-grid over those axes. `Mesh` is built once, after
`init_process_group`, and passed explicitly to every layer and collective: there are no module-level
process-group globals.

A single-process run has a `Mesh` too (`Mesh.single()`), whose groups are all None and of size 1,
so the same code runs with and without torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .layout import AXES, DATA_AXES, DENSE_GRAD_AXES, EXPERT_GRAD_AXES, Layout

COMBINED_AXES: tuple[tuple[str, ...], ...] = (DATA_AXES, DENSE_GRAD_AXES, EXPERT_GRAD_AXES)
"""Axis combinations that get a group of their own (batch split, dense and expert gradient reduction)."""


def rank_grid(layout: Layout) -> torch.Tensor:
    """The rank of every coordinate: a tensor of shape (pp, dp, ep, cp, tp)."""
    return torch.arange(layout.world_size).reshape(*layout.degrees.values())


def axis_groups(layout: Layout, axes: tuple[str, ...]) -> list[list[int]]:
    """Every group of ranks that varies along `axes` with the other coordinates fixed (pure).

    For layout dp=2, tp=2 and axes ('tp',): [[0, 1], [2, 3]]; for ('dp',): [[0, 2], [1, 3]].
    """
    grid = rank_grid(layout)
    dims = [AXES.index(a) for a in axes]
    others = [d for d in range(len(AXES)) if d not in dims]
    moved = grid.permute(*others, *dims)
    return moved.reshape(-1, moved[(0,) * len(others)].numel()).tolist()


@dataclass
class Mesh:
    layout: Layout
    rank: int = 0
    coords: dict[str, int] = field(default_factory=dict)
    """This rank's coordinate on every axis."""
    _groups: dict[tuple[str, ...], dist.ProcessGroup | None] = field(default_factory=dict, repr=False)
    embed_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """Under pipeline parallelism: this rank's first and last pipeline stages (a tied embedding lives on both)."""

    @classmethod
    def single(cls, layout: Layout | None = None) -> "Mesh":
        layout = layout or Layout()
        if layout.world_size != 1:
            raise ValueError(f"Mesh.single needs a world of 1, layout has {layout.world_size}")
        return cls(layout=layout, rank=0, coords={a: 0 for a in AXES})

    @classmethod
    def build(cls, layout: Layout) -> "Mesh":
        """Create every group. Collective: every rank of the job must call it, with the same layout."""
        if layout.world_size == 1 and not dist.is_initialized():
            return cls.single(layout)
        rank, world = dist.get_rank(), dist.get_world_size()
        if world != layout.world_size:
            raise ValueError(f"layout world size {layout.world_size} != process group world size {world}")
        coords = dict(zip(AXES, (int(i) for i in (rank_grid(layout) == rank).nonzero()[0])))
        groups: dict[tuple[str, ...], dist.ProcessGroup | None] = {}
        for axes in [(a,) for a in AXES] + list(COMBINED_AXES):
            if axes in groups:
                continue
            size = 1
            for a in axes:
                size *= layout.degrees[a]
            if size == 1:
                groups[axes] = None
                continue
            if size == world:
                groups[axes] = dist.group.WORLD
                continue
            # new_group is collective over the whole job: every rank creates every group, in the same order.
            for ranks in axis_groups(layout, axes):
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[axes] = group
        embed = None
        if layout.pp > 1:  # first and last stage of each pipeline share the tied embedding
            for ranks in axis_groups(layout, ("pp",)):
                group = dist.new_group([ranks[0], ranks[-1]])
                if rank in (ranks[0], ranks[-1]):
                    embed = group
        return cls(layout=layout, rank=rank, coords=coords, _groups=groups, embed_group=embed)

    # --- lookups -----------------------------------------------------------------------------------

    @staticmethod
    def _key(axes: str | tuple[str, ...]) -> tuple[str, ...]:
        key = (axes,) if isinstance(axes, str) else tuple(axes)
        for a in key:
            if a not in AXES:
                raise KeyError(f"unknown mesh axis {a!r}; axes are {AXES}")
        return key

    def group(self, axes: str | tuple[str, ...]) -> dist.ProcessGroup | None:
        """Process group of an axis or a combination in COMBINED_AXES; None when its size is 1."""
        key = self._key(axes)
        if not self._groups and self.layout.world_size == 1:
            return None
        try:
            return self._groups[key]
        except KeyError:
            raise KeyError(f"no group for axes {key}; built: {list(self._groups)}") from None

    def size(self, axes: str | tuple[str, ...]) -> int:
        n = 1
        for a in self._key(axes):
            n *= self.layout.degrees[a]
        return n

    def index(self, axes: str | tuple[str, ...]) -> int:
        """This rank's index inside the group of `axes` (row-major over the axes, in AXES order)."""
        key = tuple(a for a in AXES if a in self._key(axes))
        i = 0
        for a in key:
            i = i * self.layout.degrees[a] + self.coords[a]
        return i

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def data_rank(self) -> int:
        """Which batch shard this rank reads (0 .. dp*ep - 1)."""
        return self.index(DATA_AXES)

    @property
    def is_first_stage(self) -> bool:
        return self.coords["pp"] == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords["pp"] == self.layout.pp - 1

    def describe(self) -> str:
        return " ".join(f"{a}{self.coords[a]}" for a in AXES if self.layout.degrees[a] > 1) or "single"

