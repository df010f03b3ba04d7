"""Mixed precision: autocast dtypes, precision checks, and the dynamic loss scaler (one and two ranks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from meshlm.config import PRESETS, ConfigError
from meshlm.model import build_model
from meshlm.train.precision import LossScaler, autocast_dtype, check_precision, needs_loss_scaling


# --- precision names and devices ----------------------------------------------------------------


def test_autocast_dtype():
    assert autocast_dtype("fp32") is None
    assert autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("fp16") is torch.float16
    assert needs_loss_scaling("fp16") and not needs_loss_scaling("bf16") and not needs_loss_scaling("fp32")
    with pytest.raises(ConfigError, match=r"train.precision \('fp8'\) must be one of fp32, bf16, fp16"):
        autocast_dtype("fp8")


def test_check_precision_cpu():
    for p in ("fp32", "bf16", "fp16"):  # CPU autocast has an fp16 path in this torch: allowed
        check_precision(p, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.precision \('half'\) must be one of"):
        check_precision("half", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.precision \('fp16'\) needs autocast.*'meta'"):
        check_precision("fp16", torch.device("meta"))
    check_precision("fp32", torch.device("meta"))  # fp32 needs no autocast anywhere


def test_cpu_fp16_autocast_runs_the_model():
    """The claim behind allowing fp16 on CPU: the ops the model uses autocast to fp16 (the loss to
    fp32), backward works, and the fp32 parameters get fp32 gradients close to fp32 training's."""
    with torch.autocast("cpu", dtype=torch.float16):
        x = torch.randn(2, 4, 8, 16)
        assert F.linear(x, torch.randn(16, 16)).dtype == torch.float16
        assert (x @ x.transpose(-1, -2)).dtype == torch.float16
        assert F.scaled_dot_product_attention(x, x, x, is_causal=True).dtype == torch.float16
        assert F.cross_entropy(x.flatten(0, 2), torch.zeros(64, dtype=torch.long)).dtype == torch.float32
    model = build_model(PRESETS["gpt-tiny"].replace(vocab_size=512))
    x, y = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0)).chunk(2, dim=1)
    grads = {}
    for dtype in (None, torch.float16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype is not None):
            logits = model(x)
        loss, n = model.loss_sum(logits, y)
        (loss / n).backward()
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # fp32 master weights
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[torch.float16].dtype == torch.float32
    assert torch.allclose(grads[torch.float16], grads[None], rtol=0, atol=2e-3 * grads[None].abs().max())


# --- the scaler's arithmetic --------------------------------------------------------------------


def test_backoff_growth_and_skips():
    s = LossScaler(init_scale=2.0 ** 10, growth_interval=3)
    assert s.scale == s.loss_multiplier() == 1024.0
    s.update(True)
    assert (s.scale, s.skipped, s.good_steps) == (512.0, 1, 0)
    s.update(False)
    s.update(False)
    assert s.scale == 512.0 and s.good_steps == 2
    s.update(True)  # an overflow resets the run of good steps
    assert (s.scale, s.skipped, s.good_steps) == (256.0, 2, 0)
    for _ in range(3):
        s.update(False)
    assert (s.scale, s.good_steps) == (512.0, 0)  # grown after exactly growth_interval good steps
    for _ in range(6):
        s.update(False)
    assert s.scale == 2048.0 and s.skipped == 2


def test_min_scale_and_arguments():
    s = LossScaler(init_scale=4.0, min_scale=1.0)
    for _ in range(5):
        s.update(True)
    assert s.scale == 1.0 and s.skipped == 5
    with pytest.raises(ConfigError, match=r"backoff_factor \(2.0\) must be in \(0, 1\)"):
        LossScaler(backoff_factor=2.0)
    with pytest.raises(ConfigError, match=r"growth_interval \(0\) must be >= 1"):
        LossScaler(growth_interval=0)
    with pytest.raises(TypeError):
        LossScaler(2.0 ** 16)  # keyword-only


