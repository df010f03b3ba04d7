"""Tensor and sequence parallelism (Megatron-style): split each layer's matrices over the tp ranks.

Shoeybi et al. 2019 ("Megatron-LM"), for an MLP  Y = GeLU(X A) B:

    A = [A_1 ... A_t]  split by columns:  rank i computes Y_i = GeLU(X A_i)       (no communication)
    B = [B_1; ...; B_t] split by rows:    rank i computes Z_i = Y_i B_i, Z = sum_i Z_i  (one all-reduce)

so a column-parallel layer followed by a row-parallel one costs one all-reduce of (b, s, h) in
forward (`reduce_from_tp` after the row layer) and one in backward (`copy_to_tp` before the column
layer: identity forward, all-reduce of the input gradient backward). Attention is split the same way
by heads: q/k/v are column-parallel, the output projection row-parallel.

Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"): between the tensor-parallel regions (norms, dropout, residual adds) the
activations are split along the sequence instead of being replicated, so each rank stores 1/t of
them. The all-reduce becomes a reduce-scatter leaving each row-parallel layer
(`reduce_scatter_to_sequence`) and an all-gather entering each column-parallel one
(`gather_from_sequence`): the same bytes, but activations that were replicated are now sharded.

Every helper is named by what it does in forward, does its adjoint in backward, takes its group
explicitly, and counts its bytes in the CommMeter when one is given.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..comm import CommMeter


class TP:
    """The tensor-parallel context a layer needs: group, size, rank, sequence parallelism, meter."""

    def __init__(self, group: dist.ProcessGroup | None, *, sequence_parallel: bool = False,
                 meter: CommMeter | None = None, size: int | None = None, rank: int | None = None):
        self.group = group
        # size and rank may come from the Mesh (which knows them without processes: a dry run)
        self.size = size if size is not None else (dist.get_world_size(group) if group is not None else 1)
        self.rank = rank if rank is not None else (dist.get_rank(group) if group is not None else 0)
        self.sequence_parallel = sequence_parallel and self.size > 1
        self.meter = meter

    def begin(self, op: str, t: torch.Tensor):
        """Enter a collective over tp (the flight recorder's entry; None without a meter)."""
        if self.meter is None:
            return None
        return self.meter.begin(op, "tp", t.numel() * t.element_size(), group=self.group, shape=tuple(t.shape))

    def end(self, entry) -> None:
        if entry is not None:
            self.meter.end(entry)


# --- the communication primitives -----------------------------------------------------------------


def _all_reduce(x: torch.Tensor, tp: TP) -> torch.Tensor:
    x = x.contiguous()
    entry = tp.begin("all_reduce", x)
    dist.all_reduce(x, group=tp.group)
    tp.end(entry)
    return x


def _all_gather(x: torch.Tensor, tp: TP, dim: int) -> torch.Tensor:
    """Concatenate the ranks' x along dim."""
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((tp.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    entry = tp.begin("all_gather", out)
    dist.all_gather_single(out, x, group=tp.group)
    tp.end(entry)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, tp: TP, dim: int) -> torch.Tensor:
    """Sum over ranks, keep this rank's 1/t slice along dim."""
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // tp.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    entry = tp.begin("reduce_scatter", x)
    dist.reduce_scatter_single(out, x, group=tp.group)
    tp.end(entry)
    return out.movedim(0, dim)


def sum_over_tp_(tensors: list[torch.Tensor], tp: TP) -> None:
    """Sum tensors over the tp ranks in place, through one flat buffer (one collective, not one each).

    Used after backward for the gradients of replicated parameters that each rank saw only part of
    (norms and biases on sequence shards, key/value weights replicated over more ranks than heads).
    """
    if tp.size == 1 or not tensors:
        return
    flat = _all_reduce(torch.cat([t.reshape(-1) for t in tensors]), tp)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _split(x: torch.Tensor, tp: TP, dim: int) -> torch.Tensor:
    return x.chunk(tp.size, dim=dim)[tp.rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _all_gather(x, tp, dim)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.tp, ctx.dim), None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _split(x, tp, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.tp, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _all_gather(x, tp, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.tp, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _reduce_scatter(x, tp, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.tp, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (the input fans out to every rank's column shard)."""
    return _CopyToTP.apply(x, tp) if tp.size > 1 else x


def reduce_from_tp(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """Forward: all-reduce of the partial sums of a row-parallel layer. Backward: identity."""
    return _ReduceFromTP.apply(x, tp) if tp.size > 1 else x


def gather_from_tp(x: torch.Tensor, tp: TP, dim: int = -1) -> torch.Tensor:
    """Forward: all-gather the shards along dim. Backward: keep this rank's slice of the gradient."""
    return _GatherFromTP.apply(x, tp, dim % x.ndim) if tp.size > 1 else x


def scatter_to_tp(x: torch.Tensor, tp: TP, dim: int = -1) -> torch.Tensor:
    """Forward: keep this rank's slice along dim. Backward: all-gather the gradient."""
    return _ScatterToTP.apply(x, tp, dim % x.ndim) if tp.size > 1 else x


def gather_from_sequence(x: torch.Tensor, tp: TP, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism, entering a column-parallel region. Forward: all-gather along the sequence.
    Backward: reduce-scatter (every rank's region contributed to the gradient of every position)."""
    return _GatherFromSequence.apply(x, tp, dim % x.ndim) if tp.size > 1 else x


def reduce_scatter_to_sequence(x: torch.Tensor, tp: TP, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism, leaving a row-parallel region. Forward: reduce-scatter the partial sums
    along the sequence. Backward: all-gather."""
    return _ReduceScatterToSequence.apply(x, tp, dim % x.ndim) if tp.size > 1 else x


def scatter_to_sequence(x: torch.Tensor, tp: TP, dim: int = 1) -> torch.Tensor:
    """Split a replicated tensor along the sequence. Backward: all-gather the gradient."""
    return _ScatterToTP.apply(x, tp, dim % x.ndim) if tp.size > 1 else x


class _SequenceParallelColumns(torch.autograd.Function):
    """Y_j = AllGather_seq(X) W_j^T + b_j for column-parallel weights W_1..W_k sharing one input.

    Only this rank's sequence shard of X is saved; backward all-gathers it again to form the weight
    gradients (Korthikanti et al. 2022, section 4.2.2, as Megatron does), so the gathered (b, s, h)
    input is never stored: that is where sequence parallelism saves its memory. The input gradient
    leaves by a reduce-scatter along the sequence.
    """

    @staticmethod
    def forward(ctx, x, tp, *weights_and_biases):
        ctx.tp = tp
        pairs = list(zip(weights_and_biases[0::2], weights_and_biases[1::2]))
        total = _all_gather(x, tp, 1)  # (B, T, C)
        outs = tuple(F.linear(total, w, b) for w, b in pairs)
        ctx.has_bias = [b is not None for _, b in pairs]
        ctx.save_for_backward(x, *[w for w, _ in pairs])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        total = _all_gather(x, ctx.tp, 1)  # gathered again, not stored
        grad_total = _input_grad(grads, weights)
        out = _weight_grads(grads, total, ctx.has_bias)
        return (_reduce_scatter(grad_total, ctx.tp, 1), None, *out)


def _input_grad(grads, weights) -> torch.Tensor:
    """dL/dX of Y_j = X W_j^T + b_j: the sum of G_j W_j over the layers sharing X."""
    out = None
    for g, w in zip(grads, weights):
        out = g @ w if out is None else out + g @ w
    return out


def _weight_grads(grads, x: torch.Tensor, has_bias: list[bool]) -> list[torch.Tensor | None]:
    """[dL/dW_1, dL/db_1, ...]: G_j^T X and the sum of G_j over the tokens."""
    x2 = x.flatten(0, -2)
    out = []
    for g, bias in zip(grads, has_bias):
        g2 = g.flatten(0, -2)
        out += [g2.t() @ x2, g2.sum(0) if bias else None]
    return out


class _ColumnsAsyncAllReduce(torch.autograd.Function):
    """Y_j = X W_j^T + b_j for column-parallel weights sharing one replicated input (no sequence
    parallelism). Forward needs no communication; backward all-reduces the input gradient
    asynchronously and computes the weight gradients while it travels (Megatron-LM's
    async tensor-parallel all-reduce), where `copy_to_tp` would block first."""

    @staticmethod
    def forward(ctx, x, tp, *weights_and_biases):
        ctx.tp = tp
        pairs = list(zip(weights_and_biases[0::2], weights_and_biases[1::2]))
        ctx.has_bias = [b is not None for _, b in pairs]
        ctx.save_for_backward(x, *[w for w, _ in pairs])
        return tuple(F.linear(x, w, b) for w, b in pairs)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        grad_x = _input_grad(grads, weights).contiguous()
        entry = ctx.tp.begin("all_reduce", grad_x)
        work = dist.all_reduce(grad_x, group=ctx.tp.group, async_op=True)
        out = _weight_grads(grads, x, ctx.has_bias)  # while the input gradient is on the wire
        work.wait()
        ctx.tp.end(entry)
        return (grad_x, None, *out)


def column_parallel(x: torch.Tensor, layers: list, tp: TP) -> tuple[torch.Tensor, ...]:
    """Apply column-parallel layers (each with .weight and .bias) to one input: under sequence
    parallelism through one all-gather that is recomputed in backward instead of stored; otherwise
    as `copy_to_tp` would, but with the backward all-reduce overlapped with the weight gradients."""
    if tp.sequence_parallel:
        args = [t for layer in layers for t in (layer.weight, layer.bias)]
        return _SequenceParallelColumns.apply(x, tp, *args)
    if tp.size == 1:  # call the modules themselves (so module hooks, e.g. PyTorch's own TP, apply)
        return tuple(layer(x) for layer in layers)
    args = [t for layer in layers for t in (layer.weight, layer.bias)]
    return _ColumnsAsyncAllReduce.apply(x, tp, *args)


def enter_column_region(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """What enters a column-parallel layer: the sequence-gathered input (SP) or the replicated one."""
    return gather_from_sequence(x, tp) if tp.sequence_parallel else copy_to_tp(x, tp)


def leave_row_region(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """What leaves a row-parallel layer: reduce-scattered along the sequence (SP) or all-reduced."""
    return reduce_scatter_to_sequence(x, tp) if tp.sequence_parallel else reduce_from_tp(x, tp)


# --- vocabulary-parallel cross-entropy ---------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits split over the vocabulary, never gathering them.

    Rank i holds logits z[:, V_i] of its vocabulary slice. With m = max_v z_v (an all-reduce MAX),
    S = sum_v exp(z_v - m) (all-reduce SUM of the local sums) and z_y the target's logit (all-reduce
    SUM: only the owning rank contributes), loss = log S + m - z_y. Backward: softmax - onehot, local.
    Padding columns (vocabularies that do not divide tp) are -inf, so they get no probability.
    """

    @staticmethod
    def forward(ctx, logits, targets, tp, vocab_start, vocab_size):
        logits = logits.float()
        n, v_local = logits.shape
        m = logits.max(dim=-1).values
        entry = tp.begin("all_reduce", m)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp.group)
        tp.end(entry)
        shifted = logits - m.unsqueeze(-1)
        valid = targets != -100
        local_t = targets - vocab_start
        mine = valid & (local_t >= 0) & (local_t < v_local)
        idx = local_t.clamp(0, v_local - 1)
        target_logit = torch.where(mine, shifted.gather(1, idx.unsqueeze(1)).squeeze(1), torch.zeros_like(m))
        exp = shifted.exp()
        if vocab_start + v_local > vocab_size:  # padded columns never receive mass
            exp[:, max(0, vocab_size - vocab_start):] = 0
        sums = torch.stack([exp.sum(-1), target_logit])
        entry = tp.begin("all_reduce", sums)
        dist.all_reduce(sums, group=tp.group)
        tp.end(entry)
        loss = (sums[0].log() - sums[1]) * valid
        ctx.save_for_backward(exp / sums[0].unsqueeze(-1), idx, mine, valid)
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        softmax, idx, mine, valid = ctx.saved_tensors
        grad = softmax * valid.unsqueeze(-1)
        grad[torch.arange(len(idx), device=idx.device)[mine], idx[mine]] -= 1.0
        return grad * g, None, None, None, None


def vocab_parallel_loss_sum(logits: torch.Tensor, targets: torch.Tensor, tp: TP, *, vocab_size: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of targets) for logits (B, T, V/t) split over the vocabulary."""
    v_local = logits.shape[-1]
    loss = _VocabParallelCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), tp,
                                            tp.rank * v_local, vocab_size)
    return loss, (targets != -100).sum()


def vocab_parallel_embedding(tokens: torch.Tensor, weight: torch.Tensor, tp: TP) -> torch.Tensor:
    """Rows [r*V/t, (r+1)*V/t) live on rank r: look up the local ones, zero the rest; the caller sums
    over ranks (all-reduce, or reduce-scatter under sequence parallelism)."""
    v_local = weight.shape[0]
    local = tokens - tp.rank * v_local
    outside = (local < 0) | (local >= v_local)
    out = F.embedding(local.clamp(0, v_local - 1), weight)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp (the padding rows are zeros and never predicted)."""
    return -(-vocab_size // tp) * tp
