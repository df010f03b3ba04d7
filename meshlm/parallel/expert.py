"""Mixture-of-experts feed-forward blocks and expert parallelism (all-to-all dispatch).

A mixture-of-experts (MoE) block replaces the one MLP of a transformer block with E expert MLPs
and a router (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021):

    logits = x W_r^T                      (N, E)   router, fp32
    p      = softmax(logits)               (N, E)
    top-k experts e_1..e_k of each token, gates g_j = p_{e_j} (renormalised over the k when k > 1, as
    Mixtral does; top-1 keeps the raw probability, as Switch does, so the router still gets a gradient)
    y      = sum_j g_j * Expert_{e_j}(x)   (N, C)

Capacity. With `moe_dropless` off, expert e takes at most ceil(factor * T * k / E) slots of each
sequence; slots beyond it are dropped (the token passes through the residual only). Priority is
GShard's: every token's first choice before any second choice, and in sequence order within a choice.
The capacity is counted per *sequence* rather than per rank (GShard and Megatron count the tokens of
one rank's batch), so which tokens are dropped does not depend on the layout: any split of the batch
over data, expert or pipeline ranks drops the same tokens as one process.

Auxiliary losses, per sequence and averaged over the global batch (again layout-independent):
  load balancing (Switch eq. 4):  E * sum_e f_e P_e, f_e the fraction of the sequence's k*T slots
                                  routed to e, P_e the mean router probability of e
  router z-loss (ST-MoE, Zoph et al. 2022):  mean over tokens of logsumexp(logits)^2
They enter backward through `_AttachAux` (Megatron's MoEAuxLossAutoScaler does the same): the block's
output carries them, so their gradient flows wherever the output's does, also inside a pipeline stage,
without being added to the loss the trainer reports.

Expert parallelism (GShard): the E experts are split over the ep ranks, E/ep each. A rank routes its
own tokens, sorts the kept slots by expert (so by destination rank), tells every rank how many rows
of each of its experts are coming (`all_to_all_single` of the counts), then sends the rows
(`all_to_all_single` with uneven splits). The receiver regroups the rows by its local expert, runs the
experts, and the results travel back the same way, reversed. Autograd's adjoint of an all-to-all is
the all-to-all with the splits swapped (`_AllToAll`). Expert weights are replicated over (dp, cp) only,
so their gradients are reduced over those axes (layout.EXPERT_GRAD_AXES); the router is dense.

Bytes per MoE block and micro-batch, for S slots this rank sends and R it receives:
forward dispatch S*C + combine R*C, backward the same again: 2*(S+R)*C elements (`all_to_all_bytes`).

Under tensor parallelism the experts are not split (the dense parts are): every tp rank runs the
whole MoE block on the whole sequence (under sequence parallelism the sequence is gathered first and
the output scattered back), so its results and gradients are identical on every tp rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..comm import CommMeter
from .context import CP, gather_over_cp, sum_over_cp
from .tensor import TP, gather_from_tp, scatter_to_sequence


class EP:
    """The expert-parallel context: group, size, rank and meter."""

    def __init__(self, group: dist.ProcessGroup | None, *, meter: CommMeter | None = None,
                 size: int | None = None, rank: int | None = None):
        self.group = group
        # size and rank may come from the Mesh (which knows them without processes: a dry run)
        self.size = size if size is not None else (dist.get_world_size(group) if group is not None else 1)
        self.rank = rank if rank is not None else (dist.get_rank(group) if group is not None else 0)
        self.meter = meter


def is_expert(p: torch.Tensor) -> bool:
    """Whether p is an expert weight (replicated over dp and cp only, split over ep)."""
    return bool(getattr(p, "meshlm_expert", False))


def all_to_all_bytes(sent_rows: int, received_rows: int, d_model: int, element_size: int = 4) -> int:
    """Payload bytes of one MoE block's forward and backward all-to-alls for one micro-batch."""
    return 2 * (sent_rows + received_rows) * d_model * element_size


