"""Compressed gradient all-reduce (bf16, fp16, PowerSGD) on 2 gloo ranks, checked against the exact sum."""

import pytest
import torch
import torch.distributed as dist

from meshlm.comm import CommMeter, all_reduce_
from meshlm.parallel.compress import CastCompressor, PowerSGD, make_compressor

NAMES = ["bf16", "fp16", "powersgd", "powersgd:1"]


def rank_grads(rank: int, shapes) -> list[torch.Tensor]:
    """The gradients rank `rank` holds: a fixed draw per (rank, shape index)."""
    return [torch.randn(s, generator=torch.Generator().manual_seed(100 * rank + i)) for i, s in enumerate(shapes)]


# --- functions run on every rank (module level, so the workers can import them) ------------------


def cast_on_ranks(name: str, shapes, offset: float):
    rank, world = dist.get_rank(), dist.get_world_size()
    grads = [g + offset for g in rank_grads(rank, shapes)]
    exact = [sum(t) for t in zip(*([g + offset for g in rank_grads(r, shapes)] for r in range(world)))]
    meter = CommMeter()
    make_compressor(name).reduce_(grads, dist.group.WORLD, key="b0", meter=meter)
    return {"grads": grads, "exact": exact, "bytes": meter.total_bytes(),
            "calls": sum(s.calls for s in meter.stats.values())}


def powersgd_rank_one():
    """The same rank-1 matrix on both ranks, plus a bias and a matrix too small to compress."""
    rank = dist.get_rank()
    u, v = torch.arange(1.0, 33.0), torch.linspace(-1.0, 1.0, 24)
    grads = [torch.outer(u, v), torch.full((24,), float(rank + 1)), torch.full((4, 4), float(rank))]
    meter = CommMeter()
    PowerSGD(rank=2).reduce_(grads, dist.group.WORLD, key="b0", meter=meter)
    return {"grads": grads, "exact": [2 * torch.outer(u, v), torch.full((24,), 3.0), torch.ones(4, 4)],
            "bytes": meter.total_bytes()}


def powersgd_error_feedback(n: int, warm_start: bool, calls: int):
    """The same full-rank n x n gradient `calls` times: the running mean of the outputs vs the true sum."""
    rank, world = dist.get_rank(), dist.get_world_size()
    exact = sum(rank_grads(r, [(n, n)])[0] for r in range(world))
    comp, meter = PowerSGD(rank=2, warm_start=warm_start), CommMeter()
    total, errors, bytes_per_call = torch.zeros(n, n), [], []
    for t in range(calls):
        g = rank_grads(rank, [(n, n)])[0]
        comp.reduce_([g], dist.group.WORLD, key="b0", meter=meter)
        bytes_per_call.append(meter.total_bytes())
        meter.reset()
        total += g
        errors.append(((total / (t + 1) - exact).norm() / exact.norm()).item())
    return {"errors": errors, "bytes": bytes_per_call, "last": g}


