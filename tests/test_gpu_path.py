"""The GPU path, checked on CPU: no host synchronisation inside a step, the fused-AdamW and compile
decisions, pinned asynchronous batch copies, flash-eligible attention calls, torch.compile per block
against eager, metrics read once per log interval, and `meshlm bench --gpu-baseline` end to end."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from meshlm import data as data_mod
from meshlm.config import preset
from meshlm.layout import Layout
from meshlm.train import compiled as compiled_mod
from meshlm.train.compiled import wants_compile
from meshlm.train.trainer import can_fuse, make_optimizer, place_optimizer_steps, train

from test_distributed import make_trainer
from test_train import run_config

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def test_step_reads_no_tensor_on_the_host(tiny_dataset, monkeypatch):
    """Trainer.step never asks for a tensor's value (what would make the host wait for a GPU). The AdamW
    internals are let through: their for-each path reads its step counts, which live on the host."""
    trainer = make_trainer(str(tiny_dataset.path), "gpt-tiny", Layout())
    trainer.step()  # the optimizer's states exist from here on
    allowed = [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def guarded(self, *a, _name=name, _original=original, **kw):
            if not allowed[0]:
                raise AssertionError(f"Tensor.{_name} inside Trainer.step")
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    optimizer_step = trainer.optimizer.step

    def let_through(*a, **kw):
        allowed[0] = True
        try:
            return optimizer_step(*a, **kw)
        finally:
            allowed[0] = False
    monkeypatch.setattr(trainer.optimizer, "step", let_through)
    r = trainer.step()
    allowed[0] = True
    assert isinstance(r.loss_tensor, torch.Tensor) and r.loss_tensor.dim() == 0
    assert 0 < r.loss < 20 and r.grad_norm > 0


def test_metrics_read_once_per_log_interval(tiny_dataset, tmp_path):
    """log_every 4 over 6 steps: two reads (steps 1-4, then 5-6 at the end); every step still has its own
    record, the step time is the interval's mean, and the losses are those of logging every step."""
    common = {"train.eval_every": 0}
    every = train(run_config(tiny_dataset, tmp_path / "every", **common, **{"train.log_every": 1}))
    grouped = train(run_config(tiny_dataset, tmp_path / "grouped", **common, **{"train.log_every": 4}))
    assert grouped["losses"] == every["losses"] and len(grouped["losses"]) == 6
    records = [json.loads(line) for line in (tmp_path / "grouped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == grouped["losses"]
    assert len({r["step_time_s"] for r in records[:4]}) == 1 and len({r["step_time_s"] for r in records[4:]}) == 1
    assert records[0]["step_time_s"] != records[4]["step_time_s"]


def test_fused_adamw_on_cuda_parameters_only():
    cuda = SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    cpu = SimpleNamespace(is_cuda=False, is_floating_point=lambda: True)
    ints = SimpleNamespace(is_cuda=True, is_floating_point=lambda: False)
    assert can_fuse([cuda, cuda]) and not can_fuse([cuda, cpu]) and not can_fuse([ints]) and not can_fuse([])
    cfg = SimpleNamespace(train=SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.95))
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = make_optimizer([{"params": [w], "weight_decay": 0.0}], cfg)
    assert not opt.defaults["fused"] and opt.defaults["foreach"]
    w.grad = torch.ones_like(w)
    opt.step()
    opt.state[w]["step"] = torch.tensor(5.0, dtype=torch.float64)  # as a checkpoint load may leave it
    place_optimizer_steps(opt)
    step = opt.state[w]["step"]
    assert step.device.type == "cpu" and step.dtype == torch.float32 and float(step) == 5.0


def test_compile_decision():
    dense, moe = preset("gpt-tiny"), preset("gpt-moe-tiny")
    auto = lambda device, model=dense, layout=Layout(): wants_compile("auto", device_type=device,  # noqa: E731
                                                                     model=model, layout=layout)
    assert auto("cuda") and not auto("cpu")
    assert not auto("cuda", moe) and not auto("cuda", layout=Layout(tp=2)) and not auto("cuda", layout=Layout(cp=2))
    assert not auto("cuda", layout=Layout(pp=2, schedule="zb", micro_batches=2))
    assert auto("cuda", layout=Layout(pp=2, micro_batches=2))
    assert wants_compile("true", device_type="cpu", model=moe, layout=Layout(tp=2))
    assert not wants_compile("false", device_type="cuda", model=dense, layout=Layout())
    with pytest.raises(ValueError, match=r"train.compile \('yes'\) must be one of: auto, true, false"):
        wants_compile("yes", device_type="cpu", model=dense, layout=Layout())


def test_batches_are_pinned_and_copied_asynchronously_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: calls.append(("to", a, kw)) or self)
    x, y = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    data_mod.to_device((x, y), torch.device("cuda", 0))
    assert calls == ["pin", ("to", (torch.device("cuda", 0),), {"non_blocking": True})] * 2
    calls.clear()
    data_mod.to_device((x,), torch.device("cpu"))
    assert calls == [("to", (torch.device("cpu"),), {})]  # no pinning off the GPU


