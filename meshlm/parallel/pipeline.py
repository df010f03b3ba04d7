"""Pipeline parallelism: the layers cut into stages, micro-batches flowing through them by a schedule.

    stage partitioning  ->  this rank's chunks (one per virtual stage it holds)
    schedule table      ->  parallel/schedules.py: per rank, F / B / W and SEND / RECV actions
    executor            ->  `Pipeline.run`: runs this rank's list, batching the communication
                            between two computations into one batch_isend_irecv

Stages. With p ranks and v chunks per rank, virtual stage s = chunk * p + rank holds a contiguous
range of blocks (`partition`); stage 0 also holds the embeddings, the last stage the head and the
loss. Each chunk is a `Transformer(layers=..., pre=..., post=...)`, whose parameters keep their
global names, so a stage's initial weights are exactly those of the single-process model.

Transfers. Activations and their gradients have a shape known in advance, (micro-batch, sequence
[/ tp under sequence parallelism], d_model), so receives are posted into preallocated buffers with
no handshake. Sends and receives between two computations are posted together (batch_isend_irecv);
the receives are waited on before the next computation, the sends only before the next batch, so a
rank computes while its last output is on the way (the contract `schedules.simulate` models).

Zero-bubble (Qi et al. 2024). Under the `zb` schedule B computes only the gradient of the stage's
input (what the previous stage waits for), and W, later, the weight gradients. Here the split is
done with autograd: B is `autograd.grad(out, input)` keeping the graph, W is `backward(out, inputs=
parameters)`. It is exact, but W walks the graph again, so W is dearer than in the paper's
per-operator split; the schedule, the bubble and the dependencies are the paper's.

Gradients are only accumulated during the schedule; the data-parallel reduction runs after it
(`finish` of the gradient sync), and the two copies of a tied embedding (first and last stage) are
summed over the embedding group.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..comm import span
from ..model import Transformer, init_weights
from . import schedules


def partition(n_layers: int, n_stages: int, *, costs: list[float] | None = None, first: float = 0.0,
              last: float = 0.0, counts: list[int] | None = None) -> list[range]:
    """Contiguous ranges of blocks per stage.

    counts: explicit blocks per stage. Otherwise, with `costs` (one per block; `first` and `last` add
    the embedding's and the head's cost to the first and last stage) the split that minimises the
    most expensive stage; without, equal counts (the first stages take the remainder).
    """
    if n_stages > n_layers:
        raise ValueError(f"pp*vpp ({n_stages}) must not exceed n_layers ({n_layers})")
    if counts is None and costs is None:
        base, extra = divmod(n_layers, n_stages)
        counts = [base + (1 if s < extra else 0) for s in range(n_stages)]
    elif counts is None:
        counts = _balanced_counts(costs, n_stages, first, last)
    out, start = [], 0
    for size in counts:
        out.append(range(start, start + size))
        start += size
    return out


def _balanced_counts(costs: list[float], n_stages: int, first: float, last: float) -> list[int]:
    """Blocks per stage minimising the largest stage cost (exhaustive over cut points: small numbers)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(s: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (first if s == 0 else 0.0) + (last if s == n_stages - 1 else 0.0)

    # best[s][i]: (largest stage cost, sum of squared stage costs) of the best split of blocks i..n-1
    # over stages s..: the largest cost first, then the most even split among equals
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[n_stages][n] = (0.0, 0.0)
    for s in range(n_stages - 1, -1, -1):
        for i in range(n - (n_stages - s) + 1):
            for j in range(i + 1, n - (n_stages - s - 1) + 1):
                c = stage_cost(s, i, j)
                rest = best[s + 1][j]
                value = (max(c, rest[0]), c * c + rest[1])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], 0
    for s in range(n_stages):
        counts.append(cut[s][i] - i)
        i = cut[s][i]
    return counts


def stage_ranges(cfg, layout) -> list[range]:
    """The blocks of every virtual stage, as the layout asks (pp_split, or pp_balance)."""
    n_stages = layout.pp * layout.vpp
    if layout.pp_split:
        return partition(cfg.n_layers, n_stages, counts=[int(c) for c in layout.pp_split.split(",")])
    if layout.pp_balance == "layers":
        return partition(cfg.n_layers, n_stages)
    from ..config import flops_per_token, param_count
    if layout.pp_balance == "params":
        counted = param_count(cfg)
        block = counted["blocks"] / cfg.n_layers
        return partition(cfg.n_layers, n_stages, costs=[block] * cfg.n_layers, first=counted["embedding"],
                         last=counted["head"] + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0))
    # flops: the blocks' matmuls and attention, and the head's matmul (the embedding is a lookup)
    one_layer = cfg.replace(n_layers=1)
    block = flops_per_token(one_layer, seq_len=cfg.max_seq_len) - 6.0 * cfg.vocab_size * cfg.d_model
    return partition(cfg.n_layers, n_stages, costs=[block] * cfg.n_layers, last=6.0 * cfg.vocab_size * cfg.d_model)