def train_linear(names, steps: int = 60, lr: float = 0.1):
    """Data-parallel SGD on a linear regression (8 outputs x 16 inputs), one loss curve per compressor."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)  # same teacher on all ranks
    w_true = torch.randn(8, 16, generator=gen)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1 + rank))  # each rank its own shard
    y = x @ w_true.T + 0.01 * torch.randn(64, 8, generator=torch.Generator().manual_seed(9 + rank))
    curves = {}
    for name in names:
        model = torch.nn.Linear(16, 8)
        torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        comp, losses = make_compressor(name), []
        for _ in range(steps):
            loss = (model(x) - y).pow(2).sum(1).mean()
            model.zero_grad()
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            if comp is None:
                for g in grads:
                    all_reduce_(g, dist.group.WORLD, axis="dp")
            else:
                comp.reduce_(grads, dist.group.WORLD, key="bucket0", meter=None)
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad / world  # mean gradient
            t = torch.tensor([loss.item()])
            all_reduce_(t, dist.group.WORLD, axis="dp")
            losses.append(t.item() / world)
        curves[name] = losses
    return curves


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_group_none_leaves_grads_unchanged(name):
    grads = rank_grads(0, [(8, 16), (16,), (64, 64)])
    before = [g.clone() for g in grads]
    meter = CommMeter()
    make_compressor(name).reduce_(grads, None, key="b0", meter=meter)
    for g, b in zip(grads, before):
        assert torch.equal(g, b)
    assert meter.total_bytes() == 0


@pytest.mark.parametrize("name, tol", [("bf16", 1e-2), ("fp16", 1e-3)])
def test_cast_close_to_sum(dist, name, tol):
    # offset 4e4: the sum (~8e4) is beyond fp16's 65504, so fp16 must pre-divide by the world size
    shapes = [(8, 16), (16,), (3, 4, 5)]
    for offset in (0.0, 4e4):
        r0, r1 = dist(2).run(cast_on_ranks, name, shapes, offset)
        numel = sum(torch.Size(s).numel() for s in shapes)
        assert r0["bytes"] == r1["bytes"] == numel * 2 and r0["calls"] == 1
        for a, b, exact in zip(r0["grads"], r1["grads"], r0["exact"]):
            assert torch.equal(a, b)
            assert torch.isfinite(a).all()
            assert (a - exact).norm() / exact.norm() < tol


def test_powersgd_exact_on_rank_one(dist):
    r0, r1 = dist(2).run(powersgd_rank_one)
    for a, b, exact in zip(r0["grads"], r1["grads"], r0["exact"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, exact, rtol=1e-4, atol=1e-4)
    # P (32x2) + Q (24x2) in fp32, then the bias (24) and the 4x4 matrix sent exactly
    assert r0["bytes"] == (32 * 2 + 24 * 2) * 4 + (24 + 16) * 4


@pytest.mark.parametrize("warm_start", [True, False])
def test_powersgd_error_feedback_unbiased(dist, warm_start):
    # mean of T outputs = sum - (errors after T) / T: once the error stops growing (after ~n/r calls),
    # the mean's error falls as 1/T. Rank 2 of 16x16 saturates early enough for 60 calls.
    r0, r1 = dist(2).run(powersgd_error_feedback, 16, warm_start, 60)
    assert torch.equal(r0["last"], r1["last"])
    errors = r0["errors"]
    assert errors[0] > 0.5  # one rank-2 step misses most of a random full-rank matrix
    assert errors[-1] < 0.15 * errors[0], errors
    assert errors[-1] < 0.7 * errors[29], errors  # still falling (1/T), not stuck at a bias


def test_powersgd_sends_fewer_bytes(dist):
    r0, r1 = dist(2).run(powersgd_error_feedback, 64, True, 2)
    assert r0["bytes"] == r1["bytes"] == [(64 + 64) * 2 * 4] * 2  # P and Q in fp32
    assert r0["bytes"][0] < 64 * 64 * 4 / 10  # vs 16 KiB uncompressed


def test_training_converges_with_every_compressor(dist):
    curves = dist(2).run(train_linear, ["none"] + NAMES)[0]
    base = curves["none"]
    assert base[-1] < 0.01 * base[0]
    for name in NAMES:
        losses = curves[name]
        assert losses[0] == base[0]
        assert losses[-1] < 0.01 * losses[0], (name, losses[::10])  # rank 1 of 8x16 is the slowest: ~4e-3
    for name in ("bf16", "fp16"):  # a cast changes the sum by ~1e-3: the same curve
        assert abs(curves[name][-1] - base[-1]) < 0.05 * base[-1]


def test_make_compressor_parses():
    assert make_compressor("none") is None
    assert make_compressor("bf16").name == "bf16" and make_compressor("fp16").name == "fp16"
    assert isinstance(make_compressor("bf16"), CastCompressor)
    assert make_compressor("powersgd").rank == 2 and make_compressor("powersgd:4").rank == 4
    with pytest.raises(ValueError, match=r"^compression \('zip'\) must be one of: "
                                         r"none, bf16, fp16, powersgd, powersgd:RANK$"):
        make_compressor("zip")
    for bad in ("powersgd:0", "powersgd:x", "powersgd:"):
        with pytest.raises(ValueError, match=r"RANK .* must be a positive integer"):
            make_compressor(bad)
    with pytest.raises(ValueError, match=r"rank \(0\) must be >= 1"):
        PowerSGD(rank=0)
    with pytest.raises(ValueError, match=r"dtype \(torch.float32\)"):
        CastCompressor(dtype=torch.float32)
