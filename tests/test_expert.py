"""Mixture-of-experts blocks and expert parallelism, checked against single-process math."""

import pytest
import torch
import torch.nn.functional as F

from meshlm.config import PRESETS, ConfigError, check_model, flops_per_token, param_count
from meshlm.layout import Layout
from meshlm.model import build_model
from meshlm.parallel.expert import all_to_all_bytes, aux_losses, collect_stats, moe_layers, route


def moe_cfg(preset="gpt-moe-tiny", **kw):
    return PRESETS[preset].replace(vocab_size=512, **kw)


# --- routing, pure ----------------------------------------------------------------------------------


def test_capacity_drops_later_tokens_and_second_choices_first():
    # one sequence of 4 tokens, 2 experts; every token prefers expert 0
    logits = torch.tensor([[[2.0, 0.0], [3.0, 1.0], [1.0, 0.0], [4.0, 0.0]]])
    experts, gates, keep = route(logits, k=1, capacity=2)  # capacity: ceil(1.0 * 4 * 1 / 2) = 2
    assert experts.flatten().tolist() == [0, 0, 0, 0]
    assert keep.flatten().tolist() == [True, True, False, False]  # sequence order within a choice
    torch.testing.assert_close(gates.flatten(), logits.softmax(-1)[0, :, 0])  # top-1: the raw probability
    # top-2 with capacity 3 for expert 0 and 1: the four first choices (all expert 0) come first, so the
    # fourth token's first choice is dropped while the first three tokens' second choices are kept
    experts, gates, keep = route(logits, k=2, capacity=3)
    assert keep[0, :, 0].tolist() == [True, True, True, False]
    assert keep[0, :, 1].tolist() == [True, True, True, False]
    torch.testing.assert_close(gates.sum(-1), torch.ones(1, 4))  # top-k gates renormalised
    _, _, keep = route(logits, k=2, capacity=None)
    assert keep.all()


def test_load_balancing_loss_is_1_when_balanced_and_E_when_collapsed():
    E, T = 4, 8
    balanced = torch.full((1, T, E), -20.0)
    balanced[0, torch.arange(T), torch.arange(T) % E] = 20.0  # each expert takes 2 tokens, prob ~1
    experts, _, _ = route(balanced, k=1, capacity=None)
    balance, z = aux_losses(balanced, experts)
    assert balance.item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.full((1, T, E), -20.0)
    collapsed[..., 0] = 20.0
    experts, _, _ = route(collapsed, k=1, capacity=None)
    balance, z = aux_losses(collapsed, experts)
    assert balance.item() == pytest.approx(E, rel=1e-6)
    assert z.item() == pytest.approx(20.0 ** 2, rel=1e-6)  # logsumexp ~ the max logit


def test_published_mixtral_counts():
    c = param_count(PRESETS["mixtral-8x7b"])
    assert c["total"] / 1e9 == pytest.approx(46.7, abs=0.05)  # Mixtral of Experts (Jiang et al. 2024)
    assert c["active"] / 1e9 == pytest.approx(12.9, abs=0.05)
    dense = PRESETS["mixtral-8x7b"].replace(n_experts=0)
    # a token pays for k=2 experts: more than the dense model's FLOPs, far less than 8 experts'
    assert flops_per_token(dense, seq_len=1) < flops_per_token(PRESETS["mixtral-8x7b"], seq_len=1)


@pytest.mark.parametrize("preset", ["gpt-moe-tiny", "llama-moe-tiny"])
def test_built_parameters_match_the_count(preset):
    for extra in ({}, {"moe_every": 2, "moe_shared_experts": 1}):
        cfg = moe_cfg(preset, **extra)
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == param_count(cfg)["total"]
        assert len(moe_layers(model)) == (2 if not extra else 1)


@pytest.mark.parametrize("change, message", [
    ({"experts_per_token": 5}, "model.experts_per_token (5) must be in [1, n_experts (4)]"),
    ({"moe_capacity_factor": 0.0}, "model.moe_capacity_factor (0.0) must be > 0"),
    ({"moe_capacity_factor": -1.0}, "model.moe_capacity_factor (-1.0) must be > 0"),
    ({"moe_every": 0}, "model.moe_every (0) must be >= 1"),
])
def test_bad_moe_config(change, message):
    with pytest.raises(ConfigError) as e:
        check_model(moe_cfg(**change))
    assert message in str(e.value)


# --- one process: the sorted dispatch equals a token-by-token reference ------------------------------


