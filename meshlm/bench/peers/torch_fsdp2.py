"""Peer: FSDP2, `torch.distributed.fsdp.fully_shard` on every block and then the root.

Parameters, gradients and AdamW states are sharded over the ranks along dim 0 (each parameter a
DTensor holding 1/W of it), as ZeRO-3 does (Rajbhandari et al. 2020). Each block's parameters are
all-gathered before its forward, freed after it (`reshard_after_forward=True`), all-gathered again
for its backward, and its gradients reduce-scattered. The root (embeddings, final norm) is
gathered once per forward/backward pair: FSDP2 keeps the root unsharded after forward, because
backward would need it at once.

Communication is counted from that schedule, not measured (FSDP2 has no hook for it); payload
bytes per step, in the convention of our CommMeter (the full, unsharded tensor):

    all_gather      = micro_batches * (2 * Psi_blocks + Psi_root) * 4
    reduce_scatter  = Psi * 4                       (once: no sync on accumulation micro-batches)

which is the textbook 3 * Psi * 4 per step less one gather of the root.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from . import PeerTrainer


class Peer(PeerTrainer):
    name = "torch-fsdp2"
    note = ("FSDP2 comm bytes are analytical (all_gather 2*Psi_blocks + Psi_root, reduce_scatter Psi, "
            "x4 bytes; ~3*Psi*4 per step), not measured")
    comm_coverage = "bytes analytical; not timed (FSDP2 has no hook for its collectives)"
    reshard = True
    """reshard_after_forward: True frees each block's parameters after its forward (ZeRO-3-like);
    False keeps them gathered until after backward (ZeRO-2-like: gathered once per micro-batch)."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        mesh = init_device_mesh(self.device.type, (self.world,))
        block_params = sum(p.numel() for b in model.layers.values() for p in b.parameters())
        all_params = sum(p.numel() for p in model.parameters())
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard)
        elem = 4  # fp32 parameters (bf16 runs autocast; the parameters and their gradients stay fp32)
        m = self.cfg.layout.micro_batches
        self._analytic = {}
        if self.world > 1:
            gathered = 2 * block_params + (all_params - block_params) if self.reshard else all_params
            self._analytic = {"all_gather/dp": float(m * gathered * elem),
                              "reduce_scatter/dp": float(all_params * elem)}
        return model

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def comm_bytes_per_step(self) -> dict[str, float]:
        return {**self._analytic, **super().comm_bytes_per_step()}  # + the measured loss all-reduce
