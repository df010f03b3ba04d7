"""PyTorch's own data parallelism, run on exactly our training math: the peers our strategies are measured against.

A peer takes our model (`build_model`, same seed: the same initial weights), our optimizer
(`make_optimizer(decay_groups(...))`: AdamW, decay on matrices only), our schedule (`lr_at`), our batches
(`lm_batch`/`mlm_batch`, this rank's rows of the global batch) and our loss (`loss_sum`), and lets
PyTorch spread the work. `PeerTrainer` is the step; each adapter module (`torch_ddp`,
`torch_fsdp2`) only wraps the model, says how to skip gradient sync on accumulation micro-batches,
and counts its communication. Adapters are imported by name, only when a bench asks for them.

Normalisation. Our trainer divides each rank's *summed* loss by the token count of the *global*
batch and SUM-reduces gradients, so the result is the single-process gradient. DDP and FSDP2
AVERAGE gradients over the W ranks, so a peer scales its local loss by W:

    grad = 1/W * sum_r d(W * loss_sum_r / n_global) = sum_r d(loss_sum_r / n_global)

With W a power of two the scaling is exact in floating point, and the loss curves equal ours to
rounding (the bench reports the largest difference).
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.distributed as dist

from ... import data as data_mod
from ...comm import CommMeter
from ...model import build_model, loss_sum
from ...settings import RunConfig
from ...train.trainer import decay_groups, lr_at, make_optimizer


class PeerTrainer:
    """One rank of a PyTorch-parallel run of our model; `step()` mirrors `Trainer.step`."""

    name = "peer"
    note = ""
    foreach = True
    """AdamW's multi-tensor kernels (off for peers that mix DTensor and plain parameters)."""
    comm_coverage = "bytes only: the peer's collectives are not timed"
    """What the row's communication figures cover ('measured': bytes and seconds, as ours)."""

    def __init__(self, cfg: RunConfig, *, dataset: "data_mod.TokenDataset", device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # data-parallel peers split the batch and average gradients; a tensor-parallel one does neither
        self.data_rank, self.data_world = self.rank, self.world
        self.is_bert = cfg.model.family == "bert"
        self.meter = CommMeter()
        self.step_num = 0
        self.model = build_model(cfg.model, seed=cfg.train.seed, device=device)  # the whole model, every rank
        self.module = self.wrap(self.model)  # what forward is called on
        # after wrapping: FSDP2 swaps in sharded parameters (same names, so the same decay groups)
        self.optimizer = make_optimizer(decay_groups(self.model, cfg.train.weight_decay), cfg, foreach=self.foreach)

    # what an adapter provides ------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context in which backward accumulates gradients locally without communicating."""
        raise NotImplementedError

    def comm_bytes_per_step(self) -> dict[str, float]:
        """Payload bytes per step by 'op/axis' (the same convention as our CommMeter)."""
        steps = max(1, self.step_num)
        return {k: v["bytes"] / steps for k, v in self.meter.summary().items()}

    # the step ----------------------------------------------------------------------------------
    def batch(self, step: int):
        """This rank's rows of the global batch of `step`, exactly as Trainer.batch draws them."""
        t, d = self.cfg.train, self.dataset
        kw = dict(step=step, seq_len=t.seq_len, global_batch=t.batch_size, data_rank=self.data_rank,
                  data_world=self.data_world, seed=t.seed)
        if self.is_bert:
            x, y, types = data_mod.mlm_batch(d.train, cls_id=d.cls_id, sep_id=d.sep_id, mask_id=d.mask_id,
                                             vocab_size=d.vocab_size, **kw)
            return x.to(self.device), y.to(self.device), types.to(self.device)
        x, y = data_mod.lm_batch(d.train, **kw)
        return x.to(self.device), y.to(self.device), None

    def _all_reduce(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        dist.all_reduce(t)
        self.meter.record("all_reduce", "data", nbytes, 0.0)

    def begin_step(self):
        """Set this step's learning rate; return this rank's batch, split into micro-batches
        [(x, y, token_types)], and the token count of the global batch (as Trainer counts it)."""
        t = self.cfg.train
        lr = lr_at(self.step_num, lr=t.lr, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, types = self.batch(self.step_num)
        count = (y != -100).sum().float()
        if self.is_bert and self.data_world > 1:
            self._all_reduce(count)
        elif not self.is_bert:
            count.fill_(t.batch_size * t.seq_len)
        n = self.cfg.layout.micro_batches
        micro = list(zip(x.chunk(n), y.chunk(n), types.chunk(n) if types is not None else [None] * n))
        return micro, count

    def step(self) -> float:
        """One optimizer step on the global batch; returns its mean loss (the same on every rank)."""
        micro, count = self.begin_step()
        self.module.train()
        total = torch.zeros((), device=self.device)
        n_micro = len(micro)
        for i, (xm, ym, tm) in enumerate(micro):
            sync = contextlib.nullcontext() if i == n_micro - 1 else self.no_sync()
            with sync:
                with self.autocast():
                    logits = self.module(xm, token_types=tm)
                loss, _ = loss_sum(logits, ym)
                (loss / count * self.data_world).backward()  # the peer averages over ranks: see the module doc
            total += loss.detach()
        return self.end_step(total, count)

    def end_step(self, total: torch.Tensor, count: torch.Tensor) -> float:
        """After backward: the mean loss over the data ranks, clipping, the AdamW step; returns the loss."""
        if self.data_world > 1:
            self._all_reduce(total)
        if self.cfg.train.grad_clip > 0:
            self.clip(self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_num += 1
        return (total / count).item()

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def load_peer(runner: str) -> type[PeerTrainer]:
    """The PeerTrainer subclass named by `module` (its class `Peer`) or `module:Class`, from adapter
    `meshlm.bench.peers.<module>` (imported now, not before)."""
    module_name, _, class_name = runner.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name or "Peer")