class PipelineStages(torch.nn.Module):
    """The chunks this rank holds, registered under their global names (layers.K, tok_emb, ...).

    The chunks themselves are kept in a plain list (so nothing is registered twice); this module's
    parameters are exactly theirs, named as in the single-process model.
    """

    def __init__(self, cfg, *, mesh, meter=None, seed: int = 0, device="cpu"):
        super().__init__()
        layout = mesh.layout
        p, v = layout.pp, layout.vpp
        rank = mesh.coords["pp"]
        self.cfg, self.p, self.v, self.rank = cfg, p, v, rank
        self.n_stages = p * v
        ranges = stage_ranges(cfg, layout)
        chunks = []
        for c in range(v):
            s = c * p + rank
            chunks.append(Transformer(cfg, mesh=mesh, layers=ranges[s], pre=s == 0, post=s == self.n_stages - 1,
                                      meter=meter))
        object.__setattr__(self, "chunks", chunks)
        self.layers = torch.nn.ModuleDict({k: b for ch in chunks for k, b in ch.layers.items()})
        for ch in chunks:
            for name, child in ch.named_children():
                if name != "layers":
                    self.add_module(name, child)
            for name, param in ch.named_parameters(recurse=False):
                self.register_parameter(name, param)
        self.tp, self.cp = chunks[0].tp, chunks[0].cp
        init_weights(self, seed)  # global names: the same values as the single-process model
        self.to(device)

    def stage(self, chunk: int) -> int:
        return chunk * self.p + self.rank

    @property
    def holds_head(self) -> bool:
        return any(ch.post for ch in self.chunks)

    @property
    def holds_embedding(self) -> bool:
        return any(ch.pre for ch in self.chunks)

    def loss_sum(self, logits, targets):
        return self.chunks[-1].loss_sum(logits, targets)


