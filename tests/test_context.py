"""Context parallelism: the sequence split, and ring attention against single-process attention."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshlm.comm import CommMeter
from meshlm.parallel import context as C
from meshlm.parallel.context import chunk_ids, gather_sequence, local_positions, ring_attention, split_sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- the split (pure) ----------------------------------------------------------------------------


def test_chunk_ids():
    assert [chunk_ids(2, r, causal=True) for r in range(2)] == [[0, 3], [1, 2]]
    assert [chunk_ids(4, r, causal=True) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [chunk_ids(4, r, causal=False) for r in range(4)] == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="cp_rank"):
        chunk_ids(2, 2, causal=True)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_split_gather_round_trip(cp, causal):
    x = torch.randn(2, 16, 3)
    parts = [split_sequence(x, cp, r, causal=causal) for r in range(cp)]
    assert all(p.shape == (2, 16 // cp, 3) for p in parts)
    assert torch.equal(gather_sequence(parts, cp, causal=causal), x)
    y = torch.randn(2, 4, 16, 5)  # (B, H, T, D): the layout attention sees
    parts = [split_sequence(y, cp, r, causal=causal, dim=2) for r in range(cp)]
    assert torch.equal(gather_sequence(parts, cp, causal=causal, dim=2), y)
    # the part is exactly the tokens at local_positions
    for r, p in enumerate(parts):
        assert torch.equal(p, y[:, :, local_positions(16, cp, r, causal=causal)])


def test_local_positions():
    assert local_positions(8, 2, 0, causal=True).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1, causal=True).tolist() == [2, 3, 4, 5]
    assert local_positions(16, 4, 1, causal=True).tolist() == [2, 3, 12, 13]
    assert local_positions(8, 2, 1, causal=False).tolist() == [4, 5, 6, 7]
    assert local_positions(16, 4, 3, causal=False).tolist() == [12, 13, 14, 15]
    for cp in (2, 4):
        for causal in (True, False):
            all_pos = torch.cat([local_positions(16, cp, r, causal=causal) for r in range(cp)])
            assert sorted(all_pos.tolist()) == list(range(16))
            assert local_positions(16, cp, 0, causal=causal).dtype == torch.long


def test_split_needs_divisible_length():
    with pytest.raises(ValueError, match=r"divisible by 2\*cp \(8\)"):
        split_sequence(torch.zeros(1, 12), 4, 0, causal=True)
    with pytest.raises(ValueError, match=r"divisible by cp \(4\)"):
        split_sequence(torch.zeros(1, 10), 4, 0, causal=False)


# --- ring attention (single process) -------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cp1_is_sdpa(causal, kv_heads):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, kv_heads, 16, 8), torch.randn(2, kv_heads, 16, 8)
    out = ring_attention(q, k, v, None, causal=causal, cp=1, cp_rank=0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_block_kernels_agree(causal):
    """The fused CPU kernel and the plain formulas (other devices) give one sub-block's output, log-sum-exp
    and, given the rows' *final* output and log-sum-exp, that block's share of dq, dk and dv: merging two
    blocks of keys and summing their gradients equals attention over all the keys (float64, exact)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 3, 8, 4, generator=g, dtype=torch.float64) for _ in range(4))
    k2, v2 = (torch.randn(2, 3, 8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    scale = 0.5
    for fwd, bwd in ((C._fused_forward, C._fused_backward), (C._explicit_forward, C._explicit_backward)):
        out_a, lse_a = fwd(q, k2, v2, False, scale)  # an earlier block, seen wholly
        out_b, lse_b = fwd(q, k, v, causal, scale)  # the diagonal block
        lse = torch.logaddexp(lse_a, lse_b)
        out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
        whole = (q, torch.cat((k2, k), 2), torch.cat((v2, v), 2))
        ref_q, ref_k, ref_v = (t.clone().requires_grad_(True) for t in whole)
        mask = torch.ones(8, 16, dtype=torch.bool)
        if causal:
            mask[:, 8:] = torch.ones(8, 8, dtype=torch.bool).tril()
        ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, attn_mask=mask, scale=scale)
        ref.backward(do)
        torch.testing.assert_close(out, ref.detach())
        dq_a, dk_a, dv_a = bwd(do, q, k2, v2, out, lse, False, scale)
        dq_b, dk_b, dv_b = bwd(do, q, k, v, out, lse, causal, scale)
        torch.testing.assert_close(dq_a + dq_b, ref_q.grad)
        torch.testing.assert_close(torch.cat((dk_a, dk_b), 2), ref_k.grad)
        torch.testing.assert_close(torch.cat((dv_a, dv_b), 2), ref_v.grad)


def test_refuses_dropout_and_mask():
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="dropout"):
        ring_attention(q, k, v, None, causal=True, cp=2, cp_rank=0, dropout=0.1)
    with pytest.raises(ValueError, match="attn_mask"):
        ring_attention(q, k, v, None, causal=True, cp=2, cp_rank=0, attn_mask=torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="process group"):
        ring_attention(q, k, v, None, causal=True, cp=2, cp_rank=0)
    with pytest.raises(ValueError, match="kv heads"):
        ring_attention(q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4), None, causal=True, cp=1, cp_rank=0)