# --- all-to-all with autograd ---------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, out_rows: list[int], in_rows: list[int], ep: EP, op: str) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    entry = ep.meter.begin(op, "ep", x.numel() * x.element_size(), group=ep.group,
                           shape=tuple(x.shape)) if ep.meter is not None else None
    dist.all_to_all_single(out, x, output_split_sizes=out_rows, input_split_sizes=in_rows, group=ep.group)
    if entry is not None:
        ep.meter.end(entry)
    return out


class _AllToAll(torch.autograd.Function):
    """Forward: rows in_rows[r] of x go to rank r, out_rows[r] come from rank r. Backward: the reverse."""

    @staticmethod
    def forward(ctx, x, out_rows, in_rows, ep):
        ctx.out_rows, ctx.in_rows, ctx.ep = out_rows, in_rows, ep
        return _all_to_all(x, out_rows, in_rows, ep, "all_to_all")

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.in_rows, ctx.out_rows, ctx.ep, "all_to_all"), None, None, None


class _AttachAux(torch.autograd.Function):
    """Forward: the output unchanged. Backward: also seeds the auxiliary loss with gradient `scale`
    (1, or the fp16 loss scale the main loss was multiplied by)."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.aux_shape, ctx.scale = aux.shape, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32, device=g.device), None


# --- routing --------------------------------------------------------------------------------------


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts (B, T, k), gates (B, T, k) fp32) of (B, T, E) router logits."""
    top_p, experts = logits.float().softmax(-1).topk(k, dim=-1)
    return experts, (top_p / top_p.sum(-1, keepdim=True) if k > 1 else top_p)


