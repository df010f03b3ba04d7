"""The dry run: any layout planned in one process on the meta device, its shards checked against the model."""

from __future__ import annotations

import time

import pytest

from meshlm import dryrun
from meshlm.config import param_count
from meshlm.layout import Layout, LayoutError
from meshlm.settings import RunConfig, TrainConfig, build_config


def run_config(preset: str, *, train: dict | None = None, **layout) -> RunConfig:
    cfg = build_config(overrides={"model.preset": preset})
    return RunConfig(preset=preset, model=cfg.model, layout=Layout(**layout), train=TrainConfig(**(train or {})),
                     data=cfg.data)


LAYOUTS = [
    ("gpt-tiny", dict(tp=2, dp=2)),
    ("gpt-tiny", dict(pp=2, tp=4, micro_batches=2)),  # tp 4 pads nothing (vocab 8192) but splits 4 heads
    ("llama-tiny", dict(tp=4, pp=2, micro_batches=2)),  # tp 4 > 2 kv heads: kv replicated over tp
    ("llama-tiny", dict(pp=2, vpp=1, cp=2, micro_batches=4, schedule="zb")),
    ("llama-moe-tiny", dict(ep=2, tp=2, dp=2, zero=2)),
    ("bert-tiny", dict(tp=2, pp=2, micro_batches=2, sequence_parallel=True)),
    ("mixtral-8x7b", dict(tp=2, pp=4, ep=8, dp=2, zero=1, micro_batches=8)),
    ("llama-70b", dict(tp=8, pp=4, dp=2, zero=3, vpp=2, schedule="interleaved", micro_batches=8)),
]


@pytest.mark.parametrize("preset,layout", LAYOUTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(LAYOUTS)])
def test_sum_of_shards_is_the_total(preset, layout, capsys):
    cfg = run_config(preset, train=dict(batch_size=128, seq_len=128), **layout)
    run = dryrun.plan(cfg)
    assert run.total == param_count(cfg.model.replace(vocab_size=run.vocab_size))["total"]
    assert run.sum_of_shards == run.total
    assert len(run.kinds) == cfg.layout.pp * cfg.layout.tp * cfg.layout.ep
    assert sum(k.ranks for k in run.kinds) == cfg.layout.world_size
    assert dryrun.main(cfg) == 0
    out = capsys.readouterr().out
    assert "parameters: sum of shards = total (OK)" in out
    assert f"world size: {cfg.layout.world_size} ranks" in out
    assert "memory: peak" in out and "schedule:" in out


def test_padded_vocabulary_is_not_counted():
    cfg = run_config("gpt-tiny", tp=4)
    cfg = RunConfig(preset="gpt-tiny", model=cfg.model.replace(vocab_size=1001), layout=cfg.layout, train=cfg.train)
    chunks = dryrun.build_rank(cfg.model, cfg.layout, 3)
    assert chunks[0].tok_emb.shape == (251, cfg.model.d_model)  # 1001 rows padded to 1004, a quarter each
    run = dryrun.plan(cfg)
    assert run.sum_of_shards == run.total  # 1001 padded to 1004 rows: 3 rows of zeros are not parameters


def real_rank_params(preset: str, layout: dict, vocab_size: int) -> tuple[int, dict[str, int]]:
    """On a worker: this rank's parameters as a real run builds them."""
    from meshlm.config import preset as get_preset
    from meshlm.mesh import Mesh
    from meshlm.model import build_model
    from meshlm.parallel.pipeline import PipelineStages

    cfg = get_preset(preset).replace(vocab_size=vocab_size)
    mesh = Mesh.build(Layout(**layout))
    model = PipelineStages(cfg, mesh=mesh) if mesh.layout.pp > 1 else build_model(cfg, mesh=mesh)
    return mesh.rank, {name: p.numel() for name, p in model.named_parameters()}


REAL = [
    ("llama-tiny", dict(tp=2)),
    ("gpt-tiny", dict(pp=2, micro_batches=2)),
    ("llama-moe-tiny", dict(ep=2)),
    ("bert-tiny", dict(tp=2, sequence_parallel=True)),
]


