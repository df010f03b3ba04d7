"""ZeRO: data parallelism that shards optimizer states, gradients and parameters (Rajbhandari et al. 2020).

Psi parameters, N data-parallel ranks, K bytes of optimizer state per parameter. Per rank:

    stage 0 (plain DP)   params 4Psi   + grads 4Psi   + optimizer K*Psi        (fp32 training, K = 8)
    stage 1              params 4Psi   + grads 4Psi   + optimizer K*Psi/N
    stage 2              params 4Psi   + grads 4Psi/N + optimizer K*Psi/N
    stage 3              params 4Psi/N + grads 4Psi/N + optimizer K*Psi/N      (+ the units being used)

(With bf16 weights and fp32 master copies the paper's figures are 2Psi + 2Psi + 12Psi.) The
numbers are those of `zero_state_bytes`; `ZeroEngine.state_bytes` measures the tensors actually
held, and the tests assert the two agree.

How it works here. The model's parameters are cut into *units*: one per transformer block, plus a
root unit with everything else (embeddings, final norm, head: the tied embedding is used at both
ends of the model, so it stays gathered for the whole step). Each unit's parameters, split by
whether they take weight decay, are flattened into a `FlatGroup`: one buffer, padded to a multiple
of N, of which rank r owns the contiguous shard [r*S, (r+1)*S). The model's parameters are views
into the buffer. AdamW runs on the shards only; since it is elementwise, updating shards gives
exactly the update of the whole.

  * Stage 1: gradients are reduce-scattered (bucketed per group, launched by hooks during backward,
    or once after the last micro-batch: accumulation is local), each rank updates its shard, and
    the updated shards are all-gathered back into the buffers. The whole gradient stays allocated,
    as ZeRO-1 keeps it. Communication: reduce-scatter Psi + all-gather Psi, on a ring the same
    traffic as DP's one all-reduce.
  * Stage 2: the same communication, but the full gradient is freed as soon as it has been sent and
    every micro-batch is reduce-scattered into the shard, so only the shard's sum is kept.
  * Stage 3: the buffers themselves are freed between uses. A unit is all-gathered just before its
    forward (the next unit's gather is started at the same time: prefetch), freed after it, gathered
    again before its backward (prefetching the unit before it), and freed once its gradients have
    been reduce-scattered. Communication: all-gather Psi (forward) + all-gather Psi (backward) +
    reduce-scatter Psi = 3Psi (ZeRO paper, section 7).

Freeing is `untyped_storage().resize_(0)` and gathering re-allocates the same storage, so the
tensors autograd saved in forward see the gathered values again in backward (PyTorch FSDP does the
same).

Pipeline parallelism. The model is then a `PipelineStages`: the schedule calls its chunks (never the
model itself), with the forwards and backwards of many micro-batches interleaved and, under zb, a
block's weight gradients computed long after its forward. The whole schedule runs under `no_sync()`:
gradients accumulate locally and are reduce-scattered once, by `finish()`, after the trainer has
summed the two copies of a tied embedding (first and last stage) over the embedding group, so both
stages reduce the same whole gradient and update their copies alike. Stage 3 gathers every unit of
the stage at the step's first forward (all at once) and frees them when their gradients have left in
`finish()`: under pp it shards the optimizer states, and the parameters and gradients between steps,
but holds the stage's parameters and whole gradients during the schedule. Freeing a unit between
uses would cost an all-gather per micro-batch and use, since micro-batches interleave; DeepSpeed, for
the same reason, combines its pipeline engine with ZeRO stage 1 only.

Expert parallelism. Expert weights are replicated over fewer ranks (dp, cp) than the dense
parameters (dp, ep, cp), so each kind is sharded over its own group: `ZeroSet` holds one engine per
kind (`select` picks an engine's parameters). Over a group of one rank (None) there is nothing to
shard: the shard is the whole buffer and nothing is sent or freed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..comm import CommMeter, span
from .data import BucketHooks, ReducerSet, is_tp_shard


def zero_state_bytes(psi: int, world: int, stage: int, *, param_bytes: int = 4, grad_bytes: int = 4,
                     optim_bytes: int = 8) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and optimizer states under a ZeRO stage (the formula)."""
    return {"params": param_bytes * psi / (world if stage >= 3 else 1),
            "grads": grad_bytes * psi / (world if stage >= 2 else 1),
            "optim": optim_bytes * psi / (world if stage >= 1 else 1)}


