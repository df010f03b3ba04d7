"""Tensor and sequence parallelism against single-process math: layers, whole models, bytes."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshlm.layout import Layout
from meshlm.mesh import Mesh
from meshlm.model import Linear, init_weights
from meshlm.parallel.tensor import (TP, enter_column_region, padded_vocab, vocab_parallel_embedding,
                                    vocab_parallel_loss_sum, reduce_from_tp)



# --- layers -------------------------------------------------------------------------------------------


def linear_pair(seed: int):
    """Column then row linear (an MLP without activation) at this world's tp, vs the whole layers."""
    tp = TP(dist.group.WORLD)
    torch.manual_seed(seed)
    x = torch.randn(3, 5, 8, requires_grad=True)
    col, row = Linear(8, 12, bias=True, std=0.5, tp=tp, split="column"), Linear(12, 8, bias=True, std=0.5, tp=tp,
                                                                                  split="row")
    ref_col, ref_row = Linear(8, 12, bias=True, std=0.5), Linear(12, 8, bias=True, std=0.5)
    for m, name in ((col, "c"), (row, "r"), (ref_col, "c"), (ref_row, "r")):
        init_weights(m, seed)
        with torch.no_grad():
            if m.bias is not None:  # non-zero biases, the same "full" values everywhere
                full = torch.arange(m.bias.meshlm_full_shape[0], dtype=torch.float32) / 10
                s = m.bias.meshlm_shard
                m.bias.copy_(full.chunk(s.parts)[s.index] if s else full)
    hidden = col(enter_column_region(x, tp))
    y = row(hidden)
    y.pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    ref_hidden = ref_col(xr)
    ref_row(ref_hidden).pow(2).sum().backward()
    n = tp.size
    return {
        "hidden": (hidden.detach(), ref_hidden.detach().chunk(n, -1)[tp.rank]),  # column: no reduction
        "y": (y.detach(), ref_row(ref_hidden).detach()),
        "x_grad": (x.grad, xr.grad),
        "col_w_grad": (col.weight.grad, ref_col.weight.grad.chunk(n, 0)[tp.rank]),
        "col_b_grad": (col.bias.grad, ref_col.bias.grad.chunk(n, 0)[tp.rank]),
        "row_w_grad": (row.weight.grad, ref_row.weight.grad.chunk(n, 1)[tp.rank]),
        "row_b_grad": (row.bias.grad, ref_row.bias.grad),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_column_row_linear_parity(dist, world):
    for r in dist(world).run(linear_pair, 3):
        # nothing is reduced for the column output, but BLAS blocks a narrower matrix differently
        torch.testing.assert_close(*r["hidden"], rtol=1e-5, atol=1e-6)
        for key in ("y", "x_grad", "col_w_grad", "col_b_grad", "row_w_grad", "row_b_grad"):
            torch.testing.assert_close(*r[key], rtol=1e-5, atol=1e-5, msg=key)


def vocab_layers(vocab: int):
    """Vocabulary-parallel embedding and cross-entropy (vocab not divisible by tp) vs the whole."""
    tp = TP(dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    full_w = torch.randn(vocab, 6, generator=g)
    vp = padded_vocab(vocab, tp.size)
    padded = torch.cat([full_w, torch.zeros(vp - vocab, 6)])
    w = padded.chunk(tp.size)[tp.rank].clone().requires_grad_(True)
    tokens = torch.randint(0, vocab, (2, 7), generator=g)
    emb = reduce_from_tp(vocab_parallel_embedding(tokens, w, tp), tp)
    ref_emb = F.embedding(tokens, full_w)
    logits_full = torch.randn(2, 7, vocab, generator=g)
    targets = torch.randint(0, vocab, (2, 7), generator=g)
    targets[0, 0] = -100
    padded_logits = torch.cat([logits_full, torch.full((2, 7, vp - vocab), 5.0)], dim=-1)  # padding must not count
    local = padded_logits.chunk(tp.size, -1)[tp.rank].clone().requires_grad_(True)
    loss, n = vocab_parallel_loss_sum(local, targets, tp, vocab_size=vocab)
    loss.backward()
    ref_logits = logits_full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    ref_grad = torch.cat([ref_logits.grad, torch.zeros(2, 7, vp - vocab)], -1).chunk(tp.size, -1)[tp.rank]
    return {"emb": (emb.detach(), ref_emb), "loss": (loss.detach(), ref.detach()), "n": int(n),
            "grad": (local.grad, ref_grad)}


@pytest.mark.parametrize("world, vocab", [(2, 11), (4, 50), (4, 52)])
def test_vocab_parallel_embedding_and_cross_entropy(dist, world, vocab):
    for r in dist(world).run(vocab_layers, vocab):
        torch.testing.assert_close(*r["emb"], rtol=0, atol=0)  # exactly one rank contributes each row
        torch.testing.assert_close(*r["loss"], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(*r["grad"], rtol=1e-5, atol=1e-6)
        assert r["n"] == 13


# --- whole models --------------------------------------------------------------------------------------


def _record(trainer, steps):
    trainer.meter.reset()
    loss0 = trainer.compute_gradients(0).item()
    comm = trainer.meter.summary()  # before the gathers below, which the test adds
    grads = {n: trainer._tp_gather(n, p.grad) for n, p in trainer.model.named_parameters()
             if p.grad is not None}  # (ZeRO keeps gradients in its shards)
    trainer.optimizer.zero_grad(set_to_none=True)
    for p in trainer.model.parameters():
        p.grad = None
    losses = [trainer.step().loss for _ in range(steps)]
    params, _, _ = trainer.full_state()
    return {"loss0": loss0, "grads": grads, "losses": losses, "params": params, "comm": comm}


CASES = [("gpt-tiny", 2, False), ("gpt-tiny", 4, True), ("llama-tiny", 2, True), ("llama-tiny", 4, False),
         ("bert-tiny", 2, False), ("bert-tiny", 4, True), ("gpt-tiny", 2, True), ("llama-tiny", 4, True)]


def model_record(path: str, preset: str, layout: Layout, steps: int):
    import dataclasses
    from meshlm.data import TokenDataset
    from meshlm.settings import build_config
    from meshlm.train.trainer import Trainer
    overrides = {"model.preset": preset, "data.path": path, "train.batch_size": 8, "train.seq_len": 32,
                 "train.warmup_steps": 2, "train.steps": steps, "train.lr": 3e-3, "model.vocab_size": 514}
    overrides.update({f"layout.{f.name}": getattr(layout, f.name) for f in dataclasses.fields(layout)})
    cfg = build_config(overrides=overrides)
    trainer = Trainer(cfg, mesh=Mesh.build(layout), device=torch.device("cpu"), dataset=TokenDataset.open(path))
    return _record(trainer, steps)


@pytest.mark.parametrize("preset, world, sp", CASES)
def test_tensor_parallel_model_matches_single_process(dist, tiny_dataset, preset, world, sp):
    """Step-0 gradients (gathered), the 20-step loss curve and final parameters equal one process's."""
    torch.set_num_threads(1)
    path, steps = str(tiny_dataset.path), 20
    ref = model_record(path, preset, Layout(), steps)
    results = dist(world).run(model_record, path, preset, Layout(tp=world, sequence_parallel=sp), steps)
    for r in results:
        assert r["loss0"] == pytest.approx(ref["loss0"], rel=1e-6)
        for n, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6, msg=f"grad of {n}")
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        for n, p in ref["params"].items():
            if ref["grads"][n].abs().max() < 1e-7:
                # The key bias: its true gradient is 0 (softmax ignores a shift of every key), so both
                # runs see float noise, which Adam scales up to steps of size lr. Nothing to compare.
                continue
            torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=1e-5, msg=f"param {n}")
    ref_params = ref["params"]
    assert ref_params["tok_emb"].shape[0] == 514  # checkpoints hold the unpadded vocabulary


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_bytes_formula(dist, tiny_dataset, sp):
    """Per layer: two all-reduces of b*s*h forward and two backward; with SP the same volume as
    all-gathers and reduce-scatters. Plus the embedding (forward) and the head (backward), and the
    vocabulary-parallel cross-entropy's 3 floats per token."""
    world = 2
    r = dist(world).run(model_record, str(tiny_dataset.path), "gpt-tiny", Layout(tp=world, sequence_parallel=sp), 1)[0]
    b, s, h, L = 8, 32, 64, 2
    bsh = b * s * h * 4
    comm = r["comm"]
    ce = 3 * b * s * 4
    if not sp:
        assert comm["all_reduce/tp"]["bytes"] == (4 * L + 2) * bsh + ce
    else:
        # each all-reduce of b*s*h becomes one all-gather and one reduce-scatter of it: on a ring that
        # is the same traffic (an all-reduce is a reduce-scatter followed by an all-gather) ...
        assert comm["reduce_scatter/tp"]["bytes"] == (4 * L + 2) * bsh
        # ... plus, in backward, one all-gather per column-parallel region (2 per layer and the head):
        # the gathered input is recomputed rather than stored, which is what saves the memory
        assert comm["all_gather/tp"]["bytes"] == (4 * L + 2) * bsh + (2 * L + 1) * bsh
        # what remains on all-reduce: the cross-entropy and the replicated parameters' partial gradients
        # per layer two norms (weight, bias) and the wo/w2 biases; the final norm; the position table
        partial = (L * (2 * 2 + 2) + 2) * h * 4 + 128 * h * 4
        assert comm["all_reduce/tp"]["bytes"] == ce + partial


@pytest.mark.parametrize("layout", [Layout(dp=2, tp=2, sequence_parallel=True),
                                    Layout(dp=2, tp=2, zero=3, micro_batches=2),
                                    Layout(dp=2, tp=2, zero=1, sequence_parallel=True)])
def test_data_and_tensor_parallel_compose(dist, tiny_dataset, layout):
    """dp x tp (with ZeRO and SP) on 4 ranks follows the single-process loss curve."""
    torch.set_num_threads(1)
    path = str(tiny_dataset.path)
    ref = model_record(path, "llama-tiny", Layout(), 10)
    for r in dist(4).run(model_record, path, "llama-tiny", layout, 10):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        for n, p in ref["params"].items():
            if ref["grads"][n].abs().max() >= 1e-7:
                torch.testing.assert_close(r["params"][n], p, rtol=1e-4, atol=1e-5, msg=f"param {n}")


def block_activation_bytes(sp: bool, s: int, b: int):
    """Bytes one block saves for backward on this rank, measured and by the formula."""
    from meshlm.config import PRESETS
    from meshlm.memory import korthikanti_bytes_per_layer, saved_activation_bytes
    from meshlm.model import Transformer
    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = PRESETS["gpt-tiny"].replace(vocab_size=512, max_seq_len=s, d_model=128, n_heads=4, d_ff=512)
    layout = Layout(tp=world, sequence_parallel=sp)
    model = Transformer(cfg, mesh=Mesh.build(layout) if world > 1 else None)
    init_weights(model, 0)
    block = model.layers["0"]
    x = torch.randn(b, s // world if sp else s, cfg.d_model, requires_grad=True)
    measured = saved_activation_bytes(lambda: block(x), exclude=list(model.parameters()))
    formula = 2 * korthikanti_bytes_per_layer(s=s, b=b, h=cfg.d_model, a=cfg.n_heads, t=world,
                                              sequence_parallel=sp)  # fp32: twice the 16-bit bytes
    return measured, formula


def test_sequence_parallelism_lowers_activation_memory(dist):
    s, b = 64, 4
    single, single_formula = block_activation_bytes(False, s, b)
    tp, tp_formula = dist(2).run(block_activation_bytes, False, s, b)[0]
    sp, sp_formula = dist(2).run(block_activation_bytes, True, s, b)[0]
    print(f"\nactivation bytes per layer and rank (measured / Korthikanti formula, fp32): "
          f"tp1 {single} / {single_formula:.0f} = {single / single_formula:.2f}; "
          f"tp2 {tp} / {tp_formula:.0f} = {tp / tp_formula:.2f}; "
          f"tp2+sp {sp} / {sp_formula:.0f} = {sp / sp_formula:.2f}")
    assert tp < single and sp < tp  # each step lowers it, as the formula says
    assert sp_formula < tp_formula < single_formula
    # what SP removes: the replicated norm/dropout/residual activations, about half of them here
    assert (tp - sp) > 0.3 * (single - tp)
