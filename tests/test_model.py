"""The transformer: shapes, deterministic sharded initialisation, masks, attention math, counting."""

import math

import pytest
import torch
import torch.nn.functional as F

from meshlm.config import PRESETS, ConfigError, check_model, flops_per_token, param_count
from meshlm.model import Shard, Transformer, apply_rope, build_model, full_init, init_weights, loss_sum, new_param

V = 512
TINY = {n: PRESETS[n].replace(vocab_size=V) for n in ("gpt-tiny", "llama-tiny", "bert-tiny")}


@pytest.mark.parametrize("name", TINY)
def test_shapes_and_initial_loss(name):
    cfg = TINY[name]
    model = build_model(cfg, seed=0)
    x = torch.randint(0, V, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, V)
    targets = torch.randint(0, V, (3, 17))
    loss, n = loss_sum(logits, targets)
    assert n == 3 * 17
    assert abs(loss.item() / n - math.log(V)) < 0.5  # small init: close to uniform


@pytest.mark.parametrize("name", TINY)
def test_init_is_deterministic_per_parameter(name):
    cfg = TINY[name]
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
        if pa.meshlm_init[0] == "normal":
            assert not torch.equal(pa, pc), na


def test_init_std_and_residual_scaling():
    cfg = PRESETS["gpt-small"].replace(vocab_size=V)
    model = build_model(cfg, seed=0)
    assert abs(model.layers["0"].attn.wq.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(model.layers["0"].attn.wo.weight.std().item() - scaled) < 0.1 * scaled
    assert torch.equal(model.layers["0"].norm1.weight, torch.ones(cfg.d_model))
    assert torch.equal(model.layers["0"].mlp.w1.bias, torch.zeros(cfg.d_ff))


def test_shard_is_slice_of_full_init():
    """DESIGN principle 4: a rank's shard equals the slice of what one process would draw."""
    full = torch.nn.Module()
    full.w = new_param(8, 6, init="normal", std=1.0)
    init_weights(full, seed=7)
    for dim in (0, 1):
        parts = 2
        for index in range(parts):
            m = torch.nn.Module()
            m.w = new_param(8, 6, init="normal", std=1.0, shard=Shard(dim, index, parts))
            init_weights(m, seed=7)
            size = full.w.shape[dim] // parts
            assert torch.equal(m.w, full.w.narrow(dim, index * size, size))
    assert torch.equal(full_init("w", full.w, 7), full.w.detach())
    with pytest.raises(ValueError, match="does not split into 4 parts"):
        new_param(6, 3, init="zeros", shard=Shard(0, 0, 4))


def test_partial_model_matches_whole():
    """A pipeline-stage-like slice (blocks 1..2, no embedding) has the same named values as the whole."""
    cfg = PRESETS["llama-tiny"].replace(vocab_size=V, n_layers=4)
    whole = dict(build_model(cfg, seed=3).named_parameters())
    part = Transformer(cfg, layers=range(1, 3), pre=False, post=False)
    init_weights(part, seed=3)
    names = [n for n, _ in part.named_parameters()]
    assert names and all(n.startswith(("layers.1.", "layers.2.")) for n in names)
    for n, p in part.named_parameters():
        assert torch.equal(p, whole[n]), n
    # chaining the parts reproduces the whole model
    model = build_model(cfg, seed=3)
    first = Transformer(cfg, layers=range(0, 1), post=False)
    last = Transformer(cfg, layers=range(3, 4), pre=False)
    for m in (first, last):
        init_weights(m, seed=3)
    x = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(last(part(first(x))), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_causality(name):
    cfg = TINY[name]
    model = build_model(cfg, seed=0)
    x = torch.randint(0, V, (1, 12))
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1) % V
    a, b = model(x), model(y)
    if cfg.causal:
        torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    else:  # BERT sees the whole sequence
        assert not torch.allclose(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_attention_matches_naive_gqa():
    """SDPA with grouped-query attention and RoPE equals the textbook computation."""
    cfg = TINY["llama-tiny"]
    model = build_model(cfg, seed=0)
    attn = model.layers["0"].attn
    B, T = 2, 10
    x = torch.randn(B, T, cfg.d_model)
    H, K, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    q = attn.wq(x).view(B, T, H, D).transpose(1, 2)
    k = attn.wk(x).view(B, T, K, D).transpose(1, 2)
    v = attn.wv(x).view(B, T, K, D).transpose(1, 2)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    expected = attn.wo(y)
    torch.testing.assert_close(attn(x, (cos.unsqueeze(0), sin.unsqueeze(0))), expected, rtol=1e-5, atol=1e-6)


def test_rope_is_relative():
    """<R(m) q, R(n) k> depends only on m - n."""
    D = 16
    cfg = TINY["llama-tiny"].replace(d_model=64, n_heads=4)
    model = Transformer(cfg)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def dot(m, n):
        qm = apply_rope(q, model.rope_cos[m:m + 1], model.rope_sin[m:m + 1])
        kn = apply_rope(k, model.rope_cos[n:n + 1], model.rope_sin[n:n + 1])
        return (qm * kn).sum().item()

    assert dot(5, 3) == pytest.approx(dot(12, 10), rel=1e-4)
    assert dot(5, 3) != pytest.approx(dot(5, 4), rel=1e-3)


def test_bert_token_types_and_tied_head():
    cfg = TINY["bert-tiny"]
    model = build_model(cfg, seed=0)
    x = torch.randint(0, V, (2, 8))
    types = torch.zeros_like(x)
    types[:, 4:] = 1
    assert not torch.allclose(model(x), model(x, token_types=types))
    assert not hasattr(model, "head")  # decoder tied to the token embedding
    assert hasattr(TINY["llama-tiny"], "tie_embeddings") and hasattr(build_model(TINY["llama-tiny"]), "head")


def test_loss_sum_ignores_minus_100():
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, -100, 3, -100]])
    loss, n = loss_sum(logits, targets)
    assert n == 2
    expected = F.cross_entropy(logits[0, [0, 2]], targets[0, [0, 2]], reduction="sum")
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_matches_built_model(name):
    cfg = PRESETS[name]
    cfg = cfg if cfg.vocab_size else cfg.replace(vocab_size=V)
    with torch.device("meta"):  # published shapes (llama-70b) are built without memory
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)["total"]


