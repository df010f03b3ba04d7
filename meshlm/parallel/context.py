"""Context parallelism: ring attention over the cp ranks, each holding a slice of the sequence.

Every layer except attention treats tokens independently, so with the sequence split over cp ranks
only attention needs the other ranks' tokens. Ring attention (Liu et al. 2023, "Ring Attention with
Blockwise Transformers for Near-Infinite Context") keeps each rank's queries in place and passes
the key/value blocks around a ring: after cp steps every query has seen every key, and no rank ever
holds more than two blocks.

Blockwise softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the
flash-attention form of Dao et al. 2022). For the rows of q and one k/v block j,

    S_j = q k_j^T / sqrt(D)   (masked: -inf where a key lies after the query under causality)
    l_j = logsumexp(S_j)      per row,           O_j = softmax(S_j) v_j

and two partial results merge exactly by their log-sum-exps:

    l = log(e^l_a + e^l_b),   O = e^(l_a - l) O_a + e^(l_b - l) O_b.

Backward (flash-attention), with the final O and l saved from forward and dO the output gradient:

    P_j = exp(S_j - l),  delta = rowsum(dO * O),  dV_j = P_j^T dO,  dP_j = dO v_j^T,
    dS_j = P_j * (dP_j - delta),  dq = sum_j dS_j k_j / sqrt(D),  dk_j = dS_j^T q / sqrt(D).

dq stays on the query's rank; dk_j and dv_j belong to the block's owner, so in backward each block
travels with an accumulator that every rank adds its share to; one last hop after cp steps brings
the finished dk, dv home.

Load balance (causal). Cut in cp contiguous pieces, the last rank's queries would see the whole
sequence and the first rank's almost none. Instead the sequence is cut into 2*cp chunks and rank r
holds chunks r and 2*cp-1-r ("zigzag", as in Megatron-CP and ring-flash-attention): every rank then
does the same work, half a block per ring step after the first. A query chunk sees a key chunk
wholly (an earlier chunk), causally (itself) or not at all (a later one), so every sub-block is one
call of an attention kernel with or without its causal mask, and hidden ones are skipped.

Kernel. On the CPU each sub-block runs PyTorch's fused flash-attention kernel, which returns the
log-sum-exp the merge needs and takes the final one back in backward; on other devices the formulas
above run as plain tensor operations (a GPU's fused kernels differ in how they return l).

Communication: forward sends (cp - 1) k/v blocks per rank (2 * B * K * T/cp * D elements in the
inputs' dtype); backward sends (cp - 1) k/v blocks plus cp fp32 dk/dv accumulators of the same
shape. Each transfer starts before the current block is computed, so it overlaps with compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..comm import CommMeter, span


# --- the context a layer needs --------------------------------------------------------------------


class CP:
    """The context-parallel context a layer needs: group, size, rank, the split kind and the meter."""

    def __init__(self, group: dist.ProcessGroup | None, *, causal: bool, meter: CommMeter | None = None,
                 size: int | None = None, rank: int | None = None):
        self.group = group
        # size and rank may come from the Mesh (which knows them without processes: a dry run)
        self.size = size if size is not None else (dist.get_world_size(group) if group is not None else 1)
        self.rank = rank if rank is not None else (dist.get_rank(group) if group is not None else 0)
        self.causal, self.meter = causal, meter

    def attention(self, q, k, v, *, dropout: float = 0.0, attn_mask=None):
        return ring_attention(q, k, v, self.group, causal=self.causal, cp=self.size, cp_rank=self.rank,
                              meter=self.meter, dropout=dropout, attn_mask=attn_mask)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return split_sequence(x, self.size, self.rank, causal=self.causal, dim=dim) if self.size > 1 else x

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """Global positions of this rank's `local_len` tokens."""
        return local_positions(local_len * self.size, self.size, self.rank, causal=self.causal, device=device)


