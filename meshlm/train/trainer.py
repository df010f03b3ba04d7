"""The training loop: one step is micro-batches of forward/backward, gradient reduction, clip, AdamW.

    batch (keyed by step, sliced by data rank) -> micro-batches -> loss_sum / global token count
    -> backward (gradients accumulate) -> all-reduce SUM over the dense-gradient axes
    -> clip by the global norm -> AdamW step on the local parameters -> metrics

Dividing each rank's summed loss by the token count of the *global* batch (not its own) makes the
summed gradients exactly the single-process gradients, for any split over ranks and micro-batches,
also for BERT, whose masked-token counts differ between rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import data as data_mod
from ..comm import CommMeter, all_reduce_, span
from ..config import ConfigError, flops_per_token, param_count
from ..hardware import peak_flops
from ..layout import DATA_AXES, DENSE_GRAD_AXES, EXPERT_GRAD_AXES, require_implemented, validate
from ..mesh import Mesh
from ..model import Transformer, build_model
from ..parallel.tensor import gather_from_tp, sum_over_tp_
from ..parallel.compress import make_compressor
from ..parallel.data import GradReducer, ReducerSet
from ..parallel.expert import collect_stats, is_expert, set_batch_sequences, set_grad_scale
from ..parallel.pipeline import Pipeline, PipelineStages
from ..parallel.ps import ParameterServer, parse_ps_ranks
from ..parallel.zero import ZeroEngine, ZeroSet, wants_decay
from ..settings import RunConfig
from . import checkpoint
from .metrics import MetricsLog, fmt_count
from .profile import StepProfiler
from .precision import LossScaler, autocast_dtype, check_precision, needs_loss_scaling
from .compiled import apply_compile, wants_compile
from .recompute import apply_recompute


# --- process set-up -----------------------------------------------------------------------------


def init_distributed(device_kind: str, *, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the torchrun job this process belongs to (if any); return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device ('cuda') but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend, timeout = "nccl" if use_cuda else "gloo", timedelta(seconds=timeout_s)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        from ..launch import slow_join_warning
        waiting = slow_join_warning(world)  # says, after a while, where this rank waits for the others
        if attempt != "0" and "MASTER_ADDR" in os.environ:
            # After an elastic restart the launcher's store still holds the previous attempt's keys; a rank
            # that read a dead peer's address from them would fail to connect. Use this attempt's own keys.
            rank = int(os.environ["RANK"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=rank == 0 and not agent_store, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"meshlm/attempt{attempt}", store),
                                    rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        waiting.cancel()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def set_threads(threads: int) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))


# --- learning rate ------------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine decay to lr*min_ratio at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(param_groups: list[dict], cfg: RunConfig, *, foreach: bool = True) -> torch.optim.AdamW | None:
    """AdamW over the given groups; None when this rank owns no parameters (a parameter-server worker).

    Fused (one CUDA kernel updates every tensor: no per-parameter launches, and its step counts live on
    the GPU, so no host synchronisation) when every parameter is a CUDA floating-point tensor, as are the
    flat shards of ZeRO and the parameter server; for-each (a few kernels per group of tensors) otherwise.
    """
    groups = [g for g in param_groups if g["params"]]
    if not groups:
        return None
    t = cfg.train
    kind = {"fused": True} if can_fuse([p for g in groups for p in g["params"]]) else {"foreach": foreach}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), **kind)


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether fused AdamW takes these parameters: all CUDA and floating point (we fuse on GPUs only)."""
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def place_optimizer_steps(optimizer: torch.optim.Optimizer | None) -> None:
    """Put each parameter's AdamW step count where the optimizer reads it after a checkpoint load: on the
    parameter's device for the fused kernel, on the host for the for-each one (which computes its bias
    corrections there, without waiting for the GPU)."""
    if optimizer is None:
        return
    fused = any(g.get("fused") for g in optimizer.param_groups)
    for p, state in optimizer.state.items():
        if "step" in state:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device if fused else "cpu")


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases, norms or embeddings, as GPT-2/nanoGPT do."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if wants_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not wants_decay(n, p)], "weight_decay": 0.0}]


SPLIT_AXES = ("tp", "ep")
"""Axes over which a parameter may be split (a tensor-parallel slice, a rank's experts)."""


def global_grad_norm(grads: list[tuple[torch.Tensor, str | None]], group: dist.ProcessGroup | None,
                     mesh: Mesh, *, device: torch.device | str = "cpu",
                     meter: CommMeter | None = None) -> torch.Tensor:
    """L2 norm of the gradient of the whole model, every parameter counted once.

    `grads` are (tensor, the axis its parameter is split over or None) for what this rank owns: every
    gradient under plain data parallelism (replicated over dp: group None), or this rank's shards under
    ZeRO and the parameter server (disjoint over dp: squares summed over `group`). Over tp and ep, the
    squares of slices are summed and replicated tensors, identical on every rank of the axis, are
    counted once (each rank adds 1/size of their square). Pipeline stages hold disjoint parameters:
    their squares are summed over pp. `device`: where the sum lives (the training device: NCCL reduces CUDA
    tensors, and the norm stays there, read by the host only when metrics are logged).
    """
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g, axis in grads:
        copies = 1
        for a in SPLIT_AXES:
            copies *= 1 if a == axis else mesh.size(a)
        sq = sq + g.float().pow(2).sum() / copies
    for axis, grp in (("tp", mesh.group("tp")), ("ep", mesh.group("ep")), ("dp", group), ("pp", mesh.group("pp"))):
        all_reduce_(sq, grp, axis=axis, meter=meter)
    return sq.sqrt()