def test_published_sizes():
    millions = {n: param_count(PRESETS[n])["total"] / 1e6 for n in ("gpt2", "gpt2-xl", "llama-7b", "bert-base")}
    assert round(millions["gpt2"]) == 124  # the published 124M
    assert round(millions["gpt2-xl"]) == 1558  # 1.5B
    assert 6700 < millions["llama-7b"] < 6800  # 6.74B
    assert 108 < millions["bert-base"] < 111  # 110M (without the NSP pooler)
    assert 68_000 < param_count(PRESETS["llama-70b"])["total"] / 1e6 < 70_000


def test_flops_per_token_is_about_6n():
    cfg = PRESETS["gpt2"]
    n = param_count(cfg)["total"] - cfg.max_seq_len * cfg.d_model  # matmul weights (tied head counted once)
    assert flops_per_token(cfg, seq_len=1024) == pytest.approx(6 * n + 12 * 12 * 768 * 1024, rel=0.01)


def test_check_model_errors():
    with pytest.raises(ConfigError, match=r"model.n_heads \(5\) must divide model.d_model \(64\)"):
        check_model(TINY["gpt-tiny"].replace(n_heads=5))
    with pytest.raises(ConfigError, match=r"model.n_kv_heads \(3\) must divide model.n_heads \(4\)"):
        check_model(TINY["llama-tiny"].replace(n_kv_heads=3))
    with pytest.raises(ConfigError, match="vocab_size"):
        Transformer(PRESETS["gpt-tiny"])  # vocab 0: must come from the data first