class Pipeline:
    """Runs a schedule table on this rank's stages; records busy time per action."""

    def __init__(self, stages: PipelineStages, *, group: dist.ProcessGroup, schedule: str, micro_batches: int,
                 meter=None, embed_group: dist.ProcessGroup | None = None):
        self.stages, self.group, self.meter = stages, group, meter
        p, v = stages.p, stages.v
        self.table = schedules.build(schedule, p=p, m=micro_batches, v=v)
        schedules.check(self.table, p=p, m=micro_batches, v=v)
        self.actions = self.table[stages.rank]
        self.split_backward = any(a.kind == "W" for a in self.actions)
        self.embed_group = embed_group
        self.busy_s = 0.0
        self.wall_s = 0.0
        self.last_bubble = 0.0
        self.records: list[tuple[int, str, float, float]] = []
        """(rank, action, start, end) of the last step, seconds from the step's start on this rank."""

    def _peer(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank)

    def run(self, micro: list[tuple], count: torch.Tensor, *, autocast) -> torch.Tensor:
        """Forward and backward of every micro-batch (x, y, token_types); returns the summed loss
        (non-zero on the rank holding the last stage only)."""
        st = self.stages
        chunks = st.chunks
        last = st.n_stages - 1
        inputs, outputs, grad_out, grad_in, deferred = {}, {}, {}, {}, {}
        total = torch.zeros(())
        ops, after = [], []

        def act_shape(mb: int) -> tuple[int, ...]:
            x = micro[mb][0]
            t = x.shape[1] // (st.tp.size if st.tp.sequence_parallel else 1)
            return (x.shape[0], t, st.cfg.d_model)

        labels = []  # the actions of the batch of sends and receives, for the flight recorder
        sending = []  # sends of the previous batch, waited on at the next (ZB-H1 needs the overlap)

        def flush():
            if ops:
                entry = None
                if self.meter is not None:  # the flight recorder names the schedule's actions of this batch
                    sent = sum(o.tensor.numel() * o.tensor.element_size() for o in ops if o.op is dist.isend)
                    entry = self.meter.begin("p2p", "pp", sent, action=" ".join(labels))
                for w, _ in sending:
                    w.wait()
                sending.clear()
                for op, w in zip(ops, dist.batch_isend_irecv(ops)):
                    if op.op is dist.irecv:
                        w.wait()  # a computation needs it now
                    else:
                        sending.append((w, op.tensor))  # keep the tensor alive until it has left
                if entry is not None:
                    self.meter.end(entry)
                for fn in after:
                    fn()
                ops.clear()
                after.clear()
                labels.clear()

        profiling = self.meter is not None and self.meter.profiling
        step_start = time.perf_counter()
        self.records = []
        busy = 0.0
        for a in self.actions:
            key = (a.mb, a.chunk)
            if a.kind == "SEND_F":
                labels.append(f"{a.kind}(mb {a.mb}, chunk {a.chunk}, peer {a.peer})")
                ops.append(dist.P2POp(dist.isend, outputs[key].detach().contiguous(), self._peer(a.peer), self.group))
                continue
            if a.kind == "SEND_B":
                labels.append(f"{a.kind}(mb {a.mb}, chunk {a.chunk}, peer {a.peer})")
                ops.append(dist.P2POp(dist.isend, grad_in.pop(key).contiguous(), self._peer(a.peer), self.group))
                continue
            if a.kind in ("RECV_F", "RECV_B"):
                labels.append(f"{a.kind}(mb {a.mb}, chunk {a.chunk}, peer {a.peer})")
                buf = torch.empty(act_shape(a.mb))
                ops.append(dist.P2POp(dist.irecv, buf, self._peer(a.peer), self.group))
                target = inputs if a.kind == "RECV_F" else grad_out
                after.append(lambda buf=buf, key=key, target=target: target.__setitem__(key, buf))
                continue
            flush()
            start = time.perf_counter()
            named = None  # a range in the profiler's trace (train.profile_steps); none is created otherwise
            if profiling:
                named = torch.profiler.record_function(f"pipeline {a.kind}(mb {a.mb}, chunk {a.chunk})")
                named.__enter__()
            stage = st.stage(a.chunk)
            chunk = chunks[a.chunk]
            x, y, types = micro[a.mb]
            if a.kind == "F":
                inp = x if stage == 0 else inputs.pop(key).requires_grad_()
                with autocast():
                    out = chunk(inp, token_types=types if stage == 0 else None)
                if stage == last:
                    loss, _ = chunk.loss_sum(out, y)
                    total += loss.detach()
                    out = loss / count
                outputs[key] = out
                inputs[key] = inp
            elif a.kind == "B":
                out, inp = outputs.pop(key), inputs.pop(key)
                grad = None if stage == last else grad_out.pop(key)
                if self.split_backward:
                    if stage > 0:  # the input gradient now (the previous stage waits for it) ...
                        (grad_in[key],) = torch.autograd.grad(out, inp, grad, retain_graph=True)
                    deferred[key] = (out, grad)  # ... the weight gradients at W
                else:
                    torch.autograd.backward(out, grad)
                    if stage > 0:
                        grad_in[key] = inp.grad
            elif a.kind == "W":
                out, grad = deferred.pop(key)
                params = [p for p in chunk.parameters() if p.requires_grad]
                torch.autograd.backward(out, grad, inputs=params)
            if named is not None:
                named.__exit__(None, None, None)
            end = time.perf_counter()
            busy += end - start
            self.records.append((st.rank, str(a), start - step_start, end - step_start))
        flush()
        for w, _ in sending:
            w.wait()
        wall = time.perf_counter() - step_start
        self.busy_s += busy
        self.wall_s += wall
        self.last_bubble = 1.0 - busy / wall if wall else 0.0
        return total

    def sum_tied_embedding(self) -> None:
        """First and last stage each hold the tied embedding: sum their gradients (both then update alike)."""
        if self.embed_group is None:
            return
        p = self.stages.tok_emb if hasattr(self.stages, "tok_emb") else None
        if p is None:
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        with span(self.meter, "all_reduce", "embed", p.grad, group=self.embed_group):
            dist.all_reduce(p.grad, group=self.embed_group)

    def bubble(self) -> float:
        """Measured idle fraction of this rank so far: 1 - busy / wall."""
        return 1.0 - self.busy_s / self.wall_s if self.wall_s else 0.0

    @torch.no_grad()
    def forward_only(self, x, y, types, *, autocast) -> torch.Tensor:
        """Evaluation: the batch through the stages in order, blocking sends; summed loss on the last stage."""
        st = self.stages
        total = torch.zeros(())
        for c in range(st.v):
            stage = st.stage(c)
            chunk = st.chunks[c]
            if stage == 0:
                inp = x
            else:
                inp = torch.empty(x.shape[0], x.shape[1] // (st.tp.size if st.tp.sequence_parallel else 1),
                                  st.cfg.d_model)
                with span(self.meter, "recv", "pp", inp):
                    dist.recv(inp, self._peer((stage - 1) % st.p), group=self.group)
            with autocast():
                out = chunk(inp, token_types=types if stage == 0 else None)
            if stage == st.n_stages - 1:
                total += chunk.loss_sum(out, y)[0]
            else:
                with span(self.meter, "send", "pp", out):
                    dist.send(out.contiguous(), self._peer((stage + 1) % st.p), group=self.group)
        return total
