"""Mesh groups and data parallelism on gloo processes, checked against single-process math."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from meshlm.layout import Layout
from meshlm.mesh import Mesh
from meshlm.settings import build_config


# --- functions run on every rank (module level, so the workers can import them) ------------------


def mesh_facts(layout: Layout):
    mesh = Mesh.build(layout)
    out = {"rank": mesh.rank, "coords": mesh.coords, "data_rank": mesh.data_rank}
    for axes in ("dp", "tp", "pp", ("dp", "ep", "cp")):
        t = torch.tensor([float(mesh.rank)])
        group = mesh.group(axes)
        if group is not None:
            dist.all_reduce(t, group=group)
        out[axes if isinstance(axes, str) else "dense"] = t.item()
    return out


def make_trainer(data_path: str, preset: str, layout: Layout, **train):
    from meshlm.data import TokenDataset
    from meshlm.train.trainer import Trainer, resolve_vocab

    overrides = {"model.preset": preset, "data.path": data_path, "train.batch_size": 8, "train.seq_len": 32,
                 "train.warmup_steps": 2, "train.steps": 4, "train.lr": 3e-3}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    overrides.update({f"layout.{f.name}": getattr(layout, f.name) for f in dataclasses.fields(layout)})
    cfg = build_config(overrides=overrides)
    dataset = TokenDataset.open(data_path)
    cfg = resolve_vocab(cfg, dataset)
    return Trainer(cfg, mesh=Mesh.build(layout), device=torch.device("cpu"), dataset=dataset)


def train_record(data_path: str, preset: str, layout: Layout, steps: int = 4):
    """Gradients of step 0, then the losses of `steps` optimizer steps and the final parameters."""
    trainer = make_trainer(data_path, preset, layout, steps=steps)
    loss0 = trainer.compute_gradients(0).item()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    losses = [trainer.step().loss for _ in range(steps)]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {"loss0": loss0, "grads": grads, "losses": losses, "params": params,
            "bytes": trainer.meter.total_bytes()}


# --- tests ----------------------------------------------------------------------------------------


def test_mesh_groups_world4(dist):
    results = dist(4).run(mesh_facts, Layout(dp=2, tp=2))
    for r in results:
        rank = r["rank"]
        assert r["coords"]["dp"] == rank // 2 and r["coords"]["tp"] == rank % 2
        tp_peers = [rank - rank % 2, rank - rank % 2 + 1]
        assert r["tp"] == sum(tp_peers)  # the tp group is exactly the two neighbours
        assert r["dp"] == rank % 2 + (rank % 2 + 2)  # ranks {0,2} or {1,3}
        assert r["dense"] == r["dp"]
        assert r["pp"] == rank  # pp=1: no group, the value is untouched
        assert r["data_rank"] == r["coords"]["dp"]


def test_mesh_groups_world2_pp(dist):
    results = dist(2).run(mesh_facts, Layout(pp=2))
    assert [r["coords"]["pp"] for r in results] == [0, 1]
    assert all(r["pp"] == 1.0 and r["data_rank"] == 0 for r in results)


@pytest.mark.parametrize("preset, world, micro", [("gpt-tiny", 2, 1), ("llama-tiny", 2, 2),
                                                  ("bert-tiny", 2, 1), ("gpt-tiny", 4, 1)])
def test_data_parallel_matches_single_process(dist, tiny_dataset, preset, world, micro):
    """Same seed, same data: dp ranks' gradients, loss curve and parameters equal one process's."""
    path = str(tiny_dataset.path)
    torch.set_num_threads(1)
    ref = train_record(path, preset, Layout(micro_batches=micro))
    results = dist(world).run(train_record, path, preset, Layout(dp=world, micro_batches=micro))
    for r in results:
        assert r["loss0"] == pytest.approx(ref["loss0"], rel=1e-6)
        for n, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-7, msg=f"grad of {n}")
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        for n, p in ref["params"].items():
            torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=1e-5, msg=f"param {n}")
    # every rank holds the same replica
    for r in results[1:]:
        for n, p in results[0]["params"].items():
            assert torch.equal(r["params"][n], p)
    # gradients were all-reduced: payload of one fp32 gradient set per compute_gradients call (5 calls)
    n_params = sum(p.numel() for p in ref["params"].values())
    assert results[0]["bytes"] >= 5 * 4 * n_params
