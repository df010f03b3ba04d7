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

import functools
import math
from collections import Counter
from collections.abc import Sequence
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
    return group_tensor(layout, axes).tolist()


def group_tensor(layout: Layout, axes: tuple[str, ...]) -> torch.Tensor:
    """`axis_groups` as a tensor of shape (groups, group size)."""
    grid = rank_grid(layout)
    dims = [AXES.index(a) for a in axes]
    others = [d for d in range(len(AXES)) if d not in dims]
    moved = grid.permute(*others, *dims)
    return moved.reshape(-1, moved[(0,) * len(others)].numel())


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



# --- placement on nodes ----------------------------------------------------------------------------
#
# torchrun numbers the ranks of a node contiguously (node n holds ranks n*L .. n*L+L-1, L its local world
# size), so with tp fastest in the grid a tp group lies inside a node whenever tp divides L; then cp, ep,
# dp and pp in turn, as far as the node's ranks go. The planner (meshlm/plan/cost.py) costs each axis
# on the intra- or inter-node link by the same function.

NODE_LOCAL_AXES: tuple[str, ...] = ("tp", "cp", "ep")
"""Axes whose traffic comes every layer and is not overlapped: they belong inside a node. dp (once a step,
overlapped with the backward) and pp (one activation per stage boundary, point to point) may cross nodes."""

WHY_NODE_LOCAL: dict[str, str] = {
    "tp": "tensor parallelism all-reduces the activations of every layer in forward and backward, on the "
          "critical path",
    "sp": "tensor and sequence parallelism all-gather and reduce-scatter the activations of every layer in "
          "forward and backward, on the critical path",
    "cp": "ring attention passes every layer's keys and values around the cp ring in forward and backward",
    "ep": "every MoE layer does two all-to-alls (dispatch, combine) in forward and two in backward",
}