class _SumOverCP(torch.autograd.Function):
    """Forward: all-reduce (sum) over cp. Backward: identity (each rank's part gets the whole gradient)."""

    @staticmethod
    def forward(ctx, x, cp):
        x = x.clone()
        with span(cp.meter, "all_reduce", "cp", x, group=cp.group):
            dist.all_reduce(x, group=cp.group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def sum_over_cp(x: torch.Tensor, cp: CP) -> torch.Tensor:
    """Sum of every cp rank's x, for a quantity over the whole sequence built from per-token parts (a
    mixture-of-experts router's statistics). Every rank uses the sum identically, so in backward each
    rank's part receives the gradient as it is; summing the parameters' gradients over cp completes it."""
    return _SumOverCP.apply(x, cp) if cp.size > 1 else x


@torch.no_grad()
def gather_over_cp(x: torch.Tensor, cp: CP, dim: int = 1) -> torch.Tensor:
    """The whole sequence of x on every cp rank (no gradient), in sequence order."""
    if cp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp.size)]
    with span(cp.meter, "all_gather", "cp", x, group=cp.group, nbytes=x.numel() * x.element_size() * cp.size):
        dist.all_gather(parts, x.contiguous(), group=cp.group)
    return gather_sequence(parts, cp.size, causal=cp.causal, dim=dim)


# --- how the sequence is split -------------------------------------------------------------------


def chunk_ids(cp: int, cp_rank: int, *, causal: bool) -> list[int]:
    """The sequence chunks this rank holds, in local order: causal, 2*cp chunks and rank r holds
    r and 2*cp-1-r (load-balanced); bidirectional, cp chunks and rank r holds chunk r."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank ({cp_rank}) must be in [0, cp) with cp = {cp}")
    return [cp_rank, 2 * cp - 1 - cp_rank] if causal else [cp_rank]


def _n_chunks(cp: int, causal: bool) -> int:
    return 2 * cp if causal else cp


def _chunk_len(seq_len: int, cp: int, causal: bool) -> int:
    n = _n_chunks(cp, causal)
    if seq_len % n:
        split = f"2*cp ({n}) for the causal load-balanced split" if causal else f"cp ({n})"
        raise ValueError(f"sequence length ({seq_len}) must be divisible by {split}")
    return seq_len // n


def split_sequence(x: torch.Tensor, cp: int, cp_rank: int, *, causal: bool, dim: int = 1) -> torch.Tensor:
    """This rank's part of x along dim: its chunks concatenated in chunk_ids order (a plain slice)."""
    c = _chunk_len(x.shape[dim], cp, causal)
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(cp, cp_rank, causal=causal)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def gather_sequence(parts: list[torch.Tensor], cp: int, *, causal: bool, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's part (parts[r] from rank r): the inverse of split_sequence."""
    if len(parts) != cp:
        raise ValueError(f"gather_sequence needs one part per cp rank: got {len(parts)}, cp = {cp}")
    chunks: list[torch.Tensor | None] = [None] * _n_chunks(cp, causal)
    for r, part in enumerate(parts):
        ids = chunk_ids(cp, r, causal=causal)
        for i, piece in zip(ids, part.chunk(len(ids), dim=dim)):
            chunks[i] = piece
    return torch.cat(chunks, dim=dim)


def local_positions(seq_len: int, cp: int, cp_rank: int, *, causal: bool, device=None) -> torch.Tensor:
    """Global positions (0..seq_len-1) of this rank's tokens in local order, for RoPE or learned positions."""
    c = _chunk_len(seq_len, cp, causal)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device)
                      for i in chunk_ids(cp, cp_rank, causal=causal)])