@pytest.mark.parametrize("preset,layout", REAL, ids=[p for p, _ in REAL])
def test_per_rank_counts_match_a_real_world_2_run(dist, preset, layout):
    cfg = run_config(preset, train=dict(batch_size=8, seq_len=64), **layout)
    run = dryrun.plan(cfg)
    by_rank = {k.first_rank: k for k in run.kinds}
    for rank, params in dist(2).run(real_rank_params, preset, layout, run.vocab_size):
        kind = by_rank[rank]
        assert kind.params == sum(params.values()), (rank, params)
        # and the meta-device build is that very module, name for name
        chunks = dryrun.build_rank(cfg.model.replace(vocab_size=run.vocab_size), cfg.layout, rank)
        meta = {name: p.numel() for ch in chunks for name, p in ch.named_parameters()}
        assert meta == params
        assert all(p.is_meta for ch in chunks for p in ch.parameters())


def test_llama_70b_on_1024_ranks_plans_in_seconds(capsys):
    cfg = run_config("llama-70b", train=dict(batch_size=512, seq_len=4096, recompute="selective", precision="bf16"),
                     tp=8, pp=8, dp=16, zero=1, sequence_parallel=True, micro_batches=16)
    start = time.perf_counter()
    assert dryrun.main(cfg) == 0
    assert time.perf_counter() - start < 20
    out = capsys.readouterr().out
    assert "world size: 1024 ranks" in out
    assert "distinct shards: 64 (pp x tp x ep), each held by 16 ranks" in out
    assert "schedule: 1f1b, 8 stages, 16 micro-batches; rank 0: F0 F1 F2 F3 F4 F5 F6 F7 B0 F8 B1" in out
    assert "bubble: 30.4% (simulated, t_f=1, t_b=2)" in out  # (p-1)/(m+p-1) = 7/23
    assert "parameters: sum of shards = total (OK)" in out


def test_memory_follows_the_formulas():
    from meshlm.memory import korthikanti_bytes_per_layer
    from meshlm.parallel.zero import zero_state_bytes

    cfg = run_config("llama-70b", train=dict(batch_size=64, seq_len=4096, recompute="selective", precision="bf16"),
                     tp=8, pp=8, dp=2, zero=1, sequence_parallel=True, micro_batches=8)
    run = dryrun.plan(cfg)
    first = run.kinds[0]
    states = zero_state_bytes(first.params, 2, 1)
    assert first.memory["optim"] == pytest.approx(states["optim"])
    assert first.memory["params"] == pytest.approx(states["params"])
    per_layer = korthikanti_bytes_per_layer(s=4096, b=4, h=8192, a=64, t=8, sequence_parallel=True,
                                            recompute="selective")
    assert first.in_flight == 8  # 1F1B: the first stage holds p micro-batches
    assert first.memory["activations"] == pytest.approx(per_layer * 10 * 8)
    assert run.kinds[-1].in_flight == 1


def test_bad_layout_raises_with_its_message():
    with pytest.raises(LayoutError, match=r"tp \(3\) must divide n_heads \(64\)"):
        dryrun.main(run_config("llama-70b", tp=3))
    with pytest.raises(LayoutError, match=r"must equal the world size \(8\)"):
        dryrun.main(run_config("llama-70b", tp=4), world_size=8)
    with pytest.raises(LayoutError, match=r"batch_size \(16\) must be divisible by dp\*ep\*micro_batches \(32\)"):
        dryrun.main(run_config("llama-70b", dp=32))


def test_train_dry_run_command(capsys):
    from meshlm.cli import main
    assert main(["train", "--dry-run", "--model", "llama-70b", "--layout.tp", "8", "--layout.pp", "8",
                 "--layout.dp", "16", "--layout.micro_batches", "16", "--train.batch_size", "512"]) == 0
    out = capsys.readouterr().out
    assert "world size: 1024 ranks" in out and "parameters: sum of shards = total (OK)" in out
    assert main(["train", "--dry-run", "--layout.tp", "3"]) == 2
    assert "tp (3) must divide n_heads (4)" in capsys.readouterr().err
