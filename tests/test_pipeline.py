"""Pipeline parallelism: every schedule's loss curve and parameters against one process."""

import dataclasses
import re

import pytest
import torch

from meshlm.layout import Layout, LayoutError, validate
from meshlm.config import PRESETS
from meshlm.mesh import Mesh
from meshlm.parallel.pipeline import partition


def pp_record(path: str, preset: str, layout: Layout, steps: int, n_layers: int):
    from meshlm.data import TokenDataset
    from meshlm.settings import build_config
    from meshlm.train.trainer import Trainer
    overrides = {"model.preset": preset, "data.path": path, "train.batch_size": 8, "train.seq_len": 32,
                 "train.warmup_steps": 2, "train.steps": steps, "train.lr": 3e-3, "model.n_layers": n_layers,
                 "train.eval_batches": 1, "model.vocab_size": 512}
    overrides.update({f"layout.{f.name}": getattr(layout, f.name) for f in dataclasses.fields(layout)})
    cfg = build_config(overrides=overrides)
    trainer = Trainer(cfg, mesh=Mesh.build(layout), device=torch.device("cpu"), dataset=TokenDataset.open(path))
    losses = [trainer.step().loss for _ in range(steps)]
    val = trainer.evaluate()
    params, _, _ = trainer.full_state()
    bubble = trainer.pipeline.bubble() if trainer.pipeline is not None else 0.0
    return {"losses": losses, "params": params, "val": val, "bubble": bubble}


CASES = [  # preset, pp, schedule, vpp, n_layers, dp
    ("gpt-tiny", 2, "gpipe", 1, 4, 1), ("gpt-tiny", 2, "1f1b", 1, 4, 1), ("gpt-tiny", 2, "zb", 1, 4, 1),
    ("gpt-tiny", 2, "interleaved", 2, 4, 1), ("llama-tiny", 4, "gpipe", 1, 4, 1), ("llama-tiny", 4, "1f1b", 1, 4, 1),
    ("llama-tiny", 4, "zb", 1, 4, 1), ("llama-tiny", 4, "interleaved", 2, 8, 1), ("gpt-tiny", 2, "1f1b", 1, 4, 2),
    ("gpt-tiny", 4, "1f1b", 1, 4, 1), ("gpt-tiny", 4, "zb", 1, 4, 1), ("llama-tiny", 2, "gpipe", 1, 4, 1),
    ("llama-tiny", 2, "interleaved", 2, 4, 1),
]


@pytest.mark.parametrize("preset, pp, schedule, vpp, n_layers, dp", CASES)
def test_pipeline_matches_single_process(dist, tiny_dataset, preset, pp, schedule, vpp, n_layers, dp):
    """20 steps (4 micro-batches) follow the single-process loss curve; the gathered parameters and the
    validation loss agree too. GPT's tied embedding lives on the first and the last stage."""
    torch.set_num_threads(1)
    path, steps = str(tiny_dataset.path), 20
    ref = pp_record(path, preset, Layout(micro_batches=4), steps, n_layers)
    layout = Layout(pp=pp, dp=dp, vpp=vpp, schedule=schedule, micro_batches=4)
    for r in dist(pp * dp).run(pp_record, path, preset, layout, steps, n_layers):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["val"] == pytest.approx(ref["val"], rel=1e-5)
        assert set(r["params"]) == set(ref["params"])
        for n, p in ref["params"].items():
            if n.endswith("attn.wk.bias"):
                continue  # its true gradient is 0: Adam amplifies float noise (see test_tensor)
            # 20 Adam steps on float-noise-level differences: a few elements drift by ~1e-5
            torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=3e-5, msg=f"param {n}")
        assert 0.0 <= r["bubble"] < 1.0


def test_explicit_and_balanced_split(dist, tiny_dataset):
    """An uneven explicit split (3 blocks, then 1 with the head) and a params-balanced one follow one process."""
    torch.set_num_threads(1)
    path = str(tiny_dataset.path)
    ref = pp_record(path, "gpt-tiny", Layout(micro_batches=2), 5, 4)
    for layout in (Layout(pp=2, micro_batches=2, pp_split="3,1"), Layout(pp=2, micro_batches=2, pp_balance="params")):
        for r in dist(2).run(pp_record, path, "gpt-tiny", layout, 5, 4):
            assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)