@functools.lru_cache(maxsize=8192)
def _nodes_spanned(degrees: tuple[int, ...], axes: tuple[str, ...], gpus_per_node: int) -> int:
    groups = group_tensor(Layout(**dict(zip(AXES, degrees))), axes)  # (groups, size)
    return _distinct_per_row(groups // gpus_per_node)


def _distinct_per_row(nodes: torch.Tensor) -> int:
    """The largest number of distinct values in a row of a (groups, size) tensor."""
    nodes = nodes.sort(dim=1).values
    return int((1 + (nodes[:, 1:] != nodes[:, :-1]).sum(dim=1)).max())


def axis_nodes(layout: Layout, axes: str | tuple[str, ...], *, gpus_per_node: int | None = None,
               node_of: Sequence[int] | None = None) -> int:
    """The most nodes that one group of `axes` spans: 1 when every group lies inside a node (pure).

    Nodes are either `gpus_per_node` consecutive ranks each (torchrun's numbering) or given per rank
    (`node_of[rank]`, as gathered from a running job).
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if node_of is None:
        if not gpus_per_node or gpus_per_node < 1:
            raise ValueError(f"gpus_per_node ({gpus_per_node!r}) must be a positive integer")
        return _nodes_spanned(tuple(layout.degrees.values()), axes, gpus_per_node)
    if len(node_of) != layout.world_size:
        raise ValueError(f"node_of has {len(node_of)} ranks, the layout {layout.world_size}")
    return _distinct_per_row(torch.tensor(list(node_of))[group_tensor(layout, axes)])


@dataclass(frozen=True)
class Placement:
    """Which node each rank of a layout is on, and which axes stay inside a node (pure: no processes).

    `Placement.contiguous(layout, gpus_per_node)` is torchrun's numbering; a running job builds it from
    the node each rank reports (`node_of`), with the nodes' host names for the table.
    """

    layout: Layout
    node_of: tuple[int, ...]
    """Node index of every rank."""
    hosts: tuple[str, ...] = ()
    """Host name of every node (optional, for the table)."""

    @classmethod
    def contiguous(cls, layout: Layout, gpus_per_node: int) -> "Placement":
        if gpus_per_node < 1:
            raise ValueError(f"gpus_per_node ({gpus_per_node}) must be a positive integer")
        return cls(layout, tuple(r // gpus_per_node for r in range(layout.world_size)))

    @functools.cached_property
    def n_nodes(self) -> int:
        return len(set(self.node_of))

    @functools.cached_property
    def per_node(self) -> int:
        """Ranks on the fullest node."""
        return max(Counter(self.node_of).values())

    def ranks_of(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == node]

    @functools.cached_property
    def _spans(self) -> dict[str, int]:
        return {a: axis_nodes(self.layout, a, node_of=self.node_of) for a in AXES if self.layout.degrees[a] > 1}

    def spans(self) -> dict[str, int]:
        """Nodes spanned by one group of each axis of degree > 1, in AXES order."""
        return dict(self._spans)

    def inside(self) -> list[str]:
        """Axes (degree > 1) whose every group lies inside one node, fastest first."""
        return [a for a, n in reversed(self.spans().items()) if n == 1]

    def across(self) -> list[str]:
        """Axes (degree > 1) with groups spanning nodes, fastest first."""
        return [a for a, n in reversed(self.spans().items()) if n > 1]

    def summary(self) -> str:
        """E.g. 'tp, dp inside a node; pp across nodes'."""
        inside, across = self.inside(), self.across()
        parts = ([f"{', '.join(inside)} inside a node"] if inside else []) + \
                ([f"{', '.join(across)} across nodes"] if across else [])
        return "; ".join(parts) or "one rank"

    def warnings(self) -> list[str]:
        """One line per node-local axis (tp, cp, ep) whose groups span nodes, with the reason."""
        out = []
        for axis, n in self.spans().items():
            if axis not in NODE_LOCAL_AXES or n == 1:
                continue
            name = "sp" if axis == "tp" and self.layout.sequence_parallel else axis
            inner = [a for a in reversed(AXES[AXES.index(axis):]) if self.layout.degrees[a] > 1]
            product = math.prod(self.layout.degrees[a] for a in inner)
            out.append(f"{axis} ({self.layout.degrees[axis]}) crosses nodes: a {axis} group spans {n} nodes "
                       f"({self.per_node} ranks per node); {WHY_NODE_LOCAL[name]}, so each layer waits on the "
                       f"inter-node link; keep {'*'.join(inner)} ({product}) a divisor of the ranks per node "
                       f"({self.per_node})")
        return out

    def table(self, *, max_nodes: int = 8, max_ranks: int = 8) -> str:
        """One row per node: its host and, per local rank, the global rank and its coordinates."""
        lay = self.layout
        nodes = sorted(set(self.node_of))
        coord = {}
        for n in nodes[:max_nodes]:
            for r in self.ranks_of(n)[:max_ranks]:
                c, rest = {}, r
                for a in reversed(AXES):  # the grid's row-major order: tp fastest
                    rest, c[a] = divmod(rest, lay.degrees[a])
                coord[r] = " ".join(f"{a}{c[a]}" for a in AXES if lay.degrees[a] > 1) or "single"
        width = max(len(f"{r} {coord[r]}") for r in coord)
        host_w = max([4] + [len(h) for h in self.hosts])
        cols = min(self.per_node, max_ranks)
        head = f"  {'node':<5} {'host':<{host_w}}  " + "  ".join(f"{'local ' + str(i):<{width}}" for i in range(cols))
        lines = [head.rstrip()]
        for n in nodes[:max_nodes]:
            ranks = self.ranks_of(n)
            cells = [f"{r} {coord[r]}".ljust(width) for r in ranks[:max_ranks]]
            more = f"  ... {len(ranks) - max_ranks} more" if len(ranks) > max_ranks else ""
            host = self.hosts[n] if n < len(self.hosts) else "-"
            lines.append((f"  {n:<5} {host:<{host_w}}  " + "  ".join(cells)).rstrip() + more)
        if len(nodes) > max_nodes:
            lines.append(f"  ... {len(nodes) - max_nodes} more nodes")
        return "\n".join(lines)

    def describe(self) -> str:
        """The heading of the table: layout, nodes and where each axis runs."""
        return (f"placement of {self.layout.describe()} on {self.n_nodes} node{'s' if self.n_nodes > 1 else ''} "
                f"of {self.per_node} rank{'s' if self.per_node > 1 else ''}: {self.summary()}")
