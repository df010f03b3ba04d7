"""Peer: PyTorch's own tensor parallelism, DTensor `parallelize_module` on our model's blocks.

Each block gets ColwiseParallel on the q/k/v projections and the MLP's up/gate projections and
RowwiseParallel on the attention output and MLP down projections: the Megatron split (Shoeybi et
al. 2019) as torchtitan applies it. Every rank sees the same batch (tp does not split the batch).

What differs from our `tp`, on purpose kept simple: the embedding and the output head stay
replicated here (ours splits the vocabulary and uses a vocabulary-parallel cross-entropy), so this
peer computes the head whole on every rank and sends no bytes for it; and it runs without sequence
parallelism (our `tp-sp` is compared with it as it is).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ...config import ConfigError
from . import PeerTrainer


class Peer(PeerTrainer):
    name = "torch-tp"
    note = "torch-tp: blocks split by DTensor parallelize_module; embedding and head replicated"
    comm_coverage = "not counted: DTensor's collectives run inside its operators"
    foreach = False  # AdamW's foreach kernels refuse a mix of DTensor and plain parameters

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        cfg, tp = self.cfg.model, self.world
        if cfg.n_heads % tp or cfg.kv_heads % tp:
            raise ConfigError(f"torch-tp needs tp ({tp}) to divide n_heads ({cfg.n_heads}) "
                              f"and n_kv_heads ({cfg.kv_heads})")
        self.data_rank, self.data_world = 0, 1  # every tp rank reads the whole batch
        mesh = init_device_mesh(self.device.type, (tp,))
        for block in model.layers.values():
            plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
                    "attn.wo": RowwiseParallel(), "mlp.w1": ColwiseParallel(), "mlp.w2": RowwiseParallel()}
            if cfg.activation == "swiglu":
                plan["mlp.w3"] = ColwiseParallel()
            parallelize_module(block, mesh, plan)
            block.attn.n_heads //= tp  # our attention reshapes by its local head counts
            block.attn.n_kv //= tp
        return model

    def clip(self, max_norm: float) -> None:
        """Global norm over DTensor shards (summed over tp) and replicated tensors (counted once)."""
        sharded = torch.zeros(())
        replicated = torch.zeros(())
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for g in grads:
            if isinstance(g, DTensor):
                local = g.to_local().float().pow(2).sum()
                if any(isinstance(pl, Shard) for pl in g.placements):
                    sharded += local
                else:
                    replicated += local
            else:
                replicated += g.float().pow(2).sum()
        dist.all_reduce(sharded)
        scale = (max_norm / ((sharded + replicated).sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale)

    def no_sync(self):
        return contextlib.nullcontext()  # nothing to sync over data: tp reduces inside forward/backward