def test_training_attention_is_flash_eligible(tiny_dataset, monkeypatch):
    """No materialised mask: is_causal=True and attn_mask None, the call the flash kernel takes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(kw)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises when the flash kernel cannot take the call
            return original(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    trainer = make_trainer(str(tiny_dataset.path), "gpt-tiny", Layout())
    trainer.compute_gradients(0)
    assert len(seen) == 2 and all(kw["attn_mask"] is None and kw["is_causal"] for kw in seen)


@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo's capture of our blocks and AOT autograd, without code generation: seconds
    pytest.param("inductor", marks=pytest.mark.skipif(  # the real thing: a minute of C++ compilation on CPU
        os.environ.get("MESHLM_INDUCTOR") != "1", reason="inductor on CPU is slow; MESHLM_INDUCTOR=1 runs it")),
])
def test_compiled_blocks_match_eager(tiny_dataset, capsys, monkeypatch, backend):
    """--train.compile true on CPU: both blocks (and the loss) compiled; the loss curve is eager's."""
    monkeypatch.setattr(compiled_mod, "BACKEND", backend)
    path = str(tiny_dataset.path)
    eager = make_trainer(path, "gpt-tiny", Layout(), seq_len=16, batch_size=4, compile="false")
    compiled = make_trainer(path, "gpt-tiny", Layout(), seq_len=16, batch_size=4, compile="true")
    assert eager.compiled == 0 and compiled.compiled == 2
    assert "meshlm: applied torch.compile to 2 blocks" in capsys.readouterr().out
    want = [eager.step().loss for _ in range(3)]
    got = [compiled.step().loss for _ in range(3)]
    assert got == pytest.approx(want, rel=1e-4)
    assert got[-1] < got[0]
    if backend == "aot_eager":  # compile after recomputation: dynamo traces the checkpointed region
        recomputed = make_trainer(path, "gpt-tiny", Layout(), seq_len=16, batch_size=4, compile="true",
                                  recompute="selective")
        assert [recomputed.step().loss for _ in range(3)] == pytest.approx(want, rel=1e-4)


def test_gpu_baseline_on_cpu(tiny_dataset, tmp_path, capsys):
    """The comparison end to end (a tiny model on CPU): both loops report tokens/s and MFU, and with the
    same weights, batches and optimizer their losses agree step by step."""
    from meshlm.cli import main
    code = main(["bench", "--gpu-baseline", "--data", str(tiny_dataset.path), "--out", str(tmp_path),
                 "--steps", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no GPU here" in out and "meshlm / plain:" in out
    result = json.loads((tmp_path / "gpu_baseline.json").read_text())
    for name in ("meshlm", "plain"):
        r = result[name]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and len(r["losses"]) == 4
        assert r["losses"][-1] < r["losses"][0], name
        assert f"  {name} " in out
    assert result["meshlm"]["losses"][0] == pytest.approx(result["plain"]["losses"][0], rel=1e-5)
    assert result["loss_max_rel_diff"] < 1e-4
    assert result["speedup"] == pytest.approx(result["meshlm"]["tokens_per_s"] / result["plain"]["tokens_per_s"])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "x"], "meshlm: error: --steps ('x') must be an integer"),
    (["--bogus"], "meshlm: error: meshlm bench --gpu-baseline: unknown flag '--bogus'"),
    (["--precision", "fp8"], "meshlm: error: --precision ('fp8') must be one of: bf16, fp32"),
])
def test_gpu_baseline_bad_flags(capsys, argv, message):
    from meshlm.cli import main
    assert main(["bench", "--gpu-baseline", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
