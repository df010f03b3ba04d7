"""Compressed gradient all-reduce for data parallelism: send fewer bytes, get (about) the same sum.

The data-parallel reducer (parallel/data.py) hands each bucket of gradients, after backward, to a
compressor's `reduce_(grads, group, key=..., meter=...)`, which replaces every tensor in place by the
(approximate) SUM of that tensor over the ranks of `group`. Two kinds:

    CastCompressor   all-reduce in bf16 or fp16: 2 bytes an element instead of 4.
    PowerSGD         rank-r power iteration with error feedback (Vogels et al. 2019,
                     "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
                     Optimization"): an n x m matrix costs (n + m) * r elements instead of n * m.

Every collective goes through `comm.all_reduce_` on the buffer actually sent, so the meter counts
bytes at their compressed size. `make_compressor` turns the `--compression` string into one.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from ..comm import CommMeter, all_reduce_

CHOICES = "none, bf16, fp16, powersgd, powersgd:RANK"


class Compressor(Protocol):
    name: str

    def reduce_(self, grads: list[torch.Tensor], group: dist.ProcessGroup | None, *, key: str,
                meter: CommMeter | None) -> None:
        """Replace each tensor of `grads` in place by the (approximate) SUM over `group`'s ranks."""


def _flat_all_reduce_(tensors: list[torch.Tensor], group: dist.ProcessGroup, *, dtype: torch.dtype,
                      scale: float, axis: str, meter: CommMeter | None) -> None:
    """Sum `tensors` over `group` through one flat `dtype` buffer, sent as (t * scale), divided back after."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) * scale for t in tensors]).to(dtype)
    all_reduce_(flat, group, axis=axis, meter=meter)
    out = flat.to(torch.float32) / scale if scale != 1.0 else flat
    offset = 0
    for t in tensors:
        t.copy_(out[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class CastCompressor:
    """All-reduce the bucket as one bf16 or fp16 buffer (half the bytes of fp32).

    fp16 has 5 exponent bits (max 65504), so a sum over W ranks may overflow: each rank sends g / W
    and the result is multiplied back by W, i.e. the all-reduce computes the mean. bf16 has fp32's
    exponent range and is summed directly; it keeps 8 bits of mantissa (relative error ~4e-3 a value).
    """

    def __init__(self, *, dtype: torch.dtype = torch.bfloat16, axis: str = "dp"):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        if dtype not in names:
            raise ValueError(f"CastCompressor dtype ({dtype}) must be torch.bfloat16 or torch.float16")
        self.dtype, self.axis, self.name = dtype, axis, names[dtype]

    def reduce_(self, grads: list[torch.Tensor], group: dist.ProcessGroup | None, *, key: str,
                meter: CommMeter | None) -> None:
        if group is None or not grads:
            return
        world = dist.get_world_size(group)
        scale = 1.0 / world if self.dtype == torch.float16 else 1.0
        _flat_all_reduce_(grads, group, dtype=self.dtype, scale=scale, axis=self.axis, meter=meter)


@dataclass
class _BucketState:
    """What PowerSGD keeps between steps for one bucket (one `key`)."""

    shapes: list[torch.Size]
    generator: torch.Generator
    qs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Tensor index -> Q (m x r) of the last step, identical on all ranks (the warm start)."""
    errors: dict[int, torch.Tensor] = field(default_factory=dict)
    """Tensor index -> this rank's error feedback e (n x m, fp32): what its last updates did not send."""