def test_state_dict_round_trip():
    s = LossScaler(init_scale=2.0 ** 12, growth_interval=5)
    s.update(True)
    s.update(False)
    s.update(False)
    state = s.state_dict()
    assert state == {"enabled": True, "scale": 2048.0, "good_steps": 2, "skipped": 1}
    t = LossScaler(init_scale=2.0 ** 12, growth_interval=5)
    t.load_state_dict(state)
    assert t.state_dict() == state
    for _ in range(3):  # the growth counter carried over: 2 + 3 = 5 good steps
        t.update(False)
    assert t.scale == 4096.0
    # a disabled (bf16) run's state does not pin an fp16 resume at scale 1
    u = LossScaler(init_scale=2.0 ** 16)
    u.load_state_dict(LossScaler(enabled=False).state_dict())
    assert u.scale == 2.0 ** 16


def test_disabled_is_the_identity():
    s = LossScaler(enabled=False)
    g = torch.tensor([1.0, float("inf")])
    assert s.scale == s.loss_multiplier() == 1.0
    assert s.unscale_and_check([g], [None]) is False  # never skips, never touches the gradients
    assert g[0] == 1.0
    s.update(True)
    assert s.scale == 1.0 and s.skipped == 0


def test_unscale_divides_exactly():
    s = LossScaler(init_scale=2.0 ** 16)
    true = [torch.randn(7, 5, dtype=torch.float64).float(), torch.randn(3).float() * 1e-6]
    grads = [g * 2.0 ** 16 for g in true]
    assert s.unscale_and_check(grads, [None]) is False
    for g, t in zip(grads, true):
        assert torch.equal(g, t)
    g = torch.full((3,), 64.0)
    s.unscale_and_check([g, g], [None])  # listed twice (a tied weight), divided once
    assert torch.equal(g, torch.full((3,), 2.0 ** -10))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_planted_overflow_is_found(bad):
    s = LossScaler(init_scale=8.0)
    grads = [torch.ones(4), torch.ones(3, 3)]
    grads[1][2, 1] = bad
    assert s.unscale_and_check(grads, [None]) is True
    s.update(True)
    assert s.scale == 4.0 and s.skipped == 1


# --- training goes on past a skipped step -------------------------------------------------------


