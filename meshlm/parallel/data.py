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

Payload per step is Psi gradient elements; a ring all-reduce moves 2(N-1)/N * Psi elements per rank
(`ring_all_reduce_bytes`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..comm import CommMeter


def ring_all_reduce_bytes(payload_bytes: int, world: int) -> float:
    """Bytes one rank sends (and receives) in a ring all-reduce of `payload_bytes`: 2(N-1)/N of it."""
    return 2 * (world - 1) / world * payload_bytes


@dataclass
class Bucket:
    params: list[torch.nn.Parameter]
    ready: int = 0
    flat: torch.Tensor | None = None
    work: dist.Work | None = None
    launched_at: float = 0.0
    during_backward: bool = False
    """Whether it was launched by a hook (overlapping backward) rather than by finish()."""
    key: str = field(default="")


class GradReducer:
    """Bucketed, overlapped SUM all-reduce of the gradients of `params` over `group`."""

    def __init__(self, params: list[torch.nn.Parameter], group: dist.ProcessGroup | None, *,
                 bucket_mb: float = 25.0, reduce_dtype: torch.dtype | None = None, axis: str = "dp",
                 meter: CommMeter | None = None, compressor=None):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb ({bucket_mb}) must be > 0")
        self.group, self.axis, self.meter = group, axis, meter
        self.reduce_dtype, self.compressor = reduce_dtype, compressor
        self.sync = True
        self.buckets: list[Bucket] = []
        limit = bucket_mb * 2**20
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= limit:
                self.buckets.append(Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(Bucket(current))
        self.bucket_of: dict[torch.nn.Parameter, int] = {}
        for i, b in enumerate(self.buckets):
            b.key = f"bucket{i}"
            for p in b.params:
                self.bucket_of[p] = i
        self.next_launch = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.bucket_of]

    # --- during backward -----------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (micro-batches before the last); nothing is sent."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self.sync or self.group is None:
            return
        b = self.buckets[self.bucket_of[p]]
        b.ready += 1
        # launch every complete bucket, in order
        while self.next_launch < len(self.buckets):
            nb = self.buckets[self.next_launch]
            if nb.ready < len(nb.params):
                break
            self._launch(nb, during_backward=True)
            self.next_launch += 1

    def _launch(self, b: Bucket, *, during_backward: bool) -> None:
        b.during_backward = during_backward
        if self.compressor is not None:  # compressed reduction runs at finish() (several dependent collectives)
            return
        dtype = self.reduce_dtype or b.params[0].dtype
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        b.flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
        b.launched_at = time.perf_counter()
        b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)
        if self.meter is not None:
            self.meter.record("all_reduce", self.axis, b.flat.numel() * b.flat.element_size(), 0.0)

    # --- after backward ------------------------------------------------------------------------
    def finish(self) -> None:
        """Launch what the hooks did not (unused parameters), wait, and write the sums into .grad."""
        if self.group is None:
            return
        for b in self.buckets[self.next_launch:]:
            self._launch(b, during_backward=False)
        wait_start = time.perf_counter()
        for b in self.buckets:
            for p in b.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if self.compressor is not None:
                self.compressor.reduce_([p.grad for p in b.params], self.group, key=b.key, meter=self.meter)
                continue
            b.work.wait()
            offset = 0
            for p in b.params:
                n = p.numel()
                p.grad.copy_(b.flat[offset:offset + n].view_as(p.grad))
                offset += n
            b.flat, b.work = None, None
        if self.meter is not None and self.compressor is None:
            # time the step spent blocked on communication that backward did not hide
            self.meter.record("all_reduce_wait", self.axis, 0, time.perf_counter() - wait_start)
        for b in self.buckets:
            b.ready = 0
        self.next_launch = 0

    def overlapped(self) -> int:
        """How many buckets of the last step were launched during backward."""
        return sum(b.during_backward for b in self.buckets)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