# --- the trainer --------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one step produced. The loss and the gradient norm stay 0-d tensors on the device: reading
    `loss` or `grad_norm` (floats) waits for the step to finish, a host synchronisation that the training
    loop makes only when it logs (train.log_every), so on a GPU the host queues the next steps meanwhile."""

    loss_tensor: torch.Tensor
    grad_norm_tensor: torch.Tensor
    lr: float
    seconds: float
    """Host seconds of `step()`: on CPU the step's time; on a GPU the time to queue it (see train.log_every)."""
    skipped: bool = False
    """fp16: the gradients overflowed, so the optimizer step was skipped (and the loss scale lowered)."""

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_tensor)


class Trainer:
    """Holds the model shard, optimizer and data of one rank, and runs steps.

    How gradients get from backward to the optimizer is the job of `self.sync`, one of
    GradReducer (data parallelism, or one process), ZeroEngine (ZeRO 1-3) or ParameterServer, or
    ReducerSet / ZeroSet of two (dense and expert weights are replicated over different ranks);
    they share one small interface: micro_batch(last=) around each backward, finish() after the
    last, grads() (what this rank owns), after_step(), full_state()/load_state() for checkpoints.
    """

    def __init__(self, cfg: RunConfig, *, mesh: Mesh, device: torch.device, dataset: "data_mod.TokenDataset"):
        self.cfg, self.mesh, self.device, self.dataset = cfg, mesh, device, dataset
        self.meter = CommMeter(recording=cfg.train.flight_recorder)
        self.pipeline = None
        if cfg.layout.pp > 1:  # this rank's pipeline stages, and the executor of the schedule
            self.model = PipelineStages(cfg.model, mesh=mesh, meter=self.meter, seed=cfg.train.seed, device=device)
            self.pipeline = Pipeline(self.model, group=mesh.group("pp"), schedule=cfg.layout.schedule,
                                     micro_batches=cfg.layout.micro_batches, meter=self.meter,
                                     embed_group=mesh.embed_group if cfg.model.tie_embeddings else None)
        else:
            self.model: Transformer = build_model(cfg.model, mesh=mesh, seed=cfg.train.seed, device=device,
                                                  meter=self.meter)
        check_precision(cfg.train.precision, device)
        self.scaler = LossScaler(enabled=needs_loss_scaling(cfg.train.precision))
        # tp x (dp, ep, cp) x pp spans every axis: a MAX over these reaches every rank of the job
        self.scale_groups = [mesh.group("tp"), mesh.group(DENSE_GRAD_AXES), mesh.group("pp")]
        torch.manual_seed(cfg.train.seed)  # dropout: the same masks on every rank of a replicated region
        self.recomputed = apply_recompute(self.model, cfg.train.recompute)
        self.compiled = 0
        """Blocks compiled by torch.compile (train.compile): after tensor parallelism and recomputation, before
        the gradient hooks, as torchtitan orders them."""
        if wants_compile(cfg.train.compile, device_type=device.type, model=cfg.model, layout=cfg.layout):
            self.compiled = apply_compile(self.model)
            if mesh.rank == 0:
                print(f"meshlm: applied torch.compile to {self.compiled} blocks", flush=True)
        self.names = {id(p): n for n, p in self.model.named_parameters()}
        self.shapes = {n: p.meshlm_init_shape for n, p in self.model.named_parameters()}
        t = cfg.train
        dp_group = mesh.group(DENSE_GRAD_AXES)
        self.norm_group = None
        if cfg.layout.zero:
            zero = lambda group, axis, select=None: ZeroEngine(  # noqa: E731
                self.model, group, stage=cfg.layout.zero, meter=self.meter, axis=axis, select=select)
            if mesh.size("ep") > 1:  # each kind sharded over the ranks that replicate it (norm: see ZeroSet)
                self.sync = ZeroSet([zero(dp_group, "dp", lambda p: not is_expert(p)),
                                     zero(mesh.group(EXPERT_GRAD_AXES), "dp_experts", is_expert)])
            else:
                self.sync = zero(dp_group, "dp")
            groups = self.sync.param_groups(t.weight_decay)
            self.norm_group = dp_group
        elif t.grad_sync == "ps" and dp_group is not None:
            for axis in ("ep", "pp"):
                if mesh.size(axis) > 1:
                    raise ConfigError(f"train.grad_sync ('ps') with {axis} ({mesh.size(axis)}) is not implemented; "
                                      "use grad_sync 'allreduce'")
            servers = parse_ps_ranks(t.ps_ranks, mesh.size(DENSE_GRAD_AXES))
            self.sync = ParameterServer(self.model, dp_group, servers=servers, meter=self.meter)
            groups = self.sync.param_groups(t.weight_decay)
            self.norm_group = dp_group
        else:
            params = list(self.model.parameters())
            reducer = lambda ps, group, axis: GradReducer(  # noqa: E731
                ps, group, bucket_mb=t.bucket_mb, meter=self.meter, axis=axis,
                reduce_dtype=torch.float32 if t.reduce_fp32 else None,
                compressor=make_compressor(t.compression, axis=axis))
            if mesh.size("ep") > 1:  # expert weights are replicated over fewer ranks than the rest
                self.sync = ReducerSet([reducer([p for p in params if not is_expert(p)], dp_group, "dp"),
                                        reducer([p for p in params if is_expert(p)],
                                                mesh.group(EXPERT_GRAD_AXES), "dp_experts")])
            else:
                self.sync = reducer(params, dp_group, "dp")
            groups = decay_groups(self.model, t.weight_decay)
        set_batch_sequences(self.model, t.batch_size)  # MoE auxiliary losses: means over the global batch
        self._moe_counts: tuple[torch.Tensor, int] | None = None  # the last step's routing, still on the device
        self.optimizer = make_optimizer(groups, cfg)
        self.writer = checkpoint.BackgroundWriter()
        self.step_num = 0
        self.is_bert = cfg.model.family == "bert"

    # data ----------------------------------------------------------------------------------------
    def batch(self, tokens, step: int, *, seed: int, batch_size: int | None = None):
        """This rank's rows of the global batch of `step`: (inputs, targets, token_types or None)."""
        t, m = self.cfg.train, self.mesh
        kw = dict(step=step, seq_len=t.seq_len, global_batch=batch_size or t.batch_size,
                  data_rank=m.data_rank, data_world=m.layout.data_world, seed=seed)
        if self.is_bert:
            d = self.dataset
            x, y, types = data_mod.mlm_batch(tokens, cls_id=d.cls_id, sep_id=d.sep_id, mask_id=d.mask_id,
                                             vocab_size=d.vocab_size, **kw)
            return data_mod.to_device((x, y, types), self.device)  # pinned and asynchronous on CUDA
        x, y = data_mod.lm_batch(tokens, **kw)
        return (*data_mod.to_device((x, y), self.device), None)

    def autocast(self):
        """bf16 / fp16: the matmuls in 16 bits, the parameters and optimizer states stay fp32."""
        dtype = autocast_dtype(self.cfg.train.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # one step ------------------------------------------------------------------------------------
    def compute_gradients(self, step: int) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches of `step`, then reduce the gradients.

        Afterwards every parameter's .grad holds the gradient of the global-batch mean loss; returns
        that mean loss (a 0-d tensor, the same on every rank).
        """
        cfg, mesh = self.cfg, self.mesh
        x, y, types = self.batch(self.dataset.train, step, seed=cfg.train.seed)
        # Token count of the global batch: static for causal LM, reduced over the data ranks for BERT.
        count = (y != -100).sum().float()
        if self.is_bert:
            all_reduce_(count, mesh.group(DATA_AXES), axis="data", meter=self.meter)
        else:
            count.fill_(cfg.train.batch_size * cfg.train.seq_len)
        x, y, types = self.split_sequence(x, y, types)  # context parallelism: this rank's part of each row

        self.model.train()
        set_grad_scale(self.model, self.scaler.loss_multiplier())
        seed = count / self.scaler.loss_multiplier()  # fp16: the loss is scaled up before backward
        total = torch.zeros((), device=self.device)
        n_micro = cfg.layout.micro_batches
        micro = zip(x.chunk(n_micro), y.chunk(n_micro),
                    types.chunk(n_micro) if types is not None else [None] * n_micro)
        if self.pipeline is not None:
            return self._pipeline_gradients(list(micro), count)
        for i, (xm, ym, tm) in enumerate(micro):
            with self.sync.micro_batch(last=i == n_micro - 1):
                with self.autocast():
                    logits = self.model(xm, token_types=tm)
                loss, _ = self.model.loss_sum(logits, ym)
                (loss / seed).backward()  # gradient buckets are sent as they complete
            total += loss.detach()
        self.sync.finish()
        sum_over_tp_(self.sync.partial_grads(), self.model.tp)  # replicated parameters seen in part per tp rank
        all_reduce_(total, mesh.group(DATA_AXES), axis="data", meter=self.meter)
        all_reduce_(total, mesh.group("cp"), axis="cp", meter=self.meter)
        return total / count

    def split_sequence(self, *tensors):
        """Under context parallelism, this rank's part (`CP.split`) of each (B, T) tensor (None stays None)."""
        cp = self.model.cp
        return tuple(cp.split(t) if t is not None else None for t in tensors)

    def _pipeline_gradients(self, micro: list, count: torch.Tensor) -> torch.Tensor:
        """The schedule runs every micro-batch's forward and backward; gradients are reduced after it."""
        mesh = self.mesh
        no_sync = self.sync.no_sync() if hasattr(self.sync, "no_sync") else contextlib.nullcontext()
        with no_sync:  # data-parallel reduction once, after the schedule
            total = self.pipeline.run(micro, count / self.scaler.loss_multiplier(), autocast=self.autocast)
        self.pipeline.sum_tied_embedding()  # on the whole gradients: ZeRO's finish() moves them into shards
        self.sync.finish()
        sum_over_tp_(self.sync.partial_grads(), self.model.tp)
        all_reduce_(total, mesh.group("pp"), axis="pp", meter=self.meter)  # the last stage has the loss
        all_reduce_(total, mesh.group(DATA_AXES), axis="data", meter=self.meter)
        all_reduce_(total, mesh.group("cp"), axis="cp", meter=self.meter)
        return total / count

    def _norm_grads(self) -> list[tuple[torch.Tensor, bool]]:
        """What this rank contributes to the global norm: its gradients, less the second copy of a tied
        embedding (held by the last pipeline stage; the first stage counts it)."""
        m = self.model
        skip = [m.tok_emb] if self.pipeline is not None and hasattr(m, "tok_emb") and not m.holds_embedding else []
        if hasattr(self.sync, "grads_except"):  # ZeRO: shards of flat buffers; the copy's elements zeroed
            return self.sync.grads_except(skip)
        return [(g, s) for g, s in self.sync.grads() if not any(g is p.grad for p in skip)]

    def step(self) -> StepResult:
        """One optimizer step: gradients of the global batch, clip by the global norm, AdamW.

        No host synchronisation (no `.item()`): the loss and the norm come back as device tensors, the
        clip is a tensor multiply, fused AdamW keeps its step counts on the GPU, and the batch is copied
        from pinned memory without blocking; so on a GPU the host runs ahead and queues the next step
        while this one computes. Two exceptions, by nature: fp16 (the skip decision on an overflow is a
        host branch, one synchronisation per step; bf16 has none) and mixture-of-experts dispatch (the
        all-to-all's split sizes are token counts the host must know).
        """
        cfg = self.cfg
        start = time.perf_counter()
        lr = lr_at(self.step_num, lr=cfg.train.lr, warmup=cfg.train.warmup_steps, total=cfg.train.steps,
                   min_ratio=cfg.train.min_lr_ratio)
        collect_stats(self.model)  # routing counters from here on belong to this step
        a2a_before = self._a2a_bytes()
        loss = self.compute_gradients(self.step_num)
        self._moe_counts = self._moe_step_counts(a2a_before)
        grads = self.sync.grads()
        # fp16: back to true gradients, and every rank skips the step if any rank overflowed
        skipped = self.scaler.unscale_and_check([g for g, _ in grads], self.scale_groups, device=self.device,
                                                meter=self.meter)
        self.scaler.update(skipped)
        norm = global_grad_norm(self._norm_grads(), self.norm_group, self.mesh, device=self.device, meter=self.meter)
        if self.optimizer is not None and not skipped:
            if cfg.train.grad_clip > 0:  # a tensor factor: no host branch on the norm
                scale = (cfg.train.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(list({id(g): g for g, _ in grads}.values()), scale)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.sync.after_step()  # also after a skipped step: ZeRO's gathers and the servers' pulls pair up
        self.step_num += 1
        return StepResult(loss_tensor=loss.detach(), grad_norm_tensor=norm.detach(), lr=lr,
                          seconds=time.perf_counter() - start, skipped=skipped)

    def _a2a_bytes(self) -> int:
        s = self.meter.stats
        return sum(s[k].bytes for k in (("all_to_all", "ep"), ("all_to_all_counts", "ep")) if k in s)

    def _moe_step_counts(self, a2a_before: int) -> tuple[torch.Tensor, int] | None:
        """The step's routing counters, summed over this rank's MoE blocks, the data ranks and the stages
        (left on the device: `moe_metrics` reads them), and the step's all-to-all bytes."""
        stats = collect_stats(self.model)
        E = self.cfg.model.n_experts
        if not E:  # a dense model: no routing (the config says so; no collective needed to agree)
            return None
        if stats is None:  # a pipeline stage without MoE blocks still takes part in the sums
            zero = lambda *shape: torch.zeros(shape, device=self.device)  # noqa: E731
            stats = {"routed": zero(E), **{k: zero() for k in ("slots", "dropped", "balance", "z", "sequences")}}
        keys = ["routed", "slots", "dropped", "balance", "z", "sequences"]
        flat = torch.cat([stats[k].reshape(-1).float() for k in keys])
        for axes, name in ((DATA_AXES, "data"), ("cp", "cp"), ("pp", "pp")):
            all_reduce_(flat, self.mesh.group(axes), axis=name, meter=self.meter)
        return flat, self._a2a_bytes() - a2a_before

    @property
    def moe_metrics(self) -> dict[str, Any]:
        """The last step's routing figures ({} for a dense model); reading them waits for the step."""
        if self._moe_counts is None:
            return {}
        flat, a2a_bytes = self._moe_counts
        flat, E = flat.cpu(), self.cfg.model.n_experts
        routed, (slots, dropped, balance, z, seqs) = flat[:E], flat[E:].tolist()
        return {"moe_aux_loss": balance / seqs, "moe_z_loss": z / seqs, "moe_dropped": dropped / slots,
                "moe_imbalance": (routed.max() / routed.mean()).item(),
                "moe_expert_tokens": [int(v) for v in routed.tolist()],
                "moe_all_to_all_bytes": a2a_bytes}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `eval_batches` fixed validation batches (the same ones at every evaluation)."""
        cfg = self.cfg
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        for i in range(cfg.train.eval_batches):
            x, y, types = self.split_sequence(*self.batch(self.dataset.val, i, seed=cfg.train.seed + 1))
            if self.pipeline is not None:  # the loss comes out of the last stage (zero elsewhere)
                loss, n = self.pipeline.forward_only(x, y, types, autocast=self.autocast), (y != -100).sum()
            else:
                with self.autocast():
                    logits = self.model(x, token_types=types)
                loss, n = self.model.loss_sum(logits, y)
            total += torch.stack([loss, n.float()])
        if self.pipeline is not None:
            total[0:1] = all_reduce_(total[0:1].clone(), self.mesh.group("pp"), axis="pp", meter=self.meter)
        all_reduce_(total, self.mesh.group(DATA_AXES), axis="data", meter=self.meter)
        all_reduce_(total, self.mesh.group("cp"), axis="cp", meter=self.meter)
        return (total[0] / total[1]).item()

    # checkpoints ---------------------------------------------------------------------------------
    def local_state(self):
        """(params, moments, steps) by name as this rank holds them (tp/ep slices; ZeRO and the parameter
        server gather their shards over dp first, a collective)."""
        if hasattr(self.sync, "full_state"):
            return self.sync.full_state(self.optimizer, self.names)
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        moments, steps = {}, {}
        for p, st in (self.optimizer.state.items() if self.optimizer else []):
            moments[self.names[id(p)]] = (st["exp_avg"], st["exp_avg_sq"])
            steps[self.names[id(p)]] = float(st["step"])
        return params, moments, steps

    def full_state(self):
        """(params, moments, steps): whole tensors by name, whatever the layout (collective)."""
        params, moments, steps = self.local_state()
        # tensor-parallel slices: gather along the split dimension, drop the vocabulary padding
        gather = lambda n, t: self._tp_gather(n, t)  # noqa: E731
        params = {n: gather(n, t) for n, t in params.items()}
        moments = {n: (gather(n, a), gather(n, b)) for n, (a, b) in moments.items()}
        if self.pipeline is not None:  # every stage's tensors, merged (a tied embedding appears twice, equal)
            parts = [None] * self.mesh.size("pp")
            with span(self.meter, "all_gather_object", "pp", group=self.mesh.group("pp")):
                dist.all_gather_object(parts, (params, moments, steps), group=self.mesh.group("pp"))
            params, moments, steps = {}, {}, {}
            for ps, ms, ss in parts:
                params.update(ps)
                moments.update(ms)
                steps.update(ss)
        return params, moments, steps

    def _tp_gather(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor from this rank's slice: gathered over the axis it is split over, unpadded."""
        shard = self.model.get_parameter(name).meshlm_shard
        if shard is not None and shard.axis == "tp":
            t = gather_from_tp(t.detach(), self.model.tp, shard.dim)
        elif shard is not None:
            parts = [torch.empty_like(t) for _ in range(shard.parts)]
            with span(self.meter, "all_gather_state", shard.axis, t, group=self.mesh.group(shard.axis)):
                dist.all_gather(parts, t.detach().contiguous(), group=self.mesh.group(shard.axis))
            t = torch.cat(parts, dim=shard.dim)
        return t[tuple(slice(0, n) for n in self.shapes[name])]

    def _writes(self, name: str) -> bool:
        """Whether this rank writes `name`: one copy of what several ranks hold identically (the ranks at
        coordinate 0 of every axis it is replicated over; the tied embedding from the first stage)."""
        p = self.model.get_parameter(name)
        split = p.meshlm_shard.axis if p.meshlm_shard is not None else None
        replicated = ["dp", "cp"] + [a for a in ("tp", "ep") if a != split]
        if any(self.mesh.coords[a] for a in replicated):
            return False
        return not (self.pipeline is not None and name == "tok_emb" and not self.model.holds_embedding)

    def snapshot(self, out_dir: Path) -> checkpoint.Snapshot:
        """This rank's share of a checkpoint, copied off the model (a collective under ZeRO and the parameter
        server, which gather their shards over dp first); writing it needs no collective."""
        params, moments, steps = self.local_state()
        m = self.mesh
        snap = checkpoint.Snapshot(root=out_dir / "ckpt", step=self.step_num, rank=m.rank, world=m.world_size,
                                   attempt=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        for n, t in params.items():
            if not self._writes(n):
                continue
            sl, dim = checkpoint.local_slices(self.model.get_parameter(n), self.shapes[n])
            piece = (lambda x: x.narrow(dim, 0, sl[dim][1] - sl[dim][0])) if dim is not None else (lambda x: x)  # noqa: E731
            if dim is not None and sl[dim][1] <= sl[dim][0]:
                continue  # a slice of padding only
            snap.add(f"p/{n}", piece(t), shape=self.shapes[n], slices=sl)
            if n in moments:
                snap.add(f"m1/{n}", piece(moments[n][0]), shape=self.shapes[n], slices=sl)
                snap.add(f"m2/{n}", piece(moments[n][1]), shape=self.shapes[n], slices=sl)
                snap.optim_steps[n] = steps[n]
        rng = torch.get_rng_state()
        snap.add(f"rng/torch/{m.rank}", rng, shape=rng.shape)
        if m.rank == 0:
            snap.manifest = {"config": self.cfg.to_dict(), "layout": self.cfg.layout.describe(),
                             "data": {"next_step": self.step_num, "seed": self.cfg.train.seed},
                             "lr_schedule": {"step": self.step_num, "lr": self.cfg.train.lr,
                                             "warmup_steps": self.cfg.train.warmup_steps,
                                             "total_steps": self.cfg.train.steps},
                             "extra": {"loss_scaler": self.scaler.state_dict()}}
            snap.tokenizer = Path(self.dataset.path) / "tokenizer.json"
            snap.keep = self.cfg.train.keep_ckpts
        return snap

    def save(self, out_dir: Path, *, background: bool = False) -> Path | None:
        """Write a checkpoint; in the background when asked (the copy off the model is made now). Returns
        the folder on rank 0 when written in the foreground."""
        snap = self.snapshot(out_dir)
        return self.writer.submit(snap, background=background)

    def wait_for_checkpoint(self) -> Path | None:
        """Wait for a background checkpoint; then every rank knows it is published (a barrier)."""
        folder = self.writer.wait()
        if dist.is_initialized():
            with span(self.meter, "barrier", "world", group=dist.group.WORLD):
                dist.barrier()
        return folder

    def _load_local(self, params, moments, steps) -> None:
        """Install this rank's tensors (local shapes) and AdamW states."""
        if hasattr(self.sync, "load_state"):
            self.sync.load_state(self.optimizer, self.names, params, moments, steps)
        else:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(params[n])
                    if n in moments and self.optimizer is not None:
                        self.optimizer.state[p] = {"step": torch.tensor(steps[n]),
                                                   "exp_avg": moments[n][0].to(p.device),
                                                   "exp_avg_sq": moments[n][1].to(p.device)}
        place_optimizer_steps(self.optimizer)  # fused AdamW reads its step counts on the GPU

    def load_checkpoint(self, folder: Path) -> int:
        """Load any layout's checkpoint: each local parameter's rectangle read from the pieces that hold it."""
        reader = checkpoint.Reader(folder, verify=False)
        manifest = reader.manifest
        if manifest["config"]["model"] != self.cfg.to_dict()["model"]:
            diff = sorted(k for k, v in self.cfg.to_dict()["model"].items() if manifest["config"]["model"].get(k) != v)
            raise checkpoint.CheckpointError(f"checkpoint {folder} is of another model config (differs in "
                                             f"{', '.join('model.' + k for k in diff[:4])})")
        params, moments, steps = {}, {}, {}
        for n, p in self.model.named_parameters():
            key = f"p/{n}"
            if not reader.has(key):
                raise checkpoint.CheckpointError(f"checkpoint {folder}: no tensor for parameter {n}")
            if reader.shape(key) != tuple(self.shapes[n]):
                raise checkpoint.CheckpointError(f"checkpoint {folder}: {n} has shape {reader.shape(key)}, "
                                                 f"the model wants {tuple(self.shapes[n])}")
            params[n] = checkpoint.read_local(reader, key, p, self.shapes[n])
            if reader.has(f"m1/{n}") and self.optimizer is not None:
                moments[n] = tuple(checkpoint.read_local(reader, f"m{i}/{n}", p, self.shapes[n]) for i in (1, 2))
                steps[n] = manifest["optim_steps"][n]
        self._load_local(params, moments, steps)
        rng = f"rng/torch/{self.mesh.rank}"
        if manifest.get("world") == self.mesh.world_size and reader.has(rng):  # same ranks: their RNG streams
            torch.set_rng_state(reader.read(rng))
        if "loss_scaler" in manifest.get("extra", {}):
            self.scaler.load_state_dict(manifest["extra"]["loss_scaler"])
        self.step_num = manifest["step"]
        return self.step_num

    def resume(self, out_dir: Path) -> int:
        """Continue from the newest checkpoint under out_dir whose files pass their checksums."""
        say = (lambda line: print(line, flush=True)) if self.mesh.rank == 0 else (lambda line: None)  # noqa: E731
        folder = checkpoint.newest_valid(out_dir / "ckpt", report=say)
        if folder is None:
            raise checkpoint.CheckpointError(f"train.resume: no complete checkpoint in {out_dir / 'ckpt'}")
        return self.load_checkpoint(folder)


# --- the whole run ------------------------------------------------------------------------------


def write_pipeline_timeline(trainer: Trainer, out_dir: Path) -> None:
    """The last step's measured schedule, every pipeline rank's actions (seconds from its step start):
    pipeline_timeline.json, and pipeline_timeline.png when matplotlib is installed (`meshlm schedule
    --run` draws it again)."""
    parts = [None] * trainer.mesh.size("pp")
    with span(trainer.meter, "all_gather_object", "pp", group=trainer.mesh.group("pp")):
        dist.all_gather_object(parts, trainer.pipeline.records, group=trainer.mesh.group("pp"))
    if trainer.mesh.rank != 0:
        return
    records = [r for part in parts for r in part]
    (out_dir / "pipeline_timeline.json").write_text(json.dumps(records))
    try:
        from ..parallel.schedules import Timeline, draw
        layout = trainer.cfg.layout
        draw(Timeline.from_records(records, p=layout.pp), out_dir / "pipeline_timeline.png",
             title=f"measured: {layout.describe()}")
    except ImportError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resolve_vocab(cfg: RunConfig, dataset) -> RunConfig:
    """Fill model.vocab_size from the tokenizer when it is 0; refuse a model smaller than the tokenizer."""
    vocab = cfg.model.vocab_size
    if vocab == 0:
        return RunConfig(preset=cfg.preset, model=cfg.model.replace(vocab_size=dataset.vocab_size),
                         layout=cfg.layout, train=cfg.train, data=cfg.data)
    if vocab < dataset.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) must be >= the tokenizer's vocabulary ({dataset.vocab_size})")
    return cfg


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train under the current process group (or in this one process); return a summary on every rank."""
    set_threads(cfg.train.threads)
    rank, world, device = init_distributed(cfg.train.device, timeout_s=cfg.train.collective_timeout_s)
    try:
        dataset = data_mod.TokenDataset.open(cfg.data.path)
        cfg = resolve_vocab(cfg, dataset)
        from ..launch import join_job  # elastic dp, the same settings on every node, the rank-to-node placement
        cfg = join_job(cfg, world=world, dataset=dataset)
        validate(cfg.layout, cfg.model, world, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
        require_implemented(cfg.layout)
        mesh = Mesh.build(cfg.layout)
        return _run(cfg, mesh=mesh, device=device, dataset=dataset)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


FAULT_ENV = "MESHLM_FAULT"
"""Test hook. 'rank=R,step=S': rank R kills itself (SIGKILL) before step S, in the first attempt only;
'hang,rank=R,step=S': rank R sleeps forever before step S (a rank that never enters the next collective);
'slow,rank=R,seconds=X': rank R sleeps X seconds in every step (a straggler)."""


def _fault_spec() -> tuple[str, dict[str, str]] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    parts = spec.split(",")
    kind = parts[0] if "=" not in parts[0] else "kill"
    return kind, dict(kv.split("=") for kv in parts if "=" in kv)


def _injected_fault(trainer: Trainer) -> None:
    fault = _fault_spec()
    if fault is None:
        return
    kind, where = fault
    if int(where["rank"]) != trainer.mesh.rank:
        return
    if kind == "slow":
        time.sleep(float(where["seconds"]))
        return
    if int(where["step"]) != trainer.step_num:
        return
    if kind == "hang":
        while True:
            time.sleep(1)
    import signal
    trainer.writer.wait()  # die after the last periodic checkpoint is published, so the restart has it
    every = trainer.cfg.train.ckpt_every
    want = checkpoint.step_dir(Path(trainer.cfg.train.out_dir) / "ckpt", trainer.step_num // every * every)
    deadline = time.monotonic() + 60
    while every and not (want / "manifest.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


# --- flight recorder and stragglers ---------------------------------------------------------------


class CollectiveHang(RuntimeError):
    """A collective timed out; the message names the ranks the others waited for."""


class FlightRecorder:
    """Dumps the trainer's CommMeter ring and explains a hang: when a collective raises (the backend's
    timeout), on SIGUSR1, or from a watchdog thread when a collective has been open longer than
    train.collective_timeout_s (gloo's blocking waits do not always time out by themselves)."""

    def __init__(self, trainer: Trainer, out_dir: Path):
        self.trainer, self.out_dir = trainer, out_dir
        self.enabled = trainer.cfg.train.flight_recorder and trainer.mesh.world_size > 1
        self.timeout = trainer.cfg.train.collective_timeout_s
        self.fired = False
        if not self.enabled:
            return
        from .. import diagnose
        diagnose.dump_path(out_dir, trainer.mesh.rank).unlink(missing_ok=True)  # a previous run's
        import signal
        import threading
        self.undo_signal = None
        if threading.current_thread() is threading.main_thread():  # SIGUSR1: dump now, also inside a collective
            self.undo_signal = diagnose.on_signal(signal.SIGUSR1, lambda: self.dump("SIGUSR1", announce=True))
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="meshlm-flight-watchdog", daemon=True)
        self.watchdog.start()

    def close(self) -> None:
        if self.enabled:
            self.stop.set()
            if self.undo_signal is not None:
                self.undo_signal()
            # wait for the watchdog too: a daemon thread still running when the interpreter exits is ended by
            # pthread_exit, which can abort the process ("terminate called without an active exception")
            self.watchdog.join(timeout=5.0)

    def dump(self, reason: str, *, announce: bool = False) -> Path | None:
        from .. import diagnose
        t, m = self.trainer, self.trainer.mesh
        try:
            path = diagnose.dump(t.meter, self.out_dir, rank=m.rank, world=m.world_size,
                                 layout=dataclasses.asdict(t.cfg.layout), coords=m.coords, step=t.step_num,
                                 reason=reason)
        except OSError:
            return None
        if announce:
            print(f"meshlm: rank {m.rank}: flight recorder dumped to {path} ({reason})", file=sys.stderr, flush=True)
        return path

    def dump_after(self, error: BaseException) -> None:
        """An exception ended the step: keep the ring (unless a hang was explained and dumped already)."""
        if self.enabled and not self.fired:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.dump(f"step {self.trainer.step_num}: {type(error).__name__}: {first[:300]}")

    def explain(self, reason: str) -> str | None:
        """After a failed or timed-out collective: dump, wait a little for the other ranks' dumps, and return
        the analysis (on the lowest rank that dumped; None elsewhere, or when it was explained already)."""
        if not self.enabled or not self.trainer.meter.open_entries():
            return None
        with self.lock:
            if self.fired:
                return None
            self.fired = True
        from .. import diagnose
        self.dump(f"step {self.trainer.step_num}: {reason[:300]}")
        m = self.trainer.mesh
        dumps = diagnose.wait_for_dumps(self.out_dir, world=m.world_size, seconds=min(5.0, self.timeout / 2),
                                        rid=diagnose.run_id())
        if m.rank != min(dumps, default=m.rank):
            time.sleep(3.0)  # the reporting rank prints before this one's exit makes the launcher stop the job
            return None
        return "; ".join(diagnose.analyze(dumps))

    def report(self, message: str) -> None:
        print(f"meshlm: error: collective timed out at step {self.trainer.step_num}: {message} (dumps in "
              f"{self.out_dir / 'flight'}; `meshlm doctor {self.out_dir}` repeats this)", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        """The watchdog: the main thread may be blocked inside the backend, where no Python code runs."""
        while not self.stop.wait(min(1.0, self.timeout / 10)):
            opened = self.trainer.meter.open_entries()
            if not opened:
                continue
            oldest = min(opened, key=lambda e: e["start"])
            waited = time.perf_counter() - oldest["start"]
            if waited < self.timeout:
                continue
            message = self.explain(f"{oldest['op']} #{oldest['seq']} on the {oldest['axis']} axis open for "
                                   f"{waited:.0f} s (train.collective_timeout_s {self.timeout:g})")
            if message is not None:
                self.report(message)
            if self.fired:
                os._exit(1)  # the main thread cannot be interrupted inside the collective


class StragglerWatch:
    """Every `straggler_every` steps, one small all-gather of each rank's compute and communication seconds
    per step; ranks whose compute time exceeds the median by `straggler_factor` are stragglers (the others
    show the same step time, spent waiting in collectives)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.every = trainer.cfg.train.straggler_every if trainer.mesh.world_size > 1 else 0
        self.sums, self.steps = [0.0, 0.0], 0

    def add(self, step_s: float, comm_s: float) -> dict[str, Any] | None:
        """Count one step; at the end of a window, the gathered times (same on every rank)."""
        if not self.every:
            return None
        self.sums[0] += step_s - comm_s
        self.sums[1] += comm_s
        self.steps += 1
        if self.trainer.step_num % self.every:
            return None
        mine = torch.tensor([s / self.steps for s in self.sums], dtype=torch.float64)
        parts = [torch.empty_like(mine) for _ in range(self.trainer.mesh.world_size)]
        meter = self.trainer.meter
        entry = meter.begin("all_gather", "world", mine.numel() * mine.element_size() * len(parts),
                            group=dist.group.WORLD)
        dist.all_gather(parts, mine)
        meter.end(entry)
        self.sums, self.steps = [0.0, 0.0], 0
        compute = [p[0].item() for p in parts]
        median = sorted(compute)[(len(compute) - 1) // 2]  # the lower median: with 2 ranks, the faster one
        factor = self.trainer.cfg.train.straggler_factor
        slow = [r for r, c in enumerate(compute) if c > factor * median]
        return {"stragglers": slow, "compute_s": compute, "comm_s": [p[1].item() for p in parts],
                "median_compute_s": median}


def _run(cfg: RunConfig, *, mesh: Mesh, device: torch.device, dataset) -> dict[str, Any]:
    out_dir = Path(cfg.train.out_dir)
    is_main = mesh.rank == 0
    trainer = Trainer(cfg, mesh=mesh, device=device, dataset=dataset)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # the launcher restarted the job
    if restarted and is_main:
        print(f"meshlm: restart {os.environ['TORCHELASTIC_RESTART_COUNT']} of the job: resuming from the newest "
              "complete checkpoint", flush=True)
    resume = cfg.train.resume or (restarted and checkpoint.list_checkpoints(out_dir / "ckpt"))
    start_step = trainer.resume(out_dir) if resume else 0

    peak = peak_flops(device, cfg.train.precision)  # per rank
    flops_tok = flops_per_token(cfg.model, seq_len=cfg.train.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    log = None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        counts = param_count(cfg.model)  # the whole model, whatever this rank holds
        size = fmt_count(counts["total"]) + (f", {fmt_count(counts['active'])} active" if cfg.model.n_experts else "")
        print(f"meshlm: {cfg.preset} ({size} params, vocab {cfg.model.vocab_size}) on "
              f"{cfg.layout.describe()}, {device.type}, {cfg.train.precision}"
              + (f", recompute {cfg.train.recompute}" if cfg.train.recompute != "none" else "") + "; "
              f"{cfg.train.steps} steps of {cfg.train.batch_size}x{cfg.train.seq_len} tokens -> {out_dir}",
              flush=True)
        log = MetricsLog(out_dir, total_steps=cfg.train.steps, start_step=start_step,
                         progress=cfg.train.progress, tensorboard=cfg.train.tensorboard)

    losses: list[torch.Tensor] = []  # on the device; read once, at the end
    val_loss = None
    # Metrics are read every log_every steps: the one host synchronisation of the loop (on a GPU the host
    # queues steps ahead meanwhile); each record's step time is the mean over its interval.
    log_every = cfg.train.log_every or (10 if device.type == "cuda" else 1)
    pending: list[tuple[int, StepResult, dict | None]] = []  # steps not yet logged
    wall = interval_start = time.perf_counter()
    recorder = FlightRecorder(trainer, out_dir)
    stragglers = StragglerWatch(trainer)
    profiler = StepProfiler(cfg.train.profile_steps, meter=trainer.meter, out_dir=out_dir, rank=mesh.rank,
                            device=device)
    try:
        while trainer.step_num < cfg.train.steps:
            profiler.before(trainer.step_num + 1)
            step_start, comm_start = time.perf_counter(), trainer.meter.total_seconds()
            _injected_fault(trainer)
            try:
                r = trainer.step()
            except RuntimeError as e:  # a collective failed (timed out, or a peer is gone)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                message = recorder.explain(first)
                if message is None:
                    recorder.dump_after(e)
                    raise
                recorder.report(message)
                raise CollectiveHang(message) from None
            except Exception as e:
                recorder.dump_after(e)
                raise
            losses.append(r.loss_tensor)
            step = trainer.step_num
            slow = stragglers.add(time.perf_counter() - step_start, trainer.meter.total_seconds() - comm_start)
            profiler.after(trainer.step_num)
            if slow is not None and slow["stragglers"] and is_main:
                named = ", ".join(f"rank {q} ({slow['compute_s'][q]:.3f} s)" for q in slow["stragglers"])
                print(f"meshlm: step {step}: straggler {named} of compute per step, median "
                      f"{slow['median_compute_s']:.3f} s", flush=True)
            pending.append((step, r, slow))
            evaluate = cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps)
            save = cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.steps
            flush = step % log_every == 0 or step == cfg.train.steps or evaluate or save
            if log is not None and flush:
                # one copy of the interval's losses and norms to the host: here the host waits for the GPU
                values = torch.stack([torch.stack([q.loss_tensor, q.grad_norm_tensor]) for _, q, _ in pending])
                seconds = (time.perf_counter() - interval_start) / len(pending)
                tps = tokens_per_step / seconds
                for (at, q, slow_at), (loss, norm) in zip(pending, values.tolist()):
                    record = {"step": at, "loss": loss, "lr": q.lr, "grad_norm": norm,
                              "step_time_s": seconds, "tokens_per_s": tps,
                              "mfu": tps * flops_tok / (peak * mesh.world_size),
                              "peak_mem_bytes": peak_memory_bytes(device)}
                    if at == step:  # figures of the last step only
                        if trainer.scaler.enabled:
                            record.update(loss_scale=trainer.scaler.scale, skipped_steps=trainer.scaler.skipped)
                        if trainer.pipeline is not None:  # rank 0's idle share of the step's schedule
                            record["pipeline_bubble"] = trainer.pipeline.last_bubble
                        record.update(trainer.moe_metrics)
                    if slow_at is not None:
                        record["stragglers"] = slow_at["stragglers"]
                    log.log(record)
            if evaluate:
                val_loss = trainer.evaluate()
                if log is not None:
                    log.log({"step": step, "val_loss": val_loss})
            if save:
                trainer.save(out_dir, background=cfg.train.ckpt_async)  # training goes on while it is written
            if flush:
                pending.clear()
                interval_start = time.perf_counter()  # evaluation and checkpoint time count in no step
        folder = trainer.save(out_dir)  # waits for a background one first
        trainer.wait_for_checkpoint()
        if trainer.pipeline is not None:
            write_pipeline_timeline(trainer, out_dir)
    finally:
        profiler.close()
        recorder.close()
        if log is not None:
            log.close()
    wall = time.perf_counter() - wall
    losses = torch.stack(losses).tolist() if losses else []
    summary = {"steps": trainer.step_num, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "val_loss": val_loss, "wall_s": wall,
               "tokens_per_s": tokens_per_step * len(losses) / wall if losses else 0.0,
               "checkpoint": str(folder) if folder else None, "losses": losses}
    if is_main:
        if losses:
            print(f"meshlm: {len(losses)} steps in {wall:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                  + (f", val {val_loss:.3f}" if val_loss is not None else "")
                  + f", {fmt_count(summary['tokens_per_s'])} tokens/s; checkpoint {folder}", flush=True)
        (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))
    return summary