def test_skipped_step_leaves_the_weights_and_training_continues():
    """Manual fp16-style steps on the tiny GPT: the step with a planted inf changes no parameter (nor
    the AdamW state), halves the scale and counts a skip; the other steps update every parameter."""
    torch.manual_seed(0)
    model = build_model(PRESETS["gpt-tiny"].replace(vocab_size=512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = LossScaler(init_scale=2.0 ** 8, growth_interval=1000)
    data = torch.randint(0, 512, (4, 2, 33), generator=torch.Generator().manual_seed(1))
    planted = 2
    losses = []
    for step in range(4):
        x, y = data[step][:, :-1], data[step][:, 1:]
        before = [p.detach().clone() for p in model.parameters()]
        adam_steps = [opt.state[p]["step"].item() if p in opt.state else 0 for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        loss, n = model.loss_sum(logits, y)
        (loss / n * scaler.loss_multiplier()).backward()
        losses.append((loss / n).item())
        params = list(model.parameters())
        if step == planted:
            params[3].grad.view(-1)[5] = float("inf")
        found = scaler.unscale_and_check([p.grad for p in params], [None])
        scaler.update(found)
        if not found:
            opt.step()
        opt.zero_grad(set_to_none=True)
        changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        if step == planted:
            assert found and scaler.skipped == 1 and scaler.scale == 2.0 ** 7
            assert not any(changed)
            assert [opt.state[p]["step"].item() for p in model.parameters()] == adam_steps
        else:
            assert not found
            assert all(changed)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)
    assert scaler.skipped == 1 and scaler.scale == 2.0 ** 7


# --- two ranks agree ----------------------------------------------------------------------------


def _found_inf_on_rank_1(plant_rank: int | None) -> tuple[bool, float, int, float]:
    import torch.distributed as dist

    rank = dist.get_rank()
    s = LossScaler(init_scale=2.0 ** 4)
    grads = [torch.full((5,), 16.0 * (rank + 1)), torch.full((2, 2), 32.0)]
    if rank == plant_rank:
        grads[0][3] = float("inf")
    found = s.unscale_and_check(grads, [None, dist.group.WORLD])
    s.update(found)
    return found, s.scale, s.skipped, grads[1][0, 0].item()


def test_two_ranks_agree_on_overflow(dist):
    out = dist(2).run(_found_inf_on_rank_1, 1)
    assert [o[:3] for o in out] == [(True, 8.0, 1), (True, 8.0, 1)]  # rank 0 had no inf, skips as well
    assert [o[3] for o in out] == [2.0, 2.0]  # unscaled on every rank
    out = dist(2).run(_found_inf_on_rank_1, None)
    assert [o[:3] for o in out] == [(False, 16.0, 0), (False, 16.0, 0)]


# --- through the Trainer --------------------------------------------------------------------------


def trainer_fp16_run(data_path: str, plant_step: int, plant_rank: int):
    """4 fp16 steps of the Trainer; at `plant_step` rank `plant_rank` gets an inf gradient."""
    import torch.distributed as dist
    from meshlm.layout import Layout
    from test_distributed import make_trainer

    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer = make_trainer(data_path, "gpt-tiny", Layout(dp=world), precision="fp16")
    rank = dist.get_rank() if dist.is_initialized() else 0
    weight = trainer.model.layers["0"].mlp.w1.weight

    def plant(p):
        if trainer.step_num == plant_step and rank == plant_rank:
            p.grad.view(-1)[0] = float("inf")

    weight.register_post_accumulate_grad_hook(plant)
    out = []
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        r = trainer.step()
        changed = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
        out.append({"loss": r.loss, "skipped": r.skipped, "changed": changed, "scale": trainer.scaler.scale,
                    "adam_steps": float(trainer.optimizer.state[weight]["step"]) if weight in trainer.optimizer.state
                    else 0.0})
    return out


def test_trainer_fp16_skips_a_planted_overflow_on_every_rank(dist, tiny_dataset):
    """dp=2, fp16: an inf on rank 1's gradient at step 1 makes both ranks skip that step (weights and AdamW
    untouched), count it and halve the scale; the steps around it train."""
    results = dist(2).run(trainer_fp16_run, str(tiny_dataset.path), 1, 1)
    for steps in results:
        assert [s["skipped"] for s in steps] == [False, True, False, False]
        assert [s["changed"] for s in steps] == [True, False, True, True]
        assert [s["adam_steps"] for s in steps] == [1.0, 1.0, 2.0, 3.0]
        assert steps[1]["scale"] == steps[0]["scale"] / 2 == 2.0 ** 15
        assert all(math.isfinite(s["loss"]) for s in steps)
    assert results[0] == results[1]


def test_trainer_fp16_matches_fp32_and_scales_moe_aux_losses(tiny_dataset):
    """fp16 gradients, unscaled, are the fp32 ones to fp16 rounding, including the router's, whose
    gradient is dominated by the load-balancing loss here (its backward must be scaled as well)."""
    from meshlm.layout import Layout
    from test_expert import make_trainer_with

    torch.manual_seed(0)
    grads = {}
    for precision in ("fp32", "fp16"):
        trainer = make_trainer_with(str(tiny_dataset.path), "gpt-moe-tiny", Layout(), 1,
                                    {"moe_aux_weight": 10.0})
        trainer.cfg.train.__dict__["precision"] = precision  # same model and data, another precision
        # 2^8, not 2^16: at 2^16 the fp16 bias gradients (sums over 256 tokens) overflow, which is the
        # scaler's business (the test above), not this test's
        trainer.scaler = LossScaler(enabled=precision == "fp16", init_scale=2.0 ** 8)
        trainer.compute_gradients(0)
        g = trainer.sync.grads()
        assert not trainer.scaler.unscale_and_check([t for t, _ in g], [])
        grads[precision] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    for n, g32 in grads["fp32"].items():
        if n.endswith("wk.bias"):  # softmax is invariant to a key bias: its true gradient is 0, all rounding
            continue
        g16 = grads["fp16"][n]
        err = (g16 - g32).abs().max() / g32.abs().max().clamp(min=1e-12)
        assert err < 2e-2, (n, err.item())
    router = grads["fp32"]["layers.0.mlp.router"]
    assert router.abs().max() > 0
