"""Peers: PyTorch's own pipeline parallelism, `torch.distributed.pipelining`, on our model's stages.

Each rank builds the same stage our `pp` builds (a `Transformer(layers=..., pre=..., post=...)`
with global names, so the same initial weights), wraps it in a `PipelineStage` and runs torch's
schedule: ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B (v = 2 stages per rank) or
ScheduleInterleavedZeroBubble (torch's zero-bubble schedule for several stages per rank; with one
stage per rank it has none that matches ZB-H1 exactly). The loss is our summed cross-entropy over
the global token count, with torch's gradient scaling off, so the gradients are ours; a tied
embedding (GPT) is summed between the first and last stage after the schedule, as ours does.
Every pipeline rank reads the whole batch (stage 0 its tokens, the last stage its targets).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)

from ...config import ConfigError
from ...model import Transformer, init_weights, loss_sum
from ...parallel.pipeline import stage_ranges
from . import PeerTrainer


class _Stages(torch.nn.Module):
    """This rank's stage modules (global names), so decay groups and counting see every parameter."""

    def __init__(self, chunks: list[Transformer]):
        super().__init__()
        object.__setattr__(self, "chunks", chunks)
        for i, ch in enumerate(chunks):
            self.add_module(f"stage{i}", ch)


class Peer(PeerTrainer):
    name = "torch-pp"
    schedule = "1f1b"
    note = "torch.distributed.pipelining; comm bytes not counted"
    comm_coverage = "not counted: torch.distributed.pipelining sends inside its schedule"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        cfg, p = self.cfg.model, self.world
        v = 2 if self.schedule in ("interleaved", "zb") else 1
        m = self.cfg.layout.micro_batches
        if m < p:
            raise ConfigError(f"torch-pp needs micro_batches ({m}) >= pp ({p}): set --layout.micro_batches")
        self.data_rank, self.data_world = 0, 1  # every stage reads the whole batch
        n_stages = p * v
        ranges = stage_ranges(cfg, self.cfg.layout.replace(pp=p, vpp=v))
        chunks, stages = [], []
        for c in range(v):
            s = c * p + self.rank if v > 1 else self.rank
            ch = Transformer(cfg, layers=ranges[s], pre=s == 0, post=s == n_stages - 1)
            init_weights(ch, self.cfg.train.seed)
            chunks.append(ch)
            stages.append(PipelineStage(ch, s, n_stages, self.device))
        self.first = any(ch.pre for ch in chunks)
        self.last = any(ch.post for ch in chunks)
        self.tied = cfg.tie_embeddings
        ends = [0, p - 1] if v == 1 else [0, (n_stages - 1) % p]
        self.embed_group = dist.new_group(sorted(set(ends)))
        self._count = None

        def loss_fn(logits, targets):
            return loss_sum(logits, targets)[0] / self._count

        if v == 1:
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self.schedule]
            self.pipe = cls(stages[0], m, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = {"interleaved": ScheduleInterleaved1F1B, "zb": ScheduleInterleavedZeroBubble}[self.schedule]
            self.pipe = cls(stages, m, loss_fn=loss_fn, scale_grads=False)
        stages_module = _Stages(chunks)
        self.model = stages_module  # the optimizer and the counting see this rank's stages
        return stages_module

    def no_sync(self):
        return contextlib.nullcontext()

    def step(self) -> float:
        t = self.cfg.train
        micro, self._count = self.begin_step()  # the schedule splits the batch itself: use it whole
        x, y = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
        self.model.train()
        losses: list[torch.Tensor] = []  # the last stage's per-micro-batch losses, as the schedule returns them
        if self.first and self.last:
            self.pipe.step(x, target=y, losses=losses)
        elif self.first:
            self.pipe.step(x)
        elif self.last:
            self.pipe.step(target=y, losses=losses)
        else:
            self.pipe.step()
        emb = [ch.tok_emb for ch in self.model.chunks if hasattr(ch, "tok_emb")]
        if self.tied and emb and dist.get_world_size(self.embed_group) > 1:
            g = emb[0].grad if emb[0].grad is not None else torch.zeros_like(emb[0])
            dist.all_reduce(g, group=self.embed_group)
            emb[0].grad = g
        total = sum((loss.detach() for loss in losses), torch.zeros(())) * self._count
        dist.all_reduce(total)  # only the last stage has it
        if t.grad_clip > 0:
            self.clip(t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_num += 1
        return (total / self._count).item()

    def clip(self, max_norm: float) -> None:
        """Global norm over the stages (disjoint parameters; the tied embedding's second copy not counted)."""
        grads = []
        for ch in self.model.chunks:
            for n, p in ch.named_parameters():
                if p.grad is not None and not (n == "tok_emb" and not ch.pre):
                    grads.append(p.grad)
        sq = torch.zeros(())
        for g in grads:
            sq += g.float().pow(2).sum()
        dist.all_reduce(sq)
        scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)


class GPipe(Peer):
    name, schedule = "torch-pp-gpipe", "gpipe"


class OneFOneB(Peer):
    name, schedule = "torch-pp-1f1b", "1f1b"


class Interleaved(Peer):
    name, schedule = "torch-pp-interleaved", "interleaved"


class ZeroBubble(Peer):
    name, schedule = "torch-pp-zb", "zb"
