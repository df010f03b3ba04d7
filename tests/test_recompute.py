"""Activation recomputation: same loss and gradients as storing everything, less memory, as the formula says."""

import copy

import pytest
import torch
import torch.distributed as dist

from meshlm.config import PRESETS
from meshlm.layout import Layout
from meshlm.memory import korthikanti_bytes_per_layer, saved_activation_bytes_by_module
from meshlm.mesh import Mesh
from meshlm.model import Transformer, build_model, init_weights
from meshlm.train.recompute import RECOMPUTE, apply_recompute, recomputing

# gpt with dropout (the RNG must be replayed), llama (rope tables passed into the checkpoint, GQA),
# bert (post-norm, bidirectional)
CONFIGS = {
    "gpt-tiny": PRESETS["gpt-tiny"].replace(vocab_size=512, dropout=0.1),
    "llama-tiny": PRESETS["llama-tiny"].replace(vocab_size=512),
    "bert-tiny": PRESETS["bert-tiny"].replace(vocab_size=512),
}


def run(model, *, s: int = 32, b: int = 4, seed: int = 0):
    """Loss of one forward on fixed tokens (dropout seeded), its backward, and the bytes saved per block."""
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (b, s + 1), generator=torch.Generator().manual_seed(seed))
    out = []
    torch.manual_seed(1234)  # the dropout draws
    blocks = dict(model.layers.items())
    saved = saved_activation_bytes_by_module(
        lambda: out.append(model.loss_sum(model(tokens[:, :-1]), tokens[:, 1:])), blocks,
        exclude=list(model.parameters()))
    loss, count = out[0]
    (loss / count).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, sum(saved[n] for n in blocks) / len(blocks)


# --- API ---------------------------------------------------------------------------------------------


def test_bad_mode_raises():
    model = build_model(CONFIGS["gpt-tiny"])
    with pytest.raises(ValueError, match=r"train.recompute \('attention'\) must be one of: none, selective, full"):
        apply_recompute(model, "attention")
    with pytest.raises(ValueError, match=r"train.recompute \('Full'\) must be one of"):
        korthikanti_bytes_per_layer(s=8, b=1, h=8, a=2, t=1, sequence_parallel=False, recompute="Full")


def test_counts_and_applying_twice():
    cfg = CONFIGS["gpt-tiny"]
    assert apply_recompute(build_model(cfg), "none") == 0
    model = build_model(cfg)
    assert apply_recompute(model, "full") == cfg.n_layers  # one per Block
    assert apply_recompute(model, "full") == 0  # the same mode again: nothing more to wrap
    with pytest.raises(ValueError, match=r"train.recompute \('selective'\): the model already recomputes full"):
        apply_recompute(model, "selective")
    model = build_model(cfg)
    assert apply_recompute(model, "selective") == cfg.n_layers  # one per Attention
    with pytest.raises(ValueError, match="already recomputes selective"):
        apply_recompute(model, "full")
    # twice applied behaves as once: the same gradients as a model wrapped once
    twice = build_model(cfg)
    apply_recompute(twice, "selective")
    apply_recompute(twice, "selective")
    _, g1, _ = run(model)
    _, g2, _ = run(twice)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=0, atol=0)