def reference_moe(moe, x):
    """sum_j g_j * Expert_{e_j}(x) token by token, dropped slots skipped (no sorting, no index_add)."""
    B, T, C = x.shape
    logits = F.linear(x.float(), moe.router.float())
    experts, gates, keep = route(logits, k=moe.k, capacity=moe.capacity(T))
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for j in range(moe.k):
                if not keep[b, t, j]:
                    continue
                e = experts[b, t, j]
                h = F.linear(x[b, t], moe.w1[e], moe.b1[e] if moe.b1 is not None else None)
                if moe.activation == "swiglu":
                    h = F.silu(F.linear(x[b, t], moe.w3[e])) * h
                else:
                    h = F.gelu(h, approximate="tanh")
                y = F.linear(h, moe.w2[e], moe.b2[e] if moe.b2 is not None else None)
                out[b, t] = out[b, t] + gates[b, t, j] * y
    balance, z = aux_losses(logits, experts)
    return out, (moe.aux_weight * balance + moe.z_weight * z) / B


@pytest.mark.parametrize("preset", ["gpt-moe-tiny", "llama-moe-tiny"])
@pytest.mark.parametrize("dropless", [True, False])
def test_moe_block_equals_token_by_token_reference(preset, dropless):
    cfg = moe_cfg(preset, moe_dropless=dropless, moe_capacity_factor=1.0)
    model = build_model(cfg, seed=0)
    moe = moe_layers(model)[0]
    torch.manual_seed(0)
    x = torch.randn(2, 16, cfg.d_model)
    upstream = torch.randn(2, 16, cfg.d_model)
    x1 = x.clone().requires_grad_(True)
    (moe(x1) * upstream).sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters()}
    dropped = collect_stats(model)["dropped"].item()
    assert (dropped > 0) == (not dropless)  # the capacity test really drops tokens
    moe.zero_grad()
    x2 = x.clone().requires_grad_(True)
    out, aux = reference_moe(moe, x2)
    ((out * upstream).sum() + aux).backward()  # the block attaches the aux losses to its output
    torch.testing.assert_close(moe(x.clone()), out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


# --- expert parallelism against one process -----------------------------------------------------------


def moe_record(data_path, preset, layout, steps, model_overrides):
    """Logits and gradients of step 0 (after the gradient reduction), then a loss curve."""
    trainer = make_trainer_with(data_path, preset, layout, steps, model_overrides)
    logits = None
    if trainer.pipeline is None:
        x, _, _ = trainer.batch(trainer.dataset.train, 0, seed=trainer.cfg.train.seed)
        with torch.no_grad():
            logits = trainer.model.full_logits(trainer.model(x))
    collect_stats(trainer.model)
    trainer.meter.reset()
    loss0 = trainer.compute_gradients(0).item()
    stats = collect_stats(trainer.model)
    a2a = {k: s.bytes for k, s in trainer.meter.stats.items() if k[1] == "ep"}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    shards = {n: p.meshlm_shard for n, p in trainer.model.named_parameters() if p.meshlm_shard is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    losses, metrics = [], []
    for _ in range(steps):
        losses.append(trainer.step().loss)
        metrics.append(trainer.moe_metrics)
    params, _, _ = trainer.full_state()  # whole tensors, experts gathered over ep (what a checkpoint holds)
    return {"coords": trainer.mesh.coords, "data_rank": trainer.mesh.data_rank, "logits": logits, "params": params,
            "loss0": loss0, "grads": grads, "shards": shards, "losses": losses, "stats": stats, "a2a": a2a,
            "metrics": metrics}


def make_trainer_with(data_path, preset, layout, steps, model_overrides):
    import dataclasses

    from meshlm.data import TokenDataset
    from meshlm.mesh import Mesh
    from meshlm.settings import build_config
    from meshlm.train.trainer import Trainer, resolve_vocab

    overrides = {"model.preset": preset, "data.path": data_path, "train.batch_size": 8, "train.seq_len": 32,
                 "train.warmup_steps": 2, "train.steps": steps, "train.lr": 3e-3}
    overrides.update({f"model.{k}": v for k, v in model_overrides.items()})
    overrides.update({f"layout.{f.name}": getattr(layout, f.name) for f in dataclasses.fields(layout)})
    dataset = TokenDataset.open(data_path)
    cfg = resolve_vocab(build_config(overrides=overrides), dataset)
    return Trainer(cfg, mesh=Mesh.build(layout), device=torch.device("cpu"), dataset=dataset)


def check_against_single(ref, results):
    rows = ref["logits"].shape[0] // len({r["data_rank"] for r in results})
    for r in results:
        d = r["data_rank"]
        if r["logits"] is not None:
            torch.testing.assert_close(r["logits"], ref["logits"][d * rows:(d + 1) * rows], rtol=1e-5, atol=1e-5)
        assert r["loss0"] == pytest.approx(ref["loss0"], rel=1e-6)
        assert r["grads"], "no gradients"
        for n, mine in r["grads"].items():
            g = ref["grads"][n]
            s = r["shards"].get(n)
            if s is not None:  # a tensor-parallel slice or this rank's experts: the slice of the whole
                g = g.chunk(s.parts, dim=s.dim)[s.index]
            torch.testing.assert_close(mine, g, rtol=1e-4, atol=1e-7, msg=f"grad of {n}")
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["params"].keys() == ref["params"].keys()
        for n, p in ref["params"].items():
            torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=5e-5, msg=f"param {n}")


@pytest.mark.parametrize("world, preset, dropless", [(2, "gpt-moe-tiny", True), (2, "llama-moe-tiny", False),
                                                     (4, "llama-moe-tiny", True), (4, "gpt-moe-tiny", False)])
def test_expert_parallel_matches_one_process(dist, tiny_dataset, world, preset, dropless):
    """ep = world: logits, every gradient (dense reduced, experts sharded) and 3 steps equal one process
    holding all experts, dropless and with a capacity (then the same tokens are dropped)."""
    path = str(tiny_dataset.path)
    torch.set_num_threads(1)
    over = {"moe_dropless": dropless, "moe_capacity_factor": 1.0}
    ref = moe_record(path, preset, Layout(), 3, over)
    results = dist(world).run(moe_record, path, preset, Layout(ep=world), 3, over)
    check_against_single(ref, results)
    dropped = sum(r["stats"]["dropped"].item() for r in results)
    assert dropped == ref["stats"]["dropped"].item()  # the same tokens are dropped, however they are split
    assert (dropped > 0) == (not dropless)
    torch.testing.assert_close(sum(r["stats"]["routed"] for r in results), ref["stats"]["routed"])
    # all-to-all bytes equal those the routing implies: each rank sends its kept slots (S) out and gets
    # back what it received (R) for its experts, in forward and again in backward
    C, E = PRESETS[preset].d_model, PRESETS[preset].n_experts
    kept = torch.stack([r["stats"]["kept"] for r in results])  # (rank, expert) rows processed
    n_moe = len(moe_layers(build_model(moe_cfg(preset))))
    for r in results:
        S = int(kept[r["coords"]["ep"]].sum())
        mine = slice(r["coords"]["ep"] * E // world, (r["coords"]["ep"] + 1) * E // world)
        R = int(kept[:, mine].sum())
        assert r["a2a"][("all_to_all", "ep")] == all_to_all_bytes(S, R, C)
        assert r["a2a"][("all_to_all_counts", "ep")] == n_moe * E * 8  # one exchange of counts per block
    m = results[0]["metrics"][-1]
    assert m["moe_all_to_all_bytes"] > 0 and len(m["moe_expert_tokens"]) == E and m["moe_imbalance"] >= 1.0
    assert ref["metrics"][-1]["moe_expert_tokens"] == m["moe_expert_tokens"]


def test_expert_and_data_parallel_loss_curve_20_steps(dist, tiny_dataset):
    """dp2 x ep2 and ep2 alone: 20 steps equal the single-process curve."""
    path = str(tiny_dataset.path)
    torch.set_num_threads(1)
    over = {"moe_dropless": True}
    ref = moe_record(path, "llama-moe-tiny", Layout(), 20, over)
    results = dist(4).run(moe_record, path, "llama-moe-tiny", Layout(dp=2, ep=2), 20, over)
    check_against_single(ref, results)
    results = dist(2).run(moe_record, path, "llama-moe-tiny", Layout(ep=2), 20, over)
    check_against_single(ref, results)
    assert ref["losses"][-1] < ref["losses"][0] - 0.5  # it learns


def test_expert_parallel_with_tensor_and_pipeline(dist, tiny_dataset):
    """ep2 x tp2 (sequence parallel) and pp2 x ep2, with a shared expert and MoE in every other block:
    gradients and the loss curve equal one process."""
    path = str(tiny_dataset.path)
    torch.set_num_threads(1)
    over = {"moe_dropless": False, "moe_capacity_factor": 1.25, "n_layers": 4, "moe_every": 2,
            "moe_shared_experts": 1}
    ref = moe_record(path, "gpt-moe-tiny", Layout(), 3, over)
    for layout in (Layout(ep=2, tp=2, sequence_parallel=True), Layout(pp=2, ep=2, micro_batches=2)):
        results = dist(4).run(moe_record, path, "gpt-moe-tiny", layout, 3, over)
        check_against_single(ref, results)