# --- ring attention against full attention (distributed) -----------------------------------------


def ring_parity(causal: bool, H: int, K: int, T: int, dtype: torch.dtype = torch.float32, cp_stride: int = 0):
    """Each rank builds the same whole q, k, v, runs SDPA on them, and compares its own rows with ring
    attention on its part. cp_stride > 0: the cp groups are {r, r + stride, ...} (ranks not adjacent)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    if cp_stride:
        groups = [dist.new_group(list(range(s, world, cp_stride))) for s in range(cp_stride)]
        group = groups[rank % cp_stride]
    cp, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(1234)
    B, D = 2, 8
    q, k, v = (torch.randn(B, n, T, D, generator=g).to(dtype) for n in (H, K, K))
    grad = torch.randn(B, H, T, D, generator=g).to(dtype)
    ref_q, ref_k, ref_v = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, is_causal=causal, enable_gqa=K != H)
    ref.backward(grad)

    def mine(t):
        return split_sequence(t, cp, cp_rank, causal=causal, dim=2)

    lq, lk, lv = (mine(t).clone().requires_grad_(True) for t in (q, k, v))
    meter = CommMeter()
    out = ring_attention(lq, lk, lv, group, causal=causal, cp=cp, cp_rank=cp_rank, meter=meter)
    forward_bytes = meter.total_bytes()
    out.backward(mine(grad))
    return {
        "out": (out.detach(), mine(ref.detach())),
        "dq": (lq.grad, mine(ref_q.grad)),
        "dk": (lk.grad, mine(ref_k.grad)),
        "dv": (lv.grad, mine(ref_v.grad)),
        "forward_bytes": forward_bytes,
        "total_bytes": meter.total_bytes(),
        "kv_bytes": lk.numel() * lk.element_size() + lv.numel() * lv.element_size(),
        "acc_bytes": 2 * lk.numel() * 4,  # the fp32 dk, dv accumulator
        "cp": cp,
        "whole_out": ref.detach(),
    }


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,K", [(4, 4), (4, 2)])
def test_ring_attention_parity(dist, world, causal, H, K):
    results = dist(world).run(ring_parity, causal, H, K, 32)
    for rank, r in enumerate(results):
        for key in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(*r[key], rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {key}")
    # the parts put back together are the whole output
    whole = gather_sequence([r["out"][0] for r in results], world, causal=causal, dim=2)
    torch.testing.assert_close(whole, results[0]["whole_out"], rtol=1e-5, atol=1e-5)


def test_ring_attention_strided_groups_and_bf16(dist):
    """Two cp groups of 2 inside world 4, {0, 2} and {1, 3}: peers are addressed by global rank."""
    for r in dist(4).run(ring_parity, True, 4, 2, 16, torch.float32, 2):
        assert r["cp"] == 2
        for key in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(*r[key], rtol=1e-5, atol=1e-5, msg=key)
    for r in dist(2).run(ring_parity, True, 4, 2, 16, torch.bfloat16):
        assert r["out"][0].dtype == torch.bfloat16 and r["dk"][0].dtype == torch.bfloat16
        for key in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(*r[key], rtol=2e-2, atol=2e-2, msg=key)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_bytes(dist, world):
    """Forward: (cp - 1) steps x (k + v block bytes). Backward adds (cp - 1) k/v blocks and cp fp32
    dk/dv accumulators (the last hop brings them home)."""
    for r in dist(world).run(ring_parity, True, 4, 2, 16):
        cp = r["cp"]
        assert r["forward_bytes"] == (cp - 1) * r["kv_bytes"]
        assert r["total_bytes"] == 2 * (cp - 1) * r["kv_bytes"] + cp * r["acc_bytes"]


def test_ring_kernel_bench_runs_both_kernels():
    """`python -m meshlm.bench.ring_kernel` times the fused and the plain block kernels on the same inputs."""
    from meshlm.bench import ring_kernel

    (row,) = ring_kernel.measure(shapes=((2, 2, 8, 8),), pairs=1)
    assert row["shape"] == [2, 2, 8, 8] and row["fused_s"] > 0 and row["plain_s"] > 0 and row["speedup"] > 0