# --- the ring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ring:
    """The cp group as a ring: this rank sends to `next` and receives from `prev` (global ranks)."""

    group: dist.ProcessGroup
    cp: int
    rank: int
    causal: bool
    meter: CommMeter | None

    @property
    def next(self) -> int:
        return dist.get_global_rank(self.group, (self.rank + 1) % self.cp)

    @property
    def prev(self) -> int:
        return dist.get_global_rank(self.group, (self.rank - 1) % self.cp)

    def shift(self, *tensors: torch.Tensor) -> _Transfer:
        """Start sending each tensor to the next rank and receiving its like from the previous one."""
        recvs = [torch.empty_like(t) for t in tensors]
        ops = []
        for tag, (s, r) in enumerate(zip(tensors, recvs)):  # tags keep the pairs apart on gloo
            ops += [dist.P2POp(dist.isend, s, self.next, self.group, tag),
                    dist.P2POp(dist.irecv, r, self.prev, self.group, tag)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        # entered now, left when waited on: bytes sent by this rank; seconds from start to arrival (overlap included)
        entry = self.meter.begin("send_recv", "cp", nbytes, group=self.group) if self.meter is not None else None
        return _Transfer(dist.batch_isend_irecv(ops), recvs, entry, self.meter)


@dataclass
class _Transfer:
    works: list
    recvs: list[torch.Tensor]
    entry: dict | None
    meter: CommMeter | None

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        if self.entry is not None:
            self.meter.end(self.entry)
            self.entry = None
        return self.recvs


def _blocks(ring: _Ring, owner: int, T: int) -> list[tuple[slice, slice, bool]]:
    """The work of one (local queries, k/v block of `owner`) step: (rows, columns, causal) sub-blocks.

    Causal: both sides hold two chunks of T/2 tokens (`chunk_ids`), and a query chunk sees a key chunk
    wholly when it comes later in the sequence, causally (the same positions) when it is the same
    chunk, and not at all when it comes earlier. A query chunk that sees both key chunks wholly makes
    one sub-block of all the columns. Bidirectional: one block, every row against every column."""
    if not ring.causal:
        return [(slice(0, T), slice(0, T), False)]
    c, plan = T // 2, []
    theirs = chunk_ids(ring.cp, owner, causal=True)
    for a, qa in enumerate(chunk_ids(ring.cp, ring.rank, causal=True)):
        rows = slice(a * c, (a + 1) * c)
        whole = [b for b, kb in enumerate(theirs) if kb < qa]
        if whole:
            plan.append((rows, slice(whole[0] * c, (whole[-1] + 1) * c), False))
        plan += [(rows, slice(b * c, (b + 1) * c), True) for b, kb in enumerate(theirs) if kb == qa]
    return plan


def _expand(kv: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, K, T, D) -> (B, H, T, D) fp32: each kv head serves `groups` query heads (GQA)."""
    kv = kv.float()
    return kv.repeat_interleave(groups, dim=1) if groups > 1 else kv


def _fold(g: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, K, T, D): sum the gradients of the query heads that share a kv head."""
    B, H, T, D = g.shape
    return g.view(B, H // groups, groups, T, D).sum(2) if groups > 1 else g


# --- one sub-block's attention: the fused CPU kernel, or the formulas above on other devices --------
# Both return fp32 results from fp32 inputs. The backward takes the *final* output and log-sum-exp of
# the rows (not the block's own), which makes P_j and delta those of the whole softmax: the block's
# share of dq and its dk, dv exactly.


def _scores(q, k, causal: bool, scale: float):
    """S = q k^T * scale (B, H, c, Tk), -inf above the diagonal when causal (a block against itself)."""
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _explicit_forward(q, k, v, causal: bool, scale: float):
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, c)
    return torch.exp(s - lse.unsqueeze(-1)) @ v, lse


def _explicit_backward(do, q, k, v, out, lse, causal: bool, scale: float):
    p = torch.exp(_scores(q, k, causal, scale) - lse.unsqueeze(-1))
    dp = do @ v.transpose(-2, -1)
    ds = p * (dp - (do * out).sum(-1, keepdim=True)) * scale
    return ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ do


def _fused_forward(q, k, v, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _fused_backward(do, q, k, v, out, lse, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, scale=scale)


def _kernels(device: torch.device):
    """PyTorch's flash-attention kernel for the CPU returns the log-sum-exp the merge needs (and takes it
    back in backward), so on the CPU each sub-block is one fused call, as fast as local SDPA per FLOP;
    elsewhere the formulas above run as plain tensor operations."""
    return (_fused_forward, _fused_backward) if device.type == "cpu" else (_explicit_forward, _explicit_backward)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring):
        B, H, T, D = q.shape
        groups, scale = H // k.shape[1], 1.0 / math.sqrt(D)
        block_forward, _ = _kernels(q.device)
        qf = q.float()
        out = torch.zeros(B, H, T, D, dtype=torch.float32, device=q.device)  # running output
        lse = torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)  # running log-sum-exp
        kv = own = torch.stack((k, v))  # (2, B, K, T, D): one message per step
        for step in range(ring.cp):
            transfer = ring.shift(kv) if step < ring.cp - 1 else None  # the next block travels meanwhile
            owner = (ring.rank - step) % ring.cp
            kb, vb = _expand(kv[0], groups), _expand(kv[1], groups)  # (B, H, T, D)
            for rows, cols, causal in _blocks(ring, owner, T):
                out_b, lse_b = block_forward(qf[:, :, rows], kb[:, :, cols], vb[:, :, cols], causal, scale)
                new = torch.logaddexp(lse[:, :, rows], lse_b)
                out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[:, :, rows] - new).unsqueeze(-1)
                                   + out_b * torch.exp(lse_b - new).unsqueeze(-1))
                lse[:, :, rows] = new
            if transfer is not None:
                (kv,) = transfer.wait()
        ctx.ring = ring
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.save_for_backward(q, own, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, kv, out, lse = ctx.saved_tensors
        ring = ctx.ring
        B, H, T, D = q.shape
        groups, scale = H // kv.shape[2], 1.0 / math.sqrt(D)
        _, block_backward = _kernels(q.device)
        qf, do = q.float(), grad_out.float()
        dq = torch.zeros_like(qf)
        acc = None  # (2, B, K, T, D) fp32: dk, dv of the block held at the previous step, on its way home
        for step in range(ring.cp):
            sends = ((kv,) if step < ring.cp - 1 else ()) + ((acc,) if acc is not None else ())
            transfer = ring.shift(*sends) if sends else None
            owner = (ring.rank - step) % ring.cp
            kb, vb = _expand(kv[0], groups), _expand(kv[1], groups)  # (B, H, T, D)
            dk, dv = torch.zeros_like(kb), torch.zeros_like(vb)
            for rows, cols, causal in _blocks(ring, owner, T):
                dq_b, dk_b, dv_b = block_backward(do[:, :, rows], qf[:, :, rows], kb[:, :, cols], vb[:, :, cols],
                                                  out[:, :, rows], lse[:, :, rows], causal, scale)
                dq[:, :, rows] += dq_b
                dk[:, :, cols] += dk_b
                dv[:, :, cols] += dv_b
            mine = torch.stack((_fold(dk, groups), _fold(dv, groups)))  # (2, B, K, T, D)
            if transfer is not None:
                recvs = transfer.wait()
                if step < ring.cp - 1:
                    kv = recvs[0]
                if acc is not None:
                    mine += recvs[-1]  # what the earlier ranks added to this block's gradients
            acc = mine
        if ring.cp > 1:  # one last hop: the accumulator of our own block arrives, complete
            (acc,) = ring.shift(acc).wait()
        dq_t, dk_t, dv_t = ctx.dtypes
        return dq.to(dq_t), acc[0].to(dk_t), acc[1].to(dv_t), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, *,
                   causal: bool, cp: int, cp_rank: int, seq_len: int | None = None,
                   meter: CommMeter | None = None, dropout: float = 0.0,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the whole sequence, for this rank's queries.

    q (B, H, Tl, D) and k, v (B, K, Tl, D) are this rank's tokens in split_sequence order (positions
    already applied: RoPE with local_positions); K may divide H (grouped-query attention). Returns
    (B, H, Tl, D) in q's dtype, equal to the matching rows of full attention. cp == 1 is plain local
    attention (dropout and attn_mask allowed there); under cp > 1 neither is supported.
    """
    B, H, Tl, D = q.shape
    K = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (Tl, D):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B, K, Tl, D) "
                         f"matching q {tuple(q.shape)}")
    if H % K:
        raise ValueError(f"kv heads ({K}) must divide query heads ({H})")
    if cp == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                              is_causal=causal and attn_mask is None, enable_gqa=K != H)
    if dropout > 0:
        raise ValueError(f"attention dropout ({dropout}) is not supported under context parallelism "
                         f"(cp = {cp}): set dropout to 0")
    if attn_mask is not None:
        raise ValueError(f"an explicit attn_mask is not supported under context parallelism (cp = {cp}): "
                         "only causal or full bidirectional attention")
    if group is None:
        raise ValueError(f"cp = {cp} needs its process group (got None)")
    if dist.get_world_size(group) != cp or dist.get_rank(group) != cp_rank:
        raise ValueError(f"cp ({cp}) and cp_rank ({cp_rank}) must be the group's size "
                         f"({dist.get_world_size(group)}) and this rank in it ({dist.get_rank(group)})")
    seq_len = Tl * cp if seq_len is None else seq_len
    if seq_len != Tl * cp:
        raise ValueError(f"seq_len ({seq_len}) must be cp ({cp}) x local tokens ({Tl})")
    _chunk_len(seq_len, cp, causal)  # the split must be even
    ring = _Ring(group, cp, cp_rank, causal, meter)
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), ring)
