"""Parameter-server data parallelism: the classic alternative to all-reduce (Li et al. 2014, "Scaling
Distributed Machine Learning with the Parameter Server").

A set of server ranks holds the parameters' master copy and the optimizer states, split into equal
shards (server j owns shard j of the flattened parameters). Every rank is a worker: it computes the
gradients of its rows of the batch, *pushes* each shard of them to the server that owns it, the
server sums what it received and updates its shard, and every worker *pulls* the updated shards
back. The servers here are also workers (co-located, as in most deployments).

It is here to be compared, not recommended: with one server, that rank receives (N-1) Psi and sends
(N-1) Psi elements per step, against 2(N-1)/N Psi for every rank of a ring all-reduce; the server's
link is the bottleneck, and more servers spread it. Point-to-point sends (batch_isend_irecv) keep
that traffic pattern visible in the CommMeter instead of hiding it inside a collective.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ..comm import CommMeter, span
from .zero import param_kind


def parse_ps_ranks(text: str, world: int) -> list[int]:
    """'0' or '0,2' -> [0] / [0, 2]; raises ValueError naming the value and the rule."""
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise ValueError(f"ps_ranks ({text!r}) must be comma-separated integers") from None
    for r in ranks:
        if not 0 <= r < world:
            raise ValueError(f"ps_ranks ({text!r}): rank {r} is outside the world (ranks 0..{world - 1})")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ps_ranks ({text!r}) names a rank twice")
    return ranks


class Flat:
    """Parameters of one kind (weight decay or not, tp shard or not) as views of one buffer cut into
    one shard per server."""

    def __init__(self, params: list[torch.nn.Parameter], n_servers: int, decay: bool, tp_shard: bool,
                 tp_partial: bool):
        self.params, self.decay, self.tp_shard, self.tp_partial = params, decay, tp_shard, tp_partial
        self.numel = sum(p.numel() for p in params)
        self.size = math.ceil(self.numel / n_servers)
        self.full = torch.zeros(self.size * n_servers, dtype=params[0].dtype)
        offset = 0
        with torch.no_grad():
            for p in params:
                self.full[offset:offset + p.numel()].copy_(p.reshape(-1))
                p.data = self.full[offset:offset + p.numel()].view_as(p)
                offset += p.numel()

    def piece(self, t: torch.Tensor, j: int) -> torch.Tensor:
        return t[j * self.size:(j + 1) * self.size]

    def flat_grad(self) -> torch.Tensor:
        g = torch.zeros_like(self.full)
        offset = 0
        for p in self.params:
            if p.grad is not None:
                g[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        return g


class ParameterServer:
    """Push gradients to the servers, update there, pull parameters back."""

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup, *, servers: list[int],
                 meter: CommMeter | None = None, axis: str = "dp"):
        self.group, self.meter, self.axis = group, meter, axis
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.servers = servers
        self.my_shard = servers.index(self.rank) if self.rank in servers else None
        named = list(model.named_parameters())
        kinds = sorted({param_kind(n, p) for n, p in named}, reverse=True)
        self.flats = [Flat([p for n, p in named if param_kind(n, p) == k], len(servers), *k) for k in kinds]
        # master shards and their gradients live on the servers only
        self.shards = [torch.nn.Parameter(f.piece(f.full, self.my_shard).clone()) for f in self.flats] \
            if self.my_shard is not None else []

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not dist.group.WORLD else r

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": [s for s, f in zip(self.shards, self.flats) if f.decay], "weight_decay": weight_decay},
                {"params": [s for s, f in zip(self.shards, self.flats) if not f.decay], "weight_decay": 0.0}]

    @contextlib.contextmanager
    def micro_batch(self, *, last: bool):
        yield  # gradients accumulate locally; the push happens once, in finish()

    def _exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], op: str):
        ops = [dist.P2POp(dist.isend, t, self._global(r), self.group) for t, r in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global(r), self.group) for t, r in recvs]
        # every rank of the group exchanges once per flat buffer (the ring numbers them per group); the counters
        # count what this rank sent (a server keeps its own gradient, a worker sends no parameters)
        entry = self.meter.begin(op, self.axis, sum(t.numel() * t.element_size() for t, _ in sends),
                                 group=self.group) if self.meter is not None else None
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        if entry is not None:
            self.meter.end(entry, count=bool(sends))

    def finish(self) -> None:
        """Push: every rank sends server j its gradient for shard j; servers sum what they receive."""
        for k, f in enumerate(self.flats):
            g = f.flat_grad()
            sends = [(f.piece(g, j).contiguous(), s) for j, s in enumerate(self.servers) if s != self.rank]
            recvs = []
            if self.my_shard is not None:
                recvs = [(torch.empty(f.size, dtype=g.dtype), r) for r in range(self.world) if r != self.rank]
            self._exchange(sends, recvs, "ps_push")
            if self.my_shard is not None:
                total = f.piece(g, self.my_shard).clone()
                for t, _ in recvs:
                    total += t
                self.shards[k].grad = total

    def grads(self) -> list[tuple[torch.Tensor, str | None]]:
        return [(s.grad, "tp" if f.tp_shard else None) for s, f in zip(self.shards, self.flats)]

    def partial_grads(self) -> list[torch.Tensor]:
        return [s.grad for s, f in zip(self.shards, self.flats) if f.tp_partial]

    def after_step(self) -> None:
        """Pull: every server sends its updated shard to every worker."""
        for k, f in enumerate(self.flats):
            sends = []
            if self.my_shard is not None:
                with torch.no_grad():
                    f.piece(f.full, self.my_shard).copy_(self.shards[k])
                sends = [(self.shards[k].detach(), r) for r in range(self.world) if r != self.rank]
            recvs = [(f.piece(f.full, j), s) for j, s in enumerate(self.servers) if s != self.rank]
            self._exchange(sends, recvs, "ps_pull")
            for p in f.params:
                p.grad = None

    # --- checkpoints ----------------------------------------------------------------------------
    def _assemble(self, f: Flat, k: int, shard_value) -> torch.Tensor:
        """The whole flat tensor from the servers' shards: each adds its own piece, summed over ranks."""
        full = torch.zeros_like(f.full)
        if self.my_shard is not None:
            f.piece(full, self.my_shard).copy_(shard_value(k))
        with span(self.meter, "all_reduce_state", self.axis, full, group=self.group):
            dist.all_reduce(full, group=self.group)
        return full

    def full_state(self, optimizer, names: dict[int, str]):
        params, moments, steps = {}, {}, {}
        state = lambda k, key: optimizer.state[self.shards[k]][key]  # noqa: E731
        has_state = torch.tensor([float(bool(self.shards) and self.shards[0] in optimizer.state)])
        with span(self.meter, "all_reduce_state", self.axis, has_state, group=self.group):
            dist.all_reduce(has_state, group=self.group, op=dist.ReduceOp.MAX)
        for k, f in enumerate(self.flats):
            offsets = [0]
            for p in f.params:
                offsets.append(offsets[-1] + p.numel())
            cut = lambda t: [t[a:b].view(p.shape).clone() for p, a, b in zip(f.params, offsets, offsets[1:])]  # noqa
            for p, v in zip(f.params, cut(f.full)):
                params[names[id(p)]] = v
            if has_state.item():
                step = torch.tensor([float(state(k, "step")) if self.my_shard is not None else 0.0])
                with span(self.meter, "all_reduce_state", self.axis, step, group=self.group):
                    dist.all_reduce(step, group=self.group, op=dist.ReduceOp.MAX)
                m1 = cut(self._assemble(f, k, lambda k: state(k, "exp_avg")))
                m2 = cut(self._assemble(f, k, lambda k: state(k, "exp_avg_sq")))
                for p, a, b in zip(f.params, m1, m2):
                    moments[names[id(p)]] = (a, b)
                    steps[names[id(p)]] = step.item()
        return params, moments, steps

    def load_state(self, optimizer, names: dict[int, str], params, moments, steps) -> None:
        with torch.no_grad():
            for k, f in enumerate(self.flats):
                keys = [names[id(p)] for p in f.params]
                for p, key in zip(f.params, keys):
                    p.copy_(params[key])
                if self.my_shard is None:
                    continue
                self.shards[k].copy_(f.piece(f.full, self.my_shard))
                if keys[0] in moments:
                    flat1, flat2 = torch.zeros_like(f.full), torch.zeros_like(f.full)
                    offset = 0
                    for p, key in zip(f.params, keys):
                        flat1[offset:offset + p.numel()].copy_(moments[key][0].reshape(-1))
                        flat2[offset:offset + p.numel()].copy_(moments[key][1].reshape(-1))
                        offset += p.numel()
                    optimizer.state[self.shards[k]] = {"step": torch.tensor(steps[keys[0]]),
                                                       "exp_avg": f.piece(flat1, self.my_shard).clone(),
                                                       "exp_avg_sq": f.piece(flat2, self.my_shard).clone()}
