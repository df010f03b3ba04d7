"""ZeRO stages 1-3 and the parameter server against single-process math, bytes and memory formulas."""

import pytest
import torch
import torch.distributed as dist

from meshlm.layout import Layout
from meshlm.parallel.zero import zero_state_bytes

from test_distributed import make_trainer


def full_grads(trainer) -> dict[str, torch.Tensor]:
    """Whole gradients by name, whatever the sync: gathered from the shards for ZeRO and the PS."""
    sync = trainer.sync
    if hasattr(sync, "groups"):  # ZeRO: all-gather each group's shard gradient
        fulls = sync.full_tensors([g for g, _ in sync.grads()])
        return {trainer.names[id(p)]: v.clone() for g, f in zip(sync.groups, fulls)
                for p, v in zip(g.params, sync.split(g, f))}
    if hasattr(sync, "servers"):  # parameter server: assemble from the servers' shards
        out = {}
        for k, f in enumerate(sync.flats):
            full = sync._assemble(f, k, lambda k: sync.shards[k].grad)
            offset = 0
            for p in f.params:
                out[trainer.names[id(p)]] = full[offset:offset + p.numel()].view(p.shape).clone()
                offset += p.numel()
        return out
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def sharded_record(path: str, preset: str, layout: Layout, steps: int, grad_sync: str = "allreduce",
                   ps_ranks: str = "0"):
    trainer = make_trainer(path, preset, layout, steps=steps, grad_sync=grad_sync, ps_ranks=ps_ranks)
    trainer.meter.reset()
    loss0 = trainer.compute_gradients(0).item()
    grads = full_grads(trainer)
    comm_step0 = trainer.meter.summary()
    state = trainer.sync.state_bytes(trainer.optimizer) if hasattr(trainer.sync, "state_bytes") else None
    for p in trainer.model.parameters():
        p.grad = None
    if trainer.optimizer is not None:
        trainer.optimizer.zero_grad(set_to_none=True)
    for s in getattr(trainer.sync, "groups", []):
        s.shard.grad = None
    for s in getattr(trainer.sync, "shards", []):
        s.grad = None
    losses = [trainer.step().loss for _ in range(steps)]
    params, _, _ = trainer.full_state()
    psi_padded = sum(g.padded for g in getattr(trainer.sync, "groups", []))
    state_after = trainer.sync.state_bytes(trainer.optimizer) if hasattr(trainer.sync, "state_bytes") else None
    return {"loss0": loss0, "grads": grads, "losses": losses, "params": params, "comm": comm_step0,
            "state": state, "state_after": state_after, "psi_padded": psi_padded}


def single_reference(path: str, preset: str, steps: int):
    torch.set_num_threads(1)
    return sharded_record(path, preset, Layout(), steps)


CASES = [  # (world, zero, grad_sync, preset, micro-batches)
    (2, 1, "allreduce", "gpt-tiny", 2), (2, 2, "allreduce", "llama-tiny", 2), (2, 3, "allreduce", "gpt-tiny", 2),
    (4, 3, "allreduce", "bert-tiny", 1), (4, 1, "allreduce", "llama-tiny", 1), (4, 2, "allreduce", "gpt-tiny", 1),
    (2, 0, "ps", "gpt-tiny", 2), (4, 0, "ps", "llama-tiny", 1),
]


@pytest.mark.parametrize("world, zero, grad_sync, preset, micro", CASES)
def test_sharded_matches_single_process(dist, tiny_dataset, world, zero, grad_sync, preset, micro):
    """Step-0 gradients, the 20-step loss curve and the final parameters equal one process's."""
    path = str(tiny_dataset.path)
    steps = 20
    ref = single_reference(path, preset, steps)
    ps_ranks = "0" if world == 2 else "1,3"  # one server; two servers holding half each
    layout = Layout(dp=world, zero=zero, micro_batches=micro)
    results = dist(world).run(sharded_record, path, preset, layout, steps, grad_sync, ps_ranks)
    for r in results:
        assert r["loss0"] == pytest.approx(ref["loss0"], rel=1e-6)
        for n, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-7, msg=f"grad of {n}")
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        for n, p in ref["params"].items():
            torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=1e-5, msg=f"param {n}")


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_bytes_and_memory_formulas(dist, tiny_dataset, zero):
    world = 2
    r = dist(world).run(sharded_record, str(tiny_dataset.path), "gpt-tiny", Layout(dp=world, zero=zero), 1)[0]
    psi_bytes = 4 * r["psi_padded"]
    comm = r["comm"]
    # communication of one step (before the optimizer step): gradients only
    assert comm["reduce_scatter/dp"]["bytes"] == psi_bytes  # every stage: gradients reduce-scattered
    assert "all_reduce/dp" not in comm
    if zero == 3:  # forward all-gather Psi + backward all-gather Psi (+ reduce-scatter Psi): 3 Psi
        assert comm["all_gather/dp"]["bytes"] == 2 * psi_bytes
    # memory held per rank: measured tensors against the ZeRO formula (within the padding)
    expect = zero_state_bytes(r["psi_padded"], world, zero)
    measured = r["state_after"]
    assert measured["optim"] == pytest.approx(expect["optim"], rel=0.01)
    assert measured["params"] == pytest.approx(expect["params"], rel=0.01)
    assert r["state"]["grads"] == pytest.approx(expect["grads"], rel=0.01)  # while gradients exist


