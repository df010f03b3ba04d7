"""Data parallelism: gradients reduced in buckets by hooks that fire during backward.

Every data-parallel rank holds the whole model and computes gradients on its own rows of the global
batch; before the optimizer step the gradients are summed over the ranks (the trainer divides the
loss by the global token count, so the sum is exactly the single-process gradient).

Reducing one tensor at a time costs a latency per parameter; reducing everything after backward
leaves the network idle during backward. So, as PyTorch DDP does (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training"), parameters are grouped into
buckets of about `bucket_mb` megabytes, in reverse order of definition (roughly the order in which
backward produces their gradients). A hook fires when a parameter's gradient has been accumulated;
when a bucket is complete it is flattened and all-reduced asynchronously, while backward goes on
with the earlier layers. `finish()` waits for the handles and writes the sums back into `.grad`.

Buckets are launched strictly in index order (a complete bucket waits for the ones before it), so
every rank issues the same collectives in the same order even if hooks fire in a different order.
Micro-batches that only accumulate run under `no_sync()` and send nothing.

On GPUs the communication runs on its own stream. An `async_op=True` NCCL collective is queued on
NCCL's internal stream after an event on the compute stream (so it starts once the bucket has been
flattened), and runs while the compute stream goes on with backward; `Work.wait()` in `finish()` makes
the compute stream wait for it, not the host. Nothing between the launch and the optimizer
synchronises the host with a stream, so the host keeps queueing backward kernels while buckets are
in flight. (The meter's times are host times: on a GPU they measure launching and waiting to launch.)

Payload per step is Psi gradient elements; a ring all-reduce moves 2(N-1)/N * Psi elements per rank
(`ring_all_reduce_bytes`).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from ..comm import CommMeter


def is_tp_shard(p: torch.nn.Parameter) -> bool:
    """Whether p holds a tensor-parallel slice (else it is replicated over the tp ranks)."""
    return shard_axis(p) == "tp"


def shard_axis(p: torch.nn.Parameter) -> str | None:
    """The mesh axis over which p is split ('tp', 'ep'), or None when every rank holds all of it."""
    shard = getattr(p, "meshlm_shard", None)
    return shard.axis if shard is not None else None


def ring_all_reduce_bytes(payload_bytes: int, world: int) -> float:
    """Bytes one rank sends (and receives) in a ring all-reduce of `payload_bytes`: 2(N-1)/N of it."""
    return 2 * (world - 1) / world * payload_bytes


class BucketHooks:
    """Calls `self._launch(i)` for bucket i once every gradient in it has been accumulated.

    Buckets are launched strictly in index order (a complete bucket waits for the ones before it),
    so every rank issues the same collectives in the same order. Shared by the data-parallel
    reducer below and by ZeRO (parallel/zero.py), whose buckets are its flat parameter groups.
    """

    def __init__(self, buckets: list[list[torch.nn.Parameter]]):
        self.bucket_params = buckets
        self.bucket_of = {p: i for i, b in enumerate(buckets) for p in b}
        self.ready = [0] * len(buckets)
        self.launched_by_hook = [False] * len(buckets)
        self.next_launch = 0
        self.sync = True
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.bucket_of]

    def _launch(self, i: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (micro-batches before the last); nothing is sent."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self.sync:
            return
        self.ready[self.bucket_of[p]] += 1
        while self.next_launch < len(self.bucket_params):
            i = self.next_launch
            if self.ready[i] < len(self.bucket_params[i]):
                break
            self.launched_by_hook[i] = True
            self._launch(i)
            self.next_launch += 1

    def launch_rest(self) -> None:
        """Launch the buckets the hooks did not (parameters that got no gradient), then reset the counts."""
        for i in range(self.next_launch, len(self.bucket_params)):
            self.launched_by_hook[i] = False
            self._launch(i)
        self.ready = [0] * len(self.bucket_params)
        self.next_launch = 0

    def overlapped(self) -> int:
        """How many buckets of the last backward were launched by hooks, i.e. during backward."""
        return sum(self.launched_by_hook)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def size_buckets(params: list[torch.nn.Parameter], bucket_mb: float) -> list[list[torch.nn.Parameter]]:
    """Parameters in reverse order (roughly the order backward produces them), cut every bucket_mb MB."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb ({bucket_mb}) must be > 0")
    limit = bucket_mb * 2**20
    buckets: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in reversed([p for p in params if p.requires_grad]):
        if size >= limit:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return [b for b in buckets if b]