def within_capacity(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """keep (B, T, k): False for a slot beyond its expert's capacity in its sequence. Priority: choice j
    of every token before choice j+1 of any, then sequence order (GShard). experts: the whole sequences."""
    B, T, k = experts.shape
    one_hot = F.one_hot(experts, n_experts).transpose(1, 2).reshape(B, k * T, -1)  # (B, k*T, E) choice-major
    position = ((one_hot.cumsum(1) - 1) * one_hot).sum(-1)  # (B, k*T): slot's place in its expert's queue
    return (position < capacity).view(B, k, T).transpose(1, 2)


def route(logits: torch.Tensor, *, k: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing of whole sequences' (B, T, E) logits: (experts, gates, keep), each (B, T, k);
    capacity None: dropless (keep all)."""
    experts, gates = top_k(logits, k)
    if capacity is None:
        return experts, gates, torch.ones_like(experts, dtype=torch.bool)
    return experts, gates, within_capacity(experts, logits.shape[-1], capacity)


def aux_losses(logits: torch.Tensor, experts: torch.Tensor, *,
               cp: CP | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss), each summed over the B sequences of (B, T, E) logits.

    Load balancing per sequence: E * sum_e f_e * P_e (f_e: fraction of the k*T slots routed to e,
    before capacity drops; P_e: mean router probability). z-loss per sequence: mean_t logsumexp^2.
    Under context parallelism f and P are sums over every cp rank's tokens (`sum_over_cp`) and the
    z-loss is this rank's share of the mean: the cp ranks' losses add up to the whole sequence's.
    """
    E, n_cp = logits.shape[-1], cp.size if cp is not None else 1
    T = logits.shape[1] * n_cp
    logits = logits.float()
    f = F.one_hot(experts, E).float().sum(dim=(1, 2))  # (B, E) slots per expert
    P = logits.softmax(-1).sum(1)  # (B, E)
    if n_cp > 1:
        f, P = sum_over_cp(f, cp), sum_over_cp(P, cp)
    balance = E * (f / (T * experts.shape[-1]) * P / T).sum()
    z = logits.logsumexp(-1).pow(2).sum(1).div(T).sum()
    return balance, z


# --- the block ------------------------------------------------------------------------------------


class MoE(nn.Module):
    """Router plus E experts (this rank's E/ep of them), optionally plus shared experts (a dense MLP).

    Parameters: router (E, C); experts stacked as w1 (E, F, C), w3 (E, F, C) for SwiGLU, w2 (E, C, F)
    and biases, split over ep along dim 0 (`Shard(0, ep_rank, ep, axis='ep')`), each initialised as the
    slice of the whole stack, so any ep equals one process holding all experts.
    """

    def __init__(self, cfg, *, out_std: float, tp: TP, ep: EP, cp: CP | None = None,
                 shared: nn.Module | None = None):
        super().__init__()
        from ..model import Shard, new_param  # model.py builds MoE blocks; the helpers live there
        if cfg.n_experts % ep.size:
            raise ValueError(f"ep ({ep.size}) must divide n_experts ({cfg.n_experts})")
        self.tp, self.ep, self.cp = tp, ep, cp or CP(None, causal=cfg.causal)
        self.E, self.k, self.activation = cfg.n_experts, cfg.experts_per_token, cfg.activation
        self.local = self.E // ep.size  # experts on this rank: [rank * local, (rank + 1) * local)
        self.capacity_factor = None if cfg.moe_dropless else cfg.moe_capacity_factor
        self.aux_weight, self.z_weight = cfg.moe_aux_weight, cfg.moe_z_weight
        self.batch_sequences: int | None = None
        """Sequences in the global batch, set by the trainer (aux losses are means over it); None: this batch."""
        self.grad_scale = 1.0
        """What the trainer multiplies the loss by before backward (fp16 loss scaling): the aux losses too."""
        E, C, Fd = cfg.n_experts, cfg.d_model, cfg.d_ff
        shard = Shard(0, ep.rank, ep.size, axis="ep") if ep.size > 1 else None

        def expert_param(*shape, init, std=0.0):
            p = new_param(E, *shape, init=init, std=std, shard=shard)
            p.meshlm_expert = True
            return p

        self.router = new_param(E, C, init="normal", std=cfg.init_std)
        self.w1 = expert_param(Fd, C, init="normal", std=cfg.init_std)  # up
        self.w3 = expert_param(Fd, C, init="normal", std=cfg.init_std) if cfg.activation == "swiglu" else None
        self.w2 = expert_param(C, Fd, init="normal", std=out_std)  # down
        self.b1 = expert_param(Fd, init="zeros") if cfg.bias else None
        self.b2 = expert_param(C, init="zeros") if cfg.bias else None
        self.shared = shared
        self.reset_stats()

    def reset_stats(self) -> None:
        """Counters of the routing since the last reset (the trainer reads them every step)."""
        self.stats = {"routed": torch.zeros(self.E), "slots": torch.zeros(()), "dropped": torch.zeros(()),
                      "balance": torch.zeros(()), "z": torch.zeros(()), "sequences": torch.zeros(()),
                      "kept": torch.zeros(self.E)}

    def capacity(self, seq_len: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * seq_len * self.k / self.E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = x
        if self.tp.sequence_parallel:  # the MoE block runs on the whole sequence on every tp rank
            x = gather_from_tp(x, self.tp, dim=1)
        B, T, C = x.shape  # under context parallelism T is this rank's part of each sequence
        logits = F.linear(x.float(), self.router.float())  # (B, T, E)
        experts, gates = top_k(logits, self.k)
        capacity = self.capacity(T * self.cp.size)
        if capacity is None:
            keep = torch.ones_like(experts, dtype=torch.bool)
        else:  # queue positions count the whole sequence: the choices of every cp rank's part
            keep = self.cp.split(within_capacity(gather_over_cp(experts, self.cp), self.E, capacity))

        # the kept slots, sorted by expert (so by destination rank)
        slot_expert, token = experts.reshape(-1), torch.arange(B * T, device=x.device).repeat_interleave(self.k)
        kept = keep.reshape(-1).nonzero().squeeze(1)
        kept = kept[torch.argsort(slot_expert[kept], stable=True)]
        counts = torch.bincount(slot_expert[kept], minlength=self.E)  # (E,) rows for each expert
        rows = x.reshape(B * T, C)[token[kept]]  # (S, C)
        y = self._experts_anywhere(rows, counts)  # (S, C)
        weighted = y * gates.reshape(-1)[kept].unsqueeze(1).to(y.dtype)
        out = torch.zeros_like(x.reshape(B * T, C), dtype=y.dtype).index_add(0, token[kept], weighted)
        out = out.view(B, T, C).to(x.dtype)

        balance, z = aux_losses(logits, experts, cp=self.cp)
        if torch.is_grad_enabled():
            per_seq = 1.0 / (self.batch_sequences or B)
            out = _AttachAux.apply(out, (self.aux_weight * balance + self.z_weight * z) * per_seq, self.grad_scale)
        if not _recomputing():  # under activation recomputation backward runs this forward again
            s = self.stats
            s["routed"] += torch.bincount(slot_expert, minlength=self.E).cpu().float()
            s["slots"] += slot_expert.numel()
            s["dropped"] += slot_expert.numel() - kept.numel()
            s["balance"] += balance.detach().cpu() / self.cp.size  # the same on every cp rank
            s["z"] += z.detach().cpu()  # this rank's share
            s["sequences"] += B / self.cp.size
            s["kept"] += counts.detach().cpu().float()

        if self.tp.sequence_parallel:
            out = scatter_to_sequence(out, self.tp, dim=1)
        if self.shared is not None:
            out = out + self.shared(x_in)
        return out

    def _experts_anywhere(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each row through its expert, wherever that expert lives; rows sorted by expert, counts (E,)."""
        ep = self.ep
        if ep.size == 1:
            return self._run_local(rows, counts.tolist())
        # 1. how many rows of each of my experts each rank sends me
        recv = torch.empty_like(counts)
        entry = ep.meter.begin("all_to_all_counts", "ep", counts.numel() * counts.element_size(), group=ep.group,
                               shape=tuple(counts.shape)) if ep.meter is not None else None
        dist.all_to_all_single(recv, counts, group=ep.group)
        if entry is not None:
            ep.meter.end(entry)
        send = counts.view(ep.size, self.local)  # (dest rank, its expert)
        recv = recv.view(ep.size, self.local)  # (source rank, my expert)
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        # 2. rows out; they arrive grouped by source, then expert: regroup by expert, then source
        got = _AllToAll.apply(rows, recv_rows, send_rows, ep)
        offsets = torch.cat([recv.new_zeros(1), recv.flatten().cumsum(0)[:-1]]).view(ep.size, self.local)
        by_expert = torch.cat([torch.arange(int(offsets[s, e]), int(offsets[s, e] + recv[s, e]))
                               for e in range(self.local) for s in range(ep.size)]).long()
        y = self._run_local(got[by_expert], recv.sum(0).tolist())
        y = y[torch.argsort(by_expert)]  # back to the arrival order
        # 3. results back to the ranks their tokens came from
        return _AllToAll.apply(y, send_rows, recv_rows, ep)

    def _run_local(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows sorted by local expert, counts[e] of expert e: each slice through its expert's MLP."""
        outs = []
        for e, chunk in enumerate(rows.split(counts)):
            b1 = self.b1[e] if self.b1 is not None else None
            up = F.linear(chunk, self.w1[e], b1)
            if self.activation == "swiglu":
                h = F.silu(F.linear(chunk, self.w3[e])) * up
            else:
                h = F.gelu(up, approximate="tanh" if self.activation == "gelu_tanh" else "none")
            outs.append(F.linear(h, self.w2[e], self.b2[e] if self.b2 is not None else None))
        return torch.cat(outs) if outs else rows.new_zeros(0, rows.shape[1])


def _recomputing() -> bool:
    from ..train.recompute import recomputing  # train/ builds on the model, which builds on this file
    return recomputing()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_batch_sequences(model: nn.Module, sequences: int | None) -> None:
    """Tell every MoE block how many sequences the global batch has (its aux losses are means over it)."""
    for m in moe_layers(model):
        m.batch_sequences = sequences


def set_grad_scale(model: nn.Module, scale: float) -> None:
    """The loss scale of this step (fp16): the aux losses' gradients are scaled like the main loss's."""
    for m in moe_layers(model):
        m.grad_scale = scale


def collect_stats(model: nn.Module, *, reset: bool = True) -> dict[str, torch.Tensor] | None:
    """This rank's routing counters summed over its MoE blocks (None without any); resets them."""
    layers = moe_layers(model)
    if not layers:
        return None
    total = {k: sum(m.stats[k] for m in layers) for k in layers[0].stats}
    if reset:
        for m in layers:
            m.reset_stats()
    return total
