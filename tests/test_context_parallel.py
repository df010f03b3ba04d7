"""Context parallelism through the model and the trainer, against one process: logits, gradients, curves."""

import pytest
import torch
import torch.distributed as dist

from meshlm.layout import Layout, LayoutError, validate
from meshlm.config import PRESETS
from meshlm.parallel.context import gather_sequence

from test_expert import make_trainer_with


def cp_record(data_path, preset, layout, steps, model_overrides):
    """Whole logits (gathered over cp), step-0 gradients and a loss curve."""
    trainer = make_trainer_with(data_path, preset, layout, steps, model_overrides)
    logits = None
    if trainer.pipeline is None:
        x, _, types = trainer.batch(trainer.dataset.train, 0, seed=trainer.cfg.train.seed)
        (x_local, t_local) = trainer.split_sequence(x, types)
        with torch.no_grad():
            local = trainer.model.full_logits(trainer.model(x_local, token_types=t_local))
        cp = trainer.model.cp
        if cp.size > 1:
            parts = [torch.empty_like(local) for _ in range(cp.size)]
            dist.all_gather(parts, local.contiguous(), group=cp.group)
            local = gather_sequence(parts, cp.size, causal=cp.causal)
        logits = local
    loss0 = trainer.compute_gradients(0).item()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    shards = {n: p.meshlm_shard for n, p in trainer.model.named_parameters() if p.meshlm_shard is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    losses = [trainer.step().loss for _ in range(steps)]
    val = trainer.evaluate()
    return {"data_rank": trainer.mesh.data_rank, "logits": logits, "loss0": loss0, "grads": grads,
            "shards": shards, "losses": losses, "val": val, "moe": trainer.moe_metrics,
            "cp_bytes": sum(s.bytes for k, s in trainer.meter.stats.items() if k[1] == "cp")}


def check(ref, results, *, rel=1e-5):
    n_data = len({r["data_rank"] for r in results})
    rows = ref["logits"].shape[0] // n_data
    for r in results:
        d = r["data_rank"]
        if r["logits"] is not None:
            torch.testing.assert_close(r["logits"], ref["logits"][d * rows:(d + 1) * rows], rtol=1e-4, atol=1e-5)
        assert r["loss0"] == pytest.approx(ref["loss0"], rel=1e-6)
        for n, mine in r["grads"].items():
            g = ref["grads"][n]
            s = r["shards"].get(n)
            if s is not None:
                g = g.chunk(s.parts, dim=s.dim)[s.index]
            torch.testing.assert_close(mine, g, rtol=1e-4, atol=1e-6, msg=f"grad of {n}")
        assert r["losses"] == pytest.approx(ref["losses"], rel=rel)
        assert r["val"] == pytest.approx(ref["val"], rel=rel)


@pytest.mark.parametrize("world, preset, layout", [
    (2, "gpt-tiny", Layout(cp=2)),  # causal, learned positions, load-balanced split
    (2, "bert-tiny", Layout(cp=2)),  # bidirectional, token types, MLM targets
    (4, "llama-tiny", Layout(cp=4)),  # RoPE at global positions, GQA
    (4, "llama-tiny", Layout(cp=2, dp=2)),
    (8, "bert-tiny", Layout(cp=2, pp=2, dp=2, micro_batches=2)),  # BERT (tied MLM head) over dp x pp x cp
])
def test_context_parallel_matches_one_process(dist, tiny_dataset, world, preset, layout):
    path = str(tiny_dataset.path)
    torch.set_num_threads(1)
    ref = cp_record(path, preset, Layout(), 4, {})
    results = dist(world).run(cp_record, path, preset, layout, 4, {})
    check(ref, results)
    assert all(r["cp_bytes"] > 0 for r in results)  # ring attention traffic was counted


def test_context_parallel_composes_with_tp_pp_and_experts(dist, tiny_dataset):
    """cp2 x tp2 (sequence parallel), cp2 x pp2, and a MoE with capacity at cp2 x ep2: the capacity counts
    whole sequences, so the same tokens are dropped as in one process."""
    path = str(tiny_dataset.path)
    torch.set_num_threads(1)
    ref = cp_record(path, "llama-tiny", Layout(micro_batches=2), 3, {})
    for layout in (Layout(cp=2, tp=2, sequence_parallel=True, micro_batches=2),
                   Layout(cp=2, pp=2, micro_batches=2)):
        check(ref, dist(4).run(cp_record, path, "llama-tiny", layout, 3, {}), rel=1e-5)
    over = {"moe_dropless": False, "moe_capacity_factor": 1.0}
    ref = cp_record(path, "gpt-moe-tiny", Layout(), 3, over)
    results = dist(4).run(cp_record, path, "gpt-moe-tiny", Layout(cp=2, ep=2), 3, over)
    check(ref, results)
    assert results[0]["moe"]["moe_dropped"] == ref["moe"]["moe_dropped"] > 0
    assert results[0]["moe"]["moe_expert_tokens"] == ref["moe"]["moe_expert_tokens"]
    assert results[0]["moe"]["moe_aux_loss"] == pytest.approx(ref["moe"]["moe_aux_loss"], rel=1e-5)


@pytest.mark.parametrize("layout, model, seq_len, message", [
    (Layout(cp=2), PRESETS["gpt-tiny"], 30, "seq_len (30) must be divisible by 4 (2*cp for the load-balanced"),
    (Layout(cp=2), PRESETS["bert-tiny"], 31, "seq_len (31) must be divisible by 2 (cp)"),
    (Layout(cp=2, tp=4, sequence_parallel=True), PRESETS["gpt-tiny"], 36,
     "seq_len (36) must be divisible by cp*tp (8)"),
    (Layout(cp=2), PRESETS["gpt-tiny"].replace(dropout=0.1), 32, "cp (2) needs model.dropout 0"),
])
def test_context_parallel_bad_input(layout, model, seq_len, message):
    with pytest.raises(LayoutError) as e:
        validate(layout, model, layout.world_size, seq_len=seq_len)
    assert message in str(e.value)
