"""Peer: torch.nn.parallel.DistributedDataParallel around our model.

DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training")
does what our `dp` does: gradients in buckets of `train.bucket_mb`, each all-reduced as soon as it
is complete during backward. A communication hook counts each bucket's payload and then runs DDP's
default all-reduce, so the bytes are measured, not derived. Buffers are not broadcast on every
forward (`forward_sync_buffers=False`): ours are constant (RoPE tables), and our trainer does not
send them either.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from . import PeerTrainer


def _counting_allreduce(meter, bucket):
    buf = bucket.buffer()
    meter.record("all_reduce", "dp", buf.numel() * buf.element_size(), 0.0)
    return default_hooks.allreduce_hook(None, bucket)  # divide by world, all-reduce: DDP's default


class Peer(PeerTrainer):
    name = "torch-ddp"
    note = "DDP comm bytes counted by a comm hook (bucket payload per step)"
    comm_coverage = "bytes by a comm hook; not timed (DDP overlaps its all-reduces inside backward)"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                      bucket_cap_mb=self.cfg.train.bucket_mb, forward_sync_buffers=False)
        ddp.register_comm_hook(self.meter, _counting_allreduce)
        return ddp

    def no_sync(self):
        return self.module.no_sync()