def ps_comm(path: str, world_ps: str):
    trainer = make_trainer(path, "gpt-tiny", Layout(dp=dist.get_world_size()), grad_sync="ps", ps_ranks=world_ps)
    trainer.step()
    psi = sum(f.full.numel() for f in trainer.sync.flats)
    return trainer.meter.summary(), psi


def test_parameter_server_traffic(dist, tiny_dataset):
    """One server at world 4: each worker pushes Psi, the server sends (N-1) Psi back."""
    results = dist(4).run(ps_comm, str(tiny_dataset.path), "0")
    psi = results[0][1]
    server = results[0][0]
    assert server["ps_pull/dp"]["bytes"] == 3 * 4 * psi
    assert "ps_push/dp" not in server  # it keeps its own gradient
    for summary, _ in results[1:]:
        assert summary["ps_push/dp"]["bytes"] == 4 * psi
        assert "ps_pull/dp" not in summary


def zero_save(path: str, out: str):
    trainer = make_trainer(path, "gpt-tiny", Layout(dp=dist.get_world_size(), zero=3), steps=4)
    losses = [trainer.step().loss for _ in range(2)]
    trainer.save(__import__("pathlib").Path(out))
    return losses


def test_zero3_checkpoint_resumes_on_one_process(dist, tiny_dataset, tmp_path):
    """A checkpoint written by ZeRO-3 at dp=2 holds whole tensors: one process resumes it exactly."""
    from meshlm.layout import Layout as L
    path = str(tiny_dataset.path)
    straight = make_trainer(path, "gpt-tiny", L(), steps=4)
    ref = [straight.step().loss for _ in range(4)]
    first = dist(2).run(zero_save, path, str(tmp_path))[0]
    resumed = make_trainer(path, "gpt-tiny", L(), steps=4)
    assert resumed.resume(tmp_path) == 2
    rest = [resumed.step().loss for _ in range(2)]
    assert first + rest == pytest.approx(ref, rel=1e-5)


# --- ZeRO under pipeline and expert parallelism ---------------------------------------------------