class GradReducer(BucketHooks):
    """Bucketed, overlapped SUM all-reduce of the gradients of `params` over `group`.

    With a compressor (parallel/compress.py) the buckets are reduced at finish() instead, since
    compressed schemes chain several dependent collectives.
    """

    def __init__(self, params: list[torch.nn.Parameter], group: dist.ProcessGroup | None, *,
                 bucket_mb: float = 25.0, reduce_dtype: torch.dtype | None = None, axis: str = "dp",
                 meter: CommMeter | None = None, compressor=None):
        super().__init__(size_buckets(params, bucket_mb))
        self.group, self.axis, self.meter = group, axis, meter
        self.reduce_dtype, self.compressor = reduce_dtype, compressor
        self.flats: list[torch.Tensor | None] = [None] * len(self.bucket_params)
        self.works: list[dist.Work | None] = [None] * len(self.bucket_params)
        self.entries: list[dict | None] = [None] * len(self.bucket_params)

    @contextlib.contextmanager
    def micro_batch(self, *, last: bool):
        """Micro-batches before the last accumulate locally and send nothing."""
        if last:
            yield
        else:
            with self.no_sync():
                yield

    def grads(self) -> list[tuple[torch.Tensor, str | None]]:
        """(gradient, the axis its parameter is split over or None) for every gradient."""
        return [(p.grad, shard_axis(p)) for b in self.bucket_params for p in b if p.grad is not None]

    def partial_grads(self) -> list[torch.Tensor]:
        """Gradients of replicated parameters that each tp rank saw only part of (to sum over tp)."""
        return [p.grad for b in self.bucket_params for p in b
                if getattr(p, "meshlm_tp_partial", False) and p.grad is not None]

    def after_step(self) -> None:
        """Nothing to do: every rank updated its whole replica."""

    def _launch(self, i: int) -> None:
        if self.compressor is not None or self.group is None:
            return
        params = self.bucket_params[i]
        dtype = self.reduce_dtype or params[0].dtype
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
        self.flats[i] = flat
        if self.meter is not None:  # the flight recorder's entry stays open until finish() has waited
            self.entries[i] = self.meter.begin("all_reduce", self.axis, flat.numel() * flat.element_size(),
                                               group=self.group, shape=tuple(flat.shape))
        self.works[i] = dist.all_reduce(flat, group=self.group, async_op=True)

    def finish(self) -> None:
        """Launch what the hooks did not, wait, and write the sums into .grad."""
        if self.group is None:
            return
        self.launch_rest()
        wait_start = time.perf_counter()
        for i, params in enumerate(self.bucket_params):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if self.compressor is not None:
                self.compressor.reduce_([p.grad for p in params], self.group, key=f"bucket{i}", meter=self.meter)
                continue
            self.works[i].wait()
            if self.entries[i] is not None:
                self.meter.end(self.entries[i], seconds=0.0)  # its waiting is counted as all_reduce_wait
                self.entries[i] = None
            unflatten_into([p.grad for p in params], self.flats[i])
            self.flats[i], self.works[i] = None, None
        if self.meter is not None and self.compressor is None:
            # the time the step spent blocked on communication that backward did not hide
            self.meter.record("all_reduce_wait", self.axis, 0, time.perf_counter() - wait_start)


def unflatten_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive pieces of `flat` into `tensors` (casting to their dtype)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


class ReducerSet:
    """Several gradient reducers acting as one, for parameters replicated over different axes.

    A mixture-of-experts model under expert parallelism has two kinds: dense parameters, replicated
    over (dp, ep, cp), and expert weights, replicated over (dp, cp) only (layout.py); each kind gets a
    GradReducer over its own group.
    """

    def __init__(self, reducers: list[GradReducer]):
        self.reducers = reducers

    @contextlib.contextmanager
    def micro_batch(self, *, last: bool):
        with contextlib.ExitStack() as stack:
            for r in self.reducers:
                stack.enter_context(r.micro_batch(last=last))
            yield

    @contextlib.contextmanager
    def no_sync(self):
        with contextlib.ExitStack() as stack:
            for r in self.reducers:
                stack.enter_context(r.no_sync())
            yield

    def finish(self) -> None:
        for r in self.reducers:
            r.finish()

    def grads(self) -> list[tuple[torch.Tensor, str | None]]:
        return [g for r in self.reducers for g in r.grads()]

    def partial_grads(self) -> list[torch.Tensor]:
        return [g for r in self.reducers for g in r.partial_grads()]

    def after_step(self) -> None:
        for r in self.reducers:
            r.after_step()

    def overlapped(self) -> int:
        return sum(r.overlapped() for r in self.reducers)