@dataclass(eq=False)
class FlatGroup:
    """Parameters of one unit with one weight-decay setting, flattened; this rank owns one shard."""

    name: str
    params: list[torch.nn.Parameter]
    decay: bool
    tp_shard: bool
    """Whether these parameters are tensor-parallel slices (for the global gradient norm)."""
    tp_partial: bool
    """Whether their gradients are partial over tp (summed over tp after the reduction)."""
    numel: int
    full: torch.Tensor
    """(padded,) buffer the parameters are views of; under stage 3 its storage is freed between uses."""
    shard: torch.nn.Parameter
    """(padded / N,) this rank's part: what the optimizer updates (its .grad is the shard's gradient)."""
    resident: bool = True
    gather_work: dist.Work | None = None
    gather_source: torch.Tensor | None = None
    gather_entry: dict | None = None
    """The flight recorder's entry of the all-gather in flight (left when it has been waited on)."""
    pending: list = field(default_factory=list)
    """Gradient collectives in flight: (work, buffer, output, flight-recorder entry)."""

    @property
    def padded(self) -> int:
        return self.full.numel()

    @property
    def nbytes(self) -> int:
        return self.full.numel() * self.full.element_size()


def wants_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay on matrices only, not on biases, norms or embeddings (GPT-2, nanoGPT)."""
    return p.ndim >= 2 and "emb" not in name


def param_kind(name: str, p: torch.nn.Parameter) -> tuple[bool, bool, bool]:
    """(weight decay, tp shard, partial over tp): parameters of one kind share a flat buffer."""
    return wants_decay(name, p), is_tp_shard(p), bool(getattr(p, "meshlm_tp_partial", False))


class ZeroEngine(BucketHooks):
    """Shards a model's training state over `group` (the data-parallel ranks) at ZeRO `stage` 1, 2 or 3."""

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup | None, *, stage: int,
                 meter: CommMeter | None = None, axis: str = "dp",
                 select: Callable[[torch.nn.Parameter], bool] | None = None):
        """model: a Transformer or a PipelineStages. select: which of its parameters this engine
        shards (default all; under expert parallelism one engine takes the dense ones, one the experts)."""
        if stage not in (1, 2, 3):
            raise ValueError(f"zero ({stage}) must be 1, 2 or 3 for ZeroEngine")
        self.group, self.meter, self.axis = group, meter, axis
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.stage = stage if self.world > 1 else min(stage, 2)  # one rank: no buffer is ever freed
        self.deferred = False
        """Gradients accumulated under no_sync() and not reduce-scattered yet (sent by finish())."""

        take = select or (lambda p: True)
        blocks = list(model.layers.items())
        in_blocks = {id(p) for _, b in blocks for p in b.parameters()}
        root = [(n, p) for n, p in model.named_parameters() if id(p) not in in_blocks and take(p)]
        self.units: list[list[FlatGroup]] = [self._flatten("root", root)]
        for key, block in blocks:
            self.units.append(self._flatten(f"layers.{key}", [(f"layers.{key}.{n}", p)
                                                              for n, p in block.named_parameters() if take(p)]))
        self.groups = [g for unit in self.units for g in unit]
        # Backward produces gradients from the last block to the first, the root's last.
        super().__init__([g.params for unit in reversed(self.units[1:]) for g in unit]
                         + [g.params for g in self.units[0]])
        self.bucket_groups = [g for unit in reversed(self.units[1:]) for g in unit] + self.units[0]
        chunks = getattr(model, "chunks", None)  # a PipelineStages: the schedule calls its chunks
        if self.stage == 3:
            for g in self.groups:
                self._free(g)
            if chunks is not None:
                self._install_pipeline_hooks(chunks)
            else:
                self._install_stage3_hooks(model, [b for _, b in blocks])
        else:
            self._install_wait_hooks(chunks or [model], [b for _, b in blocks])

    # --- building -------------------------------------------------------------------------------
    def _flatten(self, unit: str, named: list[tuple[str, torch.nn.Parameter]]) -> list[FlatGroup]:
        out = []
        kinds = sorted({param_kind(n, p) for n, p in named}, reverse=True)
        for decay, tp_shard, tp_partial in kinds:
            chosen = [(n, p) for n, p in named if param_kind(n, p) == (decay, tp_shard, tp_partial)]
            params = [p for _, p in chosen]
            numel = sum(p.numel() for p in params)
            padded = math.ceil(numel / self.world) * self.world
            full = torch.zeros(padded, dtype=params[0].dtype, device=params[0].device)
            offset = 0
            with torch.no_grad():
                for p in params:
                    full[offset:offset + p.numel()].copy_(p.reshape(-1))
                    p.data = full[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
            size = padded // self.world
            piece = full[self.rank * size:(self.rank + 1) * size]
            # stages 1-2 keep the whole buffer, so the shard can be a view of it; stage 3 frees the buffer
            # (self.stage is at most 2 over one rank, whose shard is the whole buffer)
            shard = torch.nn.Parameter(piece.clone() if self.stage == 3 else piece)
            name = f"{unit}/{'decay' if decay else 'no_decay'}" + ("/tp" if tp_shard else "") \
                + ("/partial" if tp_partial else "")
            out.append(FlatGroup(name, params, decay, tp_shard, tp_partial, numel, full, shard))
        return out

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups over the shards."""
        return [{"params": [g.shard for g in self.groups if g.decay], "weight_decay": weight_decay},
                {"params": [g.shard for g in self.groups if not g.decay], "weight_decay": 0.0}]

    # --- gradients ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def micro_batch(self, *, last: bool):
        """Stage 1 accumulates full gradients locally until the last micro-batch; stages 2-3 reduce-scatter
        every micro-batch into the shard (they never hold a full gradient for long)."""
        if self.stage == 1 and not last:
            with self.no_sync():
                yield
            return
        yield
        self.launch_rest()
        self._wait_gradients()
        self.deferred = False

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate whole gradients locally; they are sent with the last micro-batch or by finish()."""
        self.deferred = True
        with super().no_sync():
            yield

    def _launch(self, i: int) -> None:
        g = self.bucket_groups[i]
        flat = torch.zeros(g.padded, dtype=g.full.dtype, device=g.full.device)
        offset = 0
        for p in g.params:
            if p.grad is not None:
                flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        nbytes = flat.numel() * flat.element_size()
        for p in g.params:  # the flat buffer holds the gradient now
            p.grad = None
        if self.group is None:  # one rank: its gradient is the sum
            g.pending.append((None, flat, flat, None))
        else:
            out = torch.empty(g.shard.numel(), dtype=flat.dtype, device=flat.device)
            entry = self._begin("reduce_scatter", nbytes, flat)
            work = dist.reduce_scatter_single(out, flat, group=self.group, async_op=True)
            g.pending.append((work, flat, out, entry))
        if self.stage == 3 and g not in self.units[0]:
            self._free(g)  # its backward is done

    def _wait_gradients(self) -> None:
        for g in self.groups:
            for work, flat, out, entry in g.pending:
                if work is not None:
                    work.wait()
                    self._end(entry)
                if self.stage == 1 and out is not flat:
                    # keep the whole gradient buffer (ZeRO-1 does); the shard's sum lives in it
                    size = g.shard.numel()
                    out = flat[self.rank * size:(self.rank + 1) * size].copy_(out)
                if g.shard.grad is None:
                    g.shard.grad = out
                else:
                    g.shard.grad.add_(out)
            g.pending.clear()
        if self.stage == 3:
            for g in self.units[0]:
                self._free(g)

    def finish(self) -> None:
        """Reduce-scatter the gradients accumulated under no_sync() (a pipeline schedule runs wholly under
        it); nothing is left to do after micro_batch(last=True)."""
        if self.deferred:
            self.launch_rest()
            self._wait_gradients()
            self.deferred = False

    def grads(self) -> list[tuple[torch.Tensor, str | None]]:
        """This rank's gradient shards (zeros where it received none), with the axis they are split over or None."""
        for g in self.groups:
            if g.shard.grad is None:
                g.shard.grad = torch.zeros_like(g.shard)
        return [(g.shard.grad, "tp" if g.tp_shard else None) for g in self.groups]

    def partial_grads(self) -> list[torch.Tensor]:
        """Shard gradients of groups whose parameters are partial over tp (the same layout on every tp rank)."""
        return [g for (g, _), grp in zip(self.grads(), self.groups) if grp.tp_partial]

    def grads_except(self, skip: list[torch.nn.Parameter]) -> list[tuple[torch.Tensor, str | None]]:
        """grads(), with the elements of the parameters in `skip` zeroed (in copies): what this rank adds
        to the global norm when another rank counts those parameters (the second copy of a tied embedding)."""
        skip_ids = {id(p) for p in skip}
        out = []
        for (grad, axis), g in zip(self.grads(), self.groups):
            size = g.shard.numel()
            start, offset, kept = self.rank * size, 0, grad
            for p in g.params:
                lo, hi = max(offset, start), min(offset + p.numel(), start + size)
                if id(p) in skip_ids and lo < hi:
                    kept = kept.clone() if kept is grad else kept
                    kept[lo - start:hi - start] = 0
                offset += p.numel()
            out.append((kept, axis))
        return out

    def after_step(self) -> None:
        """Start bringing the updated shards back into the full buffers (stages 1-2), drop the gradients.

        The all-gathers run in the background; each unit's forward pre-hook waits for its own, so the
        gathers of later blocks overlap with the forward of earlier ones.
        """
        for g in self.groups:
            if self.stage < 3 and self.group is not None:  # (over one rank the shard is a view of the buffer)
                g.gather_source = g.shard.detach().clone()  # kept alive until the gather is waited on
                g.gather_work = self._all_gather(g, g.gather_source)
            for p in g.params:
                p.grad = None

    def wait_gathers(self) -> None:
        """Wait for every parameter all-gather in flight (before reading parameters outside forward)."""
        if self.stage < 3:  # (stage 3 gathers and frees inside forward and backward: none is left in flight)
            for unit in self.units:
                self._gather(unit)

    # --- stage 3: gather before use, free after -----------------------------------------------
    def _begin(self, op: str, nbytes: int, t: torch.Tensor) -> dict | None:
        """Enter an asynchronous collective in the flight recorder (`_end` leaves it after the wait)."""
        if self.meter is None:
            return None
        return self.meter.begin(op, self.axis, nbytes, group=self.group, shape=tuple(t.shape))

    def _end(self, entry: dict | None) -> None:
        if entry is not None:  # bytes counted; no seconds: the transfer overlapped with computation
            self.meter.end(entry, seconds=0.0)

    def _all_gather(self, g: FlatGroup, source: torch.Tensor) -> dist.Work:
        """Start gathering every rank's shard into g.full (waited on in `_gather`)."""
        g.gather_entry = self._begin("all_gather", g.nbytes, g.full)
        return dist.all_gather_single(g.full, source, group=self.group, async_op=True)

    def _free(self, g: FlatGroup) -> None:
        if g.resident:
            g.full.untyped_storage().resize_(0)
            g.resident = False

    def _prefetch(self, unit: list[FlatGroup]) -> None:
        for g in unit:
            if not g.resident and g.gather_work is None:
                g.full.untyped_storage().resize_(g.nbytes)
                g.gather_work = self._all_gather(g, g.shard.detach())

    def _gather(self, unit: list[FlatGroup]) -> None:
        self._prefetch(unit)
        for g in unit:
            if g.gather_work is not None:
                g.gather_work.wait()
                self._end(g.gather_entry)
                g.gather_work, g.gather_source, g.gather_entry = None, None, None
            g.resident = True

    def _install_wait_hooks(self, entries: list[torch.nn.Module], blocks: list[torch.nn.Module]) -> None:
        """Stages 1-2: each unit's forward waits for the all-gather of its updated parameters (the root's
        before the model's forward, or before any pipeline chunk's)."""
        for entry in entries:
            entry.register_forward_pre_hook(lambda module, args: self._gather(self.units[0]))
        for unit, block in zip(self.units[1:], blocks):
            block.register_forward_pre_hook(lambda module, args, unit=unit: self._gather(unit))

    def _install_stage3_hooks(self, model: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
        root, block_units = self.units[0], self.units[1:]

        def model_pre(module, args):
            self._gather(root)
            if block_units:
                self._prefetch(block_units[0])

        def model_post(module, args, out):
            # The root (embeddings, head) is freed after forward like every unit, and gathered again
            # when backward reaches the head, prefetching the last block.
            for g in root:
                self._free(g)
            if torch.is_grad_enabled() and out.requires_grad:
                out.register_hook(lambda grad: self._pre_backward(root, len(block_units) + 1))

        model.register_forward_pre_hook(model_pre)
        model.register_forward_hook(model_post)
        for k, block in enumerate(blocks):
            unit = block_units[k]

            def pre(module, args, unit=unit, k=k):
                self._gather(unit)
                if k + 1 < len(block_units):
                    self._prefetch(block_units[k + 1])

            def post(module, args, out, unit=unit, k=k):
                for g in unit:
                    self._free(g)
                if torch.is_grad_enabled() and out.requires_grad:
                    out.register_hook(lambda grad, unit=unit, k=k: self._pre_backward(unit, k))

            block.register_forward_pre_hook(pre)
            block.register_forward_hook(post)

    def _install_pipeline_hooks(self, chunks: list[torch.nn.Module]) -> None:
        """Stage 3 under pipeline parallelism: the step's first chunk forward gathers every unit of the
        stage (all started at once); `finish()` frees them when their gradients have been sent."""
        for chunk in chunks:
            chunk.register_forward_pre_hook(lambda module, args: self._gather_all())

    def _gather_all(self) -> None:
        for unit in self.units:
            self._prefetch(unit)
        for unit in self.units:
            self._gather(unit)

    def _pre_backward(self, unit: list[FlatGroup], k: int) -> None:
        """Gather block k (or the root, k = n_blocks + 1) before its backward; prefetch the one before."""
        self._gather(unit)
        if k > 0:
            self._prefetch(self.units[min(k, len(self.units) - 1)])  # units[k] is block k-1; units[0] the root

    # --- memory and checkpoints ---------------------------------------------------------------
    def state_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes this rank holds now in parameters, gradients and optimizer states (measured)."""
        self.wait_gathers()
        params = sum(g.full.untyped_storage().nbytes() for g in self.groups)
        if self.stage == 3:
            params += sum(g.shard.numel() * g.shard.element_size() for g in self.groups)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [p.grad for g in self.groups for p in g.params] + [g.shard.grad for g in self.groups]
                    if t is not None}
        grads = sum(storages.values())
        optim = sum(t.numel() * t.element_size() for g in self.groups for t in optimizer.state.get(g.shard, {}).values()
                    if torch.is_tensor(t) and t.ndim > 0)
        return {"params": params, "grads": grads, "optim": optim}

    def full_tensors(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """All-gather one shard-shaped tensor per group (parameters or optimizer moments) into full ones."""
        out = []
        for g, s in zip(self.groups, shards):
            full = torch.empty(g.padded, dtype=s.dtype, device=s.device)
            if self.group is None:
                full.copy_(s.detach())
            else:
                with span(self.meter, "all_gather_state", self.axis, full, group=self.group):
                    dist.all_gather_single(full, s.detach().contiguous(), group=self.group)
            out.append(full)
        return out

    def full_state(self, optimizer, names: dict[int, str]):
        """Whole parameters and AdamW moments by name, gathered from the shards (collective)."""
        self.wait_gathers()
        params, moments, steps = {}, {}, {}
        shards = [g.shard for g in self.groups]
        have = [s in optimizer.state for s in shards]
        full_p = self.full_tensors(shards)
        full_m1 = self.full_tensors([optimizer.state[s]["exp_avg"] if h else torch.zeros_like(s)
                                     for s, h in zip(shards, have)])
        full_m2 = self.full_tensors([optimizer.state[s]["exp_avg_sq"] if h else torch.zeros_like(s)
                                     for s, h in zip(shards, have)])
        for g, h, fp, f1, f2 in zip(self.groups, have, full_p, full_m1, full_m2):
            for p, vp, v1, v2 in zip(g.params, self.split(g, fp), self.split(g, f1), self.split(g, f2)):
                params[names[id(p)]] = vp.clone()
                if h:
                    moments[names[id(p)]] = (v1.clone(), v2.clone())
                    steps[names[id(p)]] = float(optimizer.state[g.shard]["step"])
        return params, moments, steps

    def load_state(self, optimizer, names: dict[int, str], params, moments, steps) -> None:
        """Put whole tensors (from a checkpoint of any data-parallel layout) into this rank's shards."""
        self.wait_gathers()
        with torch.no_grad():
            for g in self.groups:
                keys = [names[id(p)] for p in g.params]
                g.shard.copy_(self.shard_of(g, [params[k] for k in keys]))
                if self.stage < 3:  # the full buffer is resident: fill it too
                    for p, k in zip(g.params, keys):
                        p.copy_(params[k])
                else:  # gathered again from the new shard at its next use
                    self._free(g)
                if keys[0] in moments:
                    optimizer.state[g.shard] = {
                        "step": torch.tensor(steps[keys[0]]),
                        "exp_avg": self.shard_of(g, [moments[k][0] for k in keys]),
                        "exp_avg_sq": self.shard_of(g, [moments[k][1] for k in keys]),
                    }

    def split(self, g: FlatGroup, flat: torch.Tensor) -> list[torch.Tensor]:
        """A full flat tensor of group g cut into its parameters' shapes."""
        pieces, offset = [], 0
        for p in g.params:
            pieces.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return pieces

    def shard_of(self, g: FlatGroup, values: list[torch.Tensor]) -> torch.Tensor:
        """This rank's shard of group g, from full per-parameter tensors (the inverse of split)."""
        flat = torch.zeros(g.padded, dtype=torch.float32)
        offset = 0
        for t in values:
            flat[offset:offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        size = g.shard.numel()
        return flat[self.rank * size:(self.rank + 1) * size].clone()


class ZeroSet(ReducerSet):
    """Several ZeRO engines acting as one (as `ReducerSet` does for data parallelism), for parameters
    replicated over different groups: under expert parallelism the dense parameters are sharded over
    the dense-gradient group (dp, ep, cp), the expert weights over the expert group (dp, cp).

    The global gradient norm stays exact with the dense group as the trainer's norm group.
    `global_grad_norm` adds 1/ep of the square of a tensor tagged None (not split over tp or ep) and
    sums over tp, then ep, then the norm group, which contains ep again. A dense shard (disjoint over
    dp, ep, cp) is thus counted once; so is an expert shard, disjoint over (dp, cp) and different on
    every ep rank, which the expert engine tags None as well (experts are not split over tp): its 1/ep
    share, summed over ep and then over (dp, ep, cp), is ep * 1/ep * the squares of every (dp, cp)
    shard of every ep rank's experts. (Tagged 'ep' it would be counted ep times.)
    """

    def __init__(self, engines: list[ZeroEngine]):
        super().__init__(engines)  # micro_batch, no_sync, finish, grads, partial_grads, after_step, overlapped
        self.engines = engines

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [g for e in self.engines for g in e.param_groups(weight_decay)]

    def grads_except(self, skip: list[torch.nn.Parameter]) -> list[tuple[torch.Tensor, str | None]]:
        return [g for e in self.engines for g in e.grads_except(skip)]

    def wait_gathers(self) -> None:
        for e in self.engines:
            e.wait_gathers()

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        out = {"params": 0, "grads": 0, "optim": 0}
        for e in self.engines:
            for k, v in e.state_bytes(optimizer).items():
                out[k] += v
        return out

    def full_state(self, optimizer, names: dict[int, str]):
        params, moments, steps = {}, {}, {}
        for e in self.engines:
            p, m, s = e.full_state(optimizer, names)
            params.update(p)
            moments.update(m)
            steps.update(s)
        return params, moments, steps

    def load_state(self, optimizer, names: dict[int, str], params, moments, steps) -> None:
        for e in self.engines:
            e.load_state(optimizer, names, params, moments, steps)