def whole_grads(trainer) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient by name: gathered from the ZeRO shards, the tp / ep slices and
    the pipeline stages (collective)."""
    sync = trainer.sync
    named = {}
    if hasattr(sync, "grads_except"):  # a ZeroEngine, or a ZeroSet of them
        for e in getattr(sync, "engines", [sync]):
            fulls = e.full_tensors([g for g, _ in e.grads()])
            for g, f in zip(e.groups, fulls):
                named.update({trainer.names[id(p)]: v for p, v in zip(g.params, e.split(g, f))})
    else:
        named = {n: p.grad for n, p in trainer.model.named_parameters()}
    grads = {n: trainer._tp_gather(n, t).clone() for n, t in sorted(named.items())}
    if trainer.pipeline is not None:
        parts = [None] * trainer.mesh.size("pp")
        dist.all_gather_object(parts, grads, group=trainer.mesh.group("pp"))
        grads = {n: t for part in parts for n, t in part.items()}  # a tied embedding: the same sum twice
    return grads


def composed_record(path: str, preset: str, layout: Layout, steps: int, model: dict):
    """Whole gradients of step 0, then a loss curve (with the clipping norms) and the final parameters."""
    from test_expert import make_trainer_with
    torch.set_num_threads(1)
    trainer = make_trainer_with(path, preset, layout, steps, model)
    loss0 = trainer.compute_gradients(0).item()
    grads = whole_grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    for p in trainer.model.parameters():
        p.grad = None
    results = [trainer.step() for _ in range(steps)]
    params, _, _ = trainer.full_state()
    held = expect = None
    if layout.zero:  # what a rank holds between steps: the formula, engine by engine (each over its group)
        held = trainer.sync.state_bytes(trainer.optimizer)
        engines = getattr(trainer.sync, "engines", [trainer.sync])
        expect = [zero_state_bytes(sum(g.padded for g in e.groups), e.world, e.stage) for e in engines]
        expect = {k: sum(x[k] for x in expect) for k in ("params", "optim")}
    return {"loss0": loss0, "grads": grads, "losses": [r.loss for r in results],
            "norms": [r.grad_norm for r in results], "params": params, "held": held, "expect": expect}


def check_composed(ref, results):
    for r in results:
        assert r["loss0"] == pytest.approx(ref["loss0"], rel=1e-6)
        assert r["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-7, msg=f"grad of {n}")
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5)  # every element counted once
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["params"].keys() == ref["params"].keys()
        for n, p in ref["params"].items():
            torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=5e-5, msg=f"param {n}")
        # sharded optimizer states (and parameters under stage 3: freed once the step is over)
        assert r["held"]["optim"] == r["expect"]["optim"] and r["held"]["params"] == r["expect"]["params"]


COMPOSED = [  # (preset, layout, model overrides): world 4
    ("gpt-tiny", Layout(pp=2, dp=2, zero=1, micro_batches=2), {}),  # tied embedding on both stages
    ("gpt-tiny", Layout(pp=2, dp=2, zero=2, micro_batches=2), {}),
    ("gpt-tiny", Layout(pp=2, dp=2, zero=3, micro_batches=2), {}),
    ("gpt-tiny", Layout(pp=2, dp=2, zero=3, micro_batches=2, schedule="interleaved", vpp=2), {"n_layers": 4}),
    ("llama-tiny", Layout(pp=2, dp=2, zero=3, micro_batches=2, schedule="zb"), {}),
    ("llama-moe-tiny", Layout(dp=2, ep=2, zero=1), {"moe_dropless": True}),
    ("llama-moe-tiny", Layout(dp=2, ep=2, zero=3, micro_batches=2), {"moe_dropless": True}),
    # experts on one rank each (expert group of one: not sharded), dense parameters over ep; tied embedding
    ("gpt-moe-tiny", Layout(pp=2, ep=2, zero=2, micro_batches=2), {"moe_capacity_factor": 1.25}),
]


@pytest.mark.parametrize("preset, layout, model", COMPOSED, ids=[f"{c[0]}-{c[1].describe()}" for c in COMPOSED])
def test_zero_composes_with_pipeline_and_experts(dist, tiny_dataset, preset, layout, model):
    """ZeRO 1-3 under pp x dp (1f1b, interleaved, zb) and ep x dp: step-0 gradients (gathered whole), the
    clipping norms, a 4-step loss curve and the final parameters equal one process's."""
    path, steps = str(tiny_dataset.path), 4
    ref = composed_record(path, preset, Layout(micro_batches=layout.micro_batches), steps, model)
    check_composed(ref, dist(4).run(composed_record, path, preset, layout, steps, model))


def zero_pp_save_resume(path: str, out: str):
    from test_expert import make_trainer_with
    torch.set_num_threads(1)
    layout = Layout(pp=2, dp=2, zero=2, micro_batches=2)
    first = make_trainer_with(path, "gpt-tiny", layout, 4, {})
    losses = [first.step().loss for _ in range(2)]
    first.save(__import__("pathlib").Path(out))
    resumed = make_trainer_with(path, "gpt-tiny", layout, 4, {})
    assert resumed.resume(__import__("pathlib").Path(out)) == 2
    losses += [resumed.step().loss for _ in range(2)]
    params, _, _ = resumed.full_state()
    return losses, params


def test_zero2_under_pipeline_saves_and_resumes(dist, tiny_dataset, tmp_path):
    """ZeRO-2 at pp2 x dp2: 2 steps, a checkpoint of whole tensors, a fresh trainer resumes it and 2 more
    steps follow the uninterrupted single-process run."""
    from test_expert import make_trainer_with
    path = str(tiny_dataset.path)
    straight = make_trainer_with(path, "gpt-tiny", Layout(micro_batches=2), 4, {})
    ref = [straight.step().loss for _ in range(4)]
    ref_params, _, _ = straight.full_state()
    for losses, params in dist(4).run(zero_pp_save_resume, path, str(tmp_path)):
        assert losses == pytest.approx(ref, rel=1e-5)
        for n, p in ref_params.items():
            torch.testing.assert_close(params[n], p, rtol=1e-4, atol=5e-5, msg=f"param {n}")