def test_pipeline_stage_deepcopy_and_no_grad():
    """A stage (no embedding) works, a deep copy recomputes its own blocks, no_grad runs plainly."""
    cfg = CONFIGS["gpt-tiny"].replace(dropout=0.0)
    stage = Transformer(cfg, layers=range(1, 2), pre=False, post=False)
    init_weights(stage, 0)
    ref = copy.deepcopy(stage)
    assert apply_recompute(stage, "full") == 1
    clone = copy.deepcopy(stage)
    assert clone.layers["1"].forward.args[0].__self__ is clone.layers["1"]  # rebound, not the original's
    h = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    for model in (ref, clone):
        model(h).pow(2).sum().backward()
    assert stage.layers["1"].norm1.weight.grad is None  # the original was not run by its copy
    for (n, p), q in zip(ref.named_parameters(), clone.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(clone(h), ref(h), rtol=0, atol=0)


def test_zero_bubble_split_backward():
    """The zero-bubble split (input gradient with the graph kept, then weight gradients) recomputes twice."""
    cfg = CONFIGS["llama-tiny"]
    results = []
    for mode in ("none", "full"):
        stage = Transformer(cfg, layers=range(0, 2), pre=False, post=False)
        init_weights(stage, 0)
        apply_recompute(stage, mode)
        h = torch.randn(2, 16, cfg.d_model, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = stage(h).pow(2).sum()
        (dh,) = torch.autograd.grad(out, h, retain_graph=True)  # B
        out.backward(inputs=list(stage.parameters()))  # W
        results.append((dh, [p.grad for p in stage.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for g, ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)


def test_recomputing_flag():
    """Code inside a recomputed block can tell the replay from the forward (to count statistics once)."""
    model = build_model(CONFIGS["gpt-tiny"])  # dropout after the MLP: the replay runs through it
    apply_recompute(model, "full")
    seen = []
    model.layers["0"].mlp.register_forward_hook(lambda m, args, out: seen.append(recomputing()))
    tokens = torch.randint(0, 512, (2, 9))
    loss, _ = model.loss_sum(model(tokens[:, :-1]), tokens[:, 1:])
    assert seen == [False] and not recomputing()
    loss.backward()
    assert seen == [False, True] and not recomputing()


# --- one process: equal gradients, less memory -------------------------------------------------------


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_recompute_matches_and_saves_memory(preset):
    cfg = CONFIGS[preset]
    s, b = 32, 4
    results = {}
    for mode in RECOMPUTE:
        model = build_model(cfg, seed=0)
        apply_recompute(model, mode)
        results[mode] = run(model, s=s, b=b)
    loss, grads, none_bytes = results["none"]
    for mode in ("selective", "full"):
        other_loss, other_grads, _ = results[mode]
        # bit-exact: the same kernels on the same inputs, the same dropout masks
        assert other_loss.item() == loss.item(), mode
        for n, g in grads.items():
            torch.testing.assert_close(other_grads[n], g, rtol=0, atol=0, msg=f"{mode}: grad of {n}")
    full, selective = results["full"][2], results["selective"][2]
    assert full < selective < none_bytes
    block_input = b * s * cfg.d_model * 4  # fp32 (B, T, C)
    rope_tables = 2 * s * cfg.head_dim * 4 / cfg.n_layers if cfg.position == "rope" else 0  # kept once
    assert full == block_input + rope_tables
    if cfg.dropout > 0:  # math kernel: the a*s*s probabilities, their dropout mask and output are gone
        assert none_bytes - selective >= 3 * b * cfg.n_heads * s * s * 4


def test_formula_rows():
    s, b, h, a, t = 2048, 1, 12288, 96, 8  # GPT-3 175B on 8 tensor-parallel ranks
    kw, sbh = dict(s=s, b=b, h=h, a=a, t=t), s * b * h
    none = korthikanti_bytes_per_layer(**kw, sequence_parallel=True)  # the existing call still works
    assert none == sbh * (34 / t + 5 * a * s / (h * t))
    assert korthikanti_bytes_per_layer(**kw, sequence_parallel=True, recompute="selective") == sbh * 34 / t
    assert korthikanti_bytes_per_layer(**kw, sequence_parallel=False, recompute="selective") == sbh * (10 + 24 / t)
    assert korthikanti_bytes_per_layer(**kw, sequence_parallel=False, recompute="full") == 2 * sbh
    assert korthikanti_bytes_per_layer(**kw, sequence_parallel=True, recompute="full") == 2 * sbh / t
    # section 5: the attention core is ~70% of GPT-3's activations (5as/h = 80 against 34)
    assert 1 - korthikanti_bytes_per_layer(**kw, sequence_parallel=True, recompute="selective") / none == \
        pytest.approx(0.70, abs=0.01)


# --- tensor + sequence parallelism ---------------------------------------------------------------------


def tp_record(s: int, b: int):
    """Per mode at this world's tp with sequence parallelism: loss, local gradients, bytes per block."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = Mesh.build(Layout(tp=world, sequence_parallel=world > 1)) if world > 1 else None
    out = {}
    for mode in RECOMPUTE:
        model = build_model(CONFIGS["gpt-tiny"], mesh=mesh, seed=0)
        apply_recompute(model, mode)
        loss, grads, saved = run(model, s=s, b=b)
        out[mode] = (loss, grads, saved)
    return out


def test_tensor_sequence_parallel_recompute(dist):
    """tp=2 with SP: recomputation (collectives inside the blocks, dropout) gives the gradients of no
    recomputation, and each mode's bytes per layer fall from tp=1 by the formula's ratio."""
    s, b, t = 32, 4, 2
    single = tp_record(s, b)
    results = dist(t).run(tp_record, s, b)
    print("\nbytes per layer, tp1 -> tp2+sp: " + "; ".join(
        f"{m} {single[m][2]:.0f} -> {results[0][m][2]:.0f}" for m in RECOMPUTE))
    for r in results:
        loss, grads, _ = r["none"]
        for mode in ("selective", "full"):
            assert r[mode][0].item() == loss.item(), mode
            for n, g in grads.items():
                torch.testing.assert_close(r[mode][1][n], g, rtol=0, atol=0, msg=f"{mode}: grad of {n}")
        assert r["full"][2] < r["selective"][2] < r["none"][2]
        cfg = CONFIGS["gpt-tiny"]
        for mode in RECOMPUTE:
            kw = dict(s=s, b=b, h=cfg.d_model, a=cfg.n_heads, recompute=mode)
            formula_ratio = (korthikanti_bytes_per_layer(**kw, t=t, sequence_parallel=True)
                             / korthikanti_bytes_per_layer(**kw, t=1, sequence_parallel=False))
            measured_ratio = r[mode][2] / single[mode][2]
            assert measured_ratio == pytest.approx(formula_ratio, rel=0.05), mode  # 1/t: everything is sharded
        # full keeps this rank's sequence shard of the block input: 2*s*b*h/t 16-bit bytes, x2 in fp32
        assert r["full"][2] == 2 * korthikanti_bytes_per_layer(s=s, b=b, h=cfg.d_model, a=cfg.n_heads, t=t,
                                                               sequence_parallel=True, recompute="full")


def trainer_curve(data_path, preset, layout, recompute):
    from test_distributed import make_trainer
    trainer = make_trainer(data_path, preset, layout, steps=3, recompute=recompute)
    losses, moe = [], []
    for _ in range(3):
        losses.append(trainer.step().loss)
        moe.append(trainer.moe_metrics)
    return {"losses": losses, "moe": moe, "wrapped": trainer.recomputed}


def test_trainer_recompute_setting_keeps_the_curve(dist, tiny_dataset):
    """train.recompute through the Trainer, MoE model under ep2 x tp2 with sequence parallelism: the same
    losses and routing counts (recomputed forwards do not count twice) as without recomputation."""
    layout = Layout(ep=2, tp=2, sequence_parallel=True)
    path = str(tiny_dataset.path)
    runs = {mode: dist(4).run(trainer_curve, path, "gpt-moe-tiny", layout, mode) for mode in RECOMPUTE}
    assert runs["none"][0]["wrapped"] == 0 and runs["full"][0]["wrapped"] == 2  # two blocks
    for mode in ("selective", "full"):
        for a, b in zip(runs[mode], runs["none"]):
            assert a["losses"] == pytest.approx(b["losses"], rel=1e-6)
            for m, n in zip(map(dict, a["moe"]), map(dict, b["moe"])):
                bytes_a, bytes_b = m.pop("moe_all_to_all_bytes"), n.pop("moe_all_to_all_bytes")
                assert m == n
                # recomputing a block repeats its forward all-to-alls: real traffic, counted
                # (forward dispatch and combine twice, backward once: 1.5x, plus the small count exchange)
                assert bytes_a == bytes_b if mode == "selective" else 1.45 < bytes_a / bytes_b < 1.55
