"""Layout validation (pure, every rule with its message) and the rank grid."""

import re

import pytest

from meshlm.config import PRESETS
from meshlm import layout as layout_mod
from meshlm.layout import AXES, Layout, LayoutError, require_implemented, validate
from meshlm.mesh import Mesh, axis_groups, rank_grid

GPT = PRESETS["gpt-tiny"].replace(vocab_size=512)  # 4 heads, d_ff 256, 2 layers
LLAMA = PRESETS["llama-tiny"].replace(vocab_size=512)  # 4 heads, 2 kv heads
MOE = GPT.replace(n_experts=4)
BERT = PRESETS["bert-tiny"].replace(vocab_size=512)


@pytest.mark.parametrize("layout, model, kw, message", [
    (Layout(dp=0), GPT, {}, "dp (0) must be a positive integer"),
    (Layout(tp=-2), GPT, {}, "tp (-2) must be a positive integer"),
    (Layout(micro_batches=0), GPT, {}, "micro_batches (0) must be a positive integer"),
    (Layout(vpp=0), GPT, {}, "vpp (0) must be a positive integer"),
    (Layout(zero=4), GPT, {}, "zero (4) must be 0, 1, 2 or 3"),
    (Layout(schedule="zigzag"), GPT, {}, "schedule ('zigzag') must be one of gpipe, 1f1b, interleaved, zb"),
    (Layout(dp=2, tp=2), GPT, {"world_size": 8},
     "product of degrees pp*dp*ep*cp*tp (4) must equal the world size (8)"),
    (Layout(tp=3), GPT, {}, "tp (3) must divide n_heads (4)"),
    (Layout(tp=4), LLAMA.replace(n_heads=8, n_kv_heads=8, d_model=64, d_ff=192).replace(n_kv_heads=8), {}, None),
    (Layout(tp=4), LLAMA.replace(n_heads=12, n_kv_heads=6, d_model=96, d_ff=192), {},
     "tp (4) must divide n_kv_heads (6) or be a multiple of it"),
    (Layout(tp=4), GPT.replace(d_ff=250), {}, "tp (4) must divide d_ff (250)"),
    (Layout(sequence_parallel=True), GPT, {}, "sequence_parallel (True) needs tp > 1 (tp is 1)"),
    (Layout(pp=4), GPT, {}, "pp*vpp (4) must not exceed n_layers (2)"),
    (Layout(pp=2, vpp=2, schedule="interleaved"), GPT.replace(n_layers=3), {},
     "pp*vpp (4) must not exceed n_layers (3)"),
    (Layout(vpp=2, schedule="interleaved"), GPT, {}, "vpp (2) needs pp > 1 (pp is 1)"),
    (Layout(pp=2, vpp=2), GPT.replace(n_layers=4), {}, "vpp (2) needs schedule 'interleaved' (schedule is '1f1b')"),
    (Layout(pp=2, vpp=2, schedule="interleaved", micro_batches=3), GPT.replace(n_layers=4), {},
     "micro_batches (3) must be a multiple of pp (2) for the interleaved schedule"),
    (Layout(ep=2), GPT, {}, "ep (2) needs a mixture-of-experts model (n_experts is 0)"),
    (Layout(ep=3), MOE.replace(n_experts=4), {}, "ep (3) must divide n_experts (4)"),
    (Layout(tp=2, sequence_parallel=True), GPT, {"seq_len": 33},
     "tp (2) must divide seq_len (33) under sequence parallelism"),
    (Layout(cp=2), GPT, {"seq_len": 30},
     "seq_len (30) must be divisible by 4 (2*cp for the load-balanced causal split)"),
    (Layout(cp=4), BERT, {"seq_len": 30}, "seq_len (30) must be divisible by 4 (cp)"),
    (Layout(dp=2, micro_batches=3), GPT, {"batch_size": 8},
     "batch_size (8) must be divisible by dp*ep*micro_batches (6)"),
])
def test_validate_rules(layout, model, kw, message):
    if message is None:
        validate(layout, model, **kw)
        return
    with pytest.raises(LayoutError, match=re.escape(message)):
        validate(layout, model, **kw)


def test_valid_layouts_pass():
    validate(Layout(dp=2, tp=2, pp=2, micro_batches=2), GPT, 8, batch_size=8, seq_len=64)
    validate(Layout(dp=2, ep=2, tp=2), MOE, 8, batch_size=8)
    validate(Layout(tp=4), LLAMA, 4)  # 2 kv heads replicated over 4 tp ranks
    validate(Layout(pp=2, vpp=1, schedule="gpipe"), GPT, 2)


def test_layout_error_is_value_error():
    assert issubclass(LayoutError, ValueError)


def test_require_implemented(monkeypatch):
    require_implemented(Layout(dp=4, micro_batches=2, zero=3))
    require_implemented(Layout(dp=2, tp=2, sequence_parallel=True))
    require_implemented(Layout(pp=2, dp=2, tp=2, micro_batches=2))
    require_implemented(Layout(dp=2, ep=2, tp=2, pp=2, micro_batches=2))
    require_implemented(Layout(cp=2, dp=2, tp=2, pp=2, micro_batches=2))
    for zero in (1, 2, 3):  # ZeRO composes with pipeline and expert parallelism
        require_implemented(Layout(pp=2, dp=2, micro_batches=2, zero=zero))
        require_implemented(Layout(dp=2, ep=2, pp=2, micro_batches=2, zero=zero))
    monkeypatch.setitem(layout_mod.NOT_IMPLEMENTED, "cp", "context parallelism")  # how a refusal reads
    with pytest.raises(LayoutError, match=re.escape("cp (2) is not implemented yet: context parallelism has not")):
        require_implemented(Layout(cp=2))


def test_rank_grid_and_groups():
    layout = Layout(pp=2, dp=2, tp=2)
    assert rank_grid(layout).shape == (2, 2, 1, 1, 2)
    assert axis_groups(layout, ("tp",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # tp fastest: neighbours
    assert axis_groups(layout, ("dp",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert axis_groups(layout, ("pp",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert axis_groups(layout, ("dp", "ep", "cp")) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert axis_groups(Layout(dp=2, ep=2), ("dp", "ep")) == [[0, 1, 2, 3]]
    # every axis partitions the world
    for axis in AXES:
        groups = axis_groups(layout, (axis,))
        assert sorted(r for g in groups for r in g) == list(range(8))


def test_single_mesh():
    mesh = Mesh.single()
    assert mesh.group("dp") is None and mesh.size(("dp", "ep")) == 1 and mesh.data_rank == 0
    assert mesh.is_first_stage and mesh.is_last_stage
    with pytest.raises(ValueError, match="world of 1"):
        Mesh.single(Layout(dp=2))


def test_describe():
    assert Layout().describe() == "single process"
    assert Layout(dp=2, tp=2, zero=1).describe() == "dp2 x tp2 (zero 1)"