class PowerSGD:
    """Rank-r PowerSGD with error feedback (Vogels et al. 2019, Algorithms 1-2), with SUM semantics.

    Rank i views each gradient as a matrix G_i (n x m: the first dim by the rest), adds its error and
    runs one step of subspace (power) iteration on the sum S = sum_i M_i:

        M_i = G_i + e_i
        P   = sum_i M_i Q  = S Q            (all-reduce 1: n x r per matrix)
        P^  = orth(P)                       (QR; the span of S Q, identical on every rank)
        Q_i = M_i^T P^,  Q = sum_i Q_i = S^T P^   (all-reduce 2: m x r per matrix)
        result = P^ Q^T = P^ P^^T S         (S projected onto an r-dim column space)
        e_i <- M_i - P^ Q_i^T = (I - P^ P^^T) M_i

    SUM all-reduces need no 1/W: orth() is scale-free, and Q = S^T P^ is linear in S, so the result is
    the projection of the sum itself. The local errors add up to what the result missed,
    sum_i e_i = S - result, and are added back next step: over T steps of a fixed gradient sum G,
    mean(results) = G - (sum_i e_i after T) / T -> G, so the compression is unbiased over time.

    Q starts from a normal draw of a generator seeded from (seed, key), identical on all ranks, and
    is warm-started from the last step's Q (power iteration across steps). 1-D tensors, and matrices
    with n * m < min_compression_rate * (n + m) * r, are summed exactly in one flat buffer.
    All P's of a bucket go in one all-reduce and all Q's in another: at most three collectives a bucket.
    """

    def __init__(self, *, rank: int = 2, warm_start: bool = True, min_compression_rate: float = 2.0,
                 seed: int = 0, axis: str = "dp"):
        if rank < 1:
            raise ValueError(f"PowerSGD rank ({rank}) must be >= 1")
        self.rank, self.warm_start, self.min_compression_rate = rank, warm_start, min_compression_rate
        self.seed, self.axis = seed, axis
        self.name = f"powersgd:{rank}"
        self.state: dict[str, _BucketState] = {}

    def _matrix_rank(self, shape: torch.Size) -> int:
        """r for a tensor of `shape`, or 0 to send it uncompressed."""
        if len(shape) < 2:
            return 0
        n = shape[0]
        m = shape.numel() // max(n, 1)
        r = min(self.rank, n, m)
        return r if n * m >= self.min_compression_rate * (n + m) * r else 0

    def _bucket(self, key: str, grads: list[torch.Tensor]) -> _BucketState:
        shapes = [g.shape for g in grads]
        st = self.state.get(key)
        if st is None:
            # zlib.crc32, not hash(): Python salts str hashes per process, and every rank must agree.
            gen = torch.Generator().manual_seed(self.seed * 2**32 + zlib.crc32(key.encode()))
            st = self.state[key] = _BucketState(shapes=shapes, generator=gen)
        elif st.shapes != shapes:
            raise ValueError(f"PowerSGD bucket {key!r} changed shapes from {st.shapes} to {shapes}")
        return st

    def reduce_(self, grads: list[torch.Tensor], group: dist.ProcessGroup | None, *, key: str,
                meter: CommMeter | None) -> None:
        """Every rank must call this for the same keys, in the same order, with the same shapes."""
        if group is None or not grads:
            return
        st = self._bucket(key, grads)
        rs = [self._matrix_rank(g.shape) for g in grads]  # r per tensor, 0: uncompressed
        exact = [g for g, r in zip(grads, rs) if r == 0]
        if exact:  # sent as is, in the widest dtype among them
            dtype = functools.reduce(torch.promote_types, [g.dtype for g in exact])
            _flat_all_reduce_(exact, group, dtype=dtype, scale=1.0, axis=self.axis, meter=meter)
        todo = [i for i, r in enumerate(rs) if r > 0]
        if not todo:
            return

        ms = {}  # M_i = G_i + e_i, fp32
        for i in todo:
            g = grads[i]
            mat = g.detach().to(torch.float32, copy=True).reshape(g.shape[0], -1)  # (n, m)
            if i in st.errors:
                mat += st.errors[i]
            if i not in st.qs or not self.warm_start:
                st.qs[i] = torch.randn(mat.shape[1], rs[i], generator=st.generator)  # (m, r)
            ms[i] = mat

        # P = sum_i M_i Q, all matrices of the bucket in one buffer
        p_flat = torch.cat([(ms[i] @ st.qs[i]).reshape(-1) for i in todo])
        all_reduce_(p_flat, group, axis=self.axis, meter=meter)
        p_hat, offset = {}, 0
        for i in todo:
            n, r = ms[i].shape[0], rs[i]
            p_hat[i] = torch.linalg.qr(p_flat[offset:offset + n * r].view(n, r)).Q  # (n, r), orthonormal
            offset += n * r

        # Q = sum_i M_i^T P^; keep the local Q_i for the error
        local_q = {i: ms[i].T @ p_hat[i] for i in todo}  # (m, r)
        q_flat = torch.cat([local_q[i].reshape(-1) for i in todo])
        all_reduce_(q_flat, group, axis=self.axis, meter=meter)
        offset = 0
        for i in todo:
            m, r = ms[i].shape[1], rs[i]
            q = q_flat[offset:offset + m * r].view(m, r)
            offset += m * r
            st.errors[i] = ms[i] - p_hat[i] @ local_q[i].T
            grads[i].copy_((p_hat[i] @ q.T).view_as(grads[i]))
            st.qs[i] = q.clone()  # warm start for the next step


def make_compressor(name: str, *, axis: str = "dp") -> Compressor | None:
    """'none' -> None, 'bf16', 'fp16', 'powersgd' (rank 2), 'powersgd:R' (rank R)."""
    if name == "none":
        return None
    if name in ("bf16", "fp16"):
        return CastCompressor(dtype=torch.bfloat16 if name == "bf16" else torch.float16, axis=axis)
    if name == "powersgd":
        return PowerSGD(rank=2, axis=axis)
    if name.startswith("powersgd:"):
        rank = name.split(":", 1)[1]
        if not rank.isdigit() or int(rank) < 1:
            raise ValueError(f"compression ({name!r}): RANK ({rank!r}) must be a positive integer")
        return PowerSGD(rank=int(rank), axis=axis)
    raise ValueError(f"compression ({name!r}) must be one of: {CHOICES}")