def test_stage_ranges():
    from meshlm.parallel.pipeline import stage_ranges
    cfg = PRESETS["gpt-small"].replace(vocab_size=8192, n_layers=8)
    sizes = lambda layout: [len(r) for r in stage_ranges(cfg, layout)]  # noqa: E731
    assert sizes(Layout(pp=4)) == [2, 2, 2, 2]
    # the embedding (2.1M parameters) and the tied head weigh as much as a few blocks (0.8M each)
    assert sizes(Layout(pp=4, pp_balance="params")) == [1, 3, 3, 1]
    assert sizes(Layout(pp=4, pp_balance="flops")) == [2, 2, 3, 1]  # the head's matmul, not the lookup
    assert sizes(Layout(pp=2, pp_split="3,5")) == [3, 5]
    # a cost-balanced split minimises the most expensive stage
    assert partition(6, 3, costs=[1] * 6, last=2) == [range(0, 2), range(2, 5), range(5, 6)]


def test_partition():
    assert partition(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert partition(5, 2) == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match=re.escape("pp*vpp (5) must not exceed n_layers (4)")):
        partition(4, 5)


GPT4 = PRESETS["gpt-tiny"].replace(vocab_size=512, n_layers=4)


@pytest.mark.parametrize("layout, message", [
    (Layout(pp=8), "pp*vpp (8) must not exceed n_layers (4)"),
    (Layout(pp=2, micro_batches=1), "micro_batches (1) must be >= pp (2) for the 1f1b schedule"),
    (Layout(pp=4, micro_batches=2, schedule="zb"), "micro_batches (2) must be >= pp (4) for the zb schedule"),
    (Layout(pp=2, vpp=3, schedule="interleaved", micro_batches=2),
     "pp*vpp (6) must not exceed n_layers (4)"),
    (Layout(pp=2, vpp=2, schedule="interleaved", micro_batches=2), None),
    (Layout(pp=2, micro_batches=2, pp_split="3,2"), "pp_split ('3,2') must give pp*vpp (2) positive block counts "
                                                    "summing to n_layers (4)"),
    (Layout(pp=2, micro_batches=2, pp_split="4"), "pp_split ('4') must give pp*vpp (2)"),
    (Layout(pp=2, micro_batches=2, pp_balance="vibes"), "pp_balance ('vibes') must be one of layers, params, flops"),
])
def test_pipeline_bad_input(layout, message):
    if message is None:
        validate(layout, GPT4)
        return
    with pytest.raises(LayoutError, match=re.escape(message)):
        validate(layout, GPT4)
    validate(Layout(pp=2, micro_batches=1, schedule="gpipe"), GPT4)  # GPipe takes any number of micro-batches


def test_vpp_must_divide_layers_per_stage():
    with pytest.raises(LayoutError, match=re.escape("vpp (2) must divide the layers per stage (n_layers 6 / pp 2)")):
        validate(Layout(pp=2, vpp=2, schedule="interleaved", micro_batches=2), GPT4.replace(n_layers=6))


@pytest.mark.parametrize("layout", [Layout(pp=2, tp=2, micro_batches=4, schedule="1f1b"),
                                    Layout(pp=2, tp=2, sequence_parallel=True, micro_batches=4, schedule="zb")])
def test_pipeline_and_tensor_parallel_compose(dist, tiny_dataset, layout):
    """tp x pp (with sequence parallelism) on 4 ranks follows the single-process curve."""
    torch.set_num_threads(1)
    path = str(tiny_dataset.path)
    ref = pp_record(path, "llama-tiny", Layout(micro_batches=4), 10, 4)
    for r in dist(4).run(pp_record, path, "llama-tiny", layout, 10, 4):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        assert r["val"] == pytest.approx(ref["val"], rel=1e-4)
        for n, p in ref["params"].items():
            # after 10 Adam steps, whose update divides by sqrt(v) of tiny gradients, one element in
            # ~10^5 may differ by ~1e-5 (1/300 of one step's size, lr 3e-3) from reduction order alone
            torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=5e-5, msg=f"param {n}")


def test_three_dimensional_layout(dist, tiny_dataset):
    """dp x tp x pp = 2 x 2 x 2 on 8 ranks (GPT, tied embedding across stages) follows one process."""
    torch.set_num_threads(1)
    path = str(tiny_dataset.path)
    ref = pp_record(path, "gpt-tiny", Layout(micro_batches=2), 5, 4)
    layout = Layout(dp=2, tp=2, pp=2, micro_batches=2, schedule="1f1b")
    for r in dist(8).run(pp_record, path, "gpt-tiny", layout, 5, 4):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-4)
