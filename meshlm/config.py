"""Model configurations: one `ModelConfig` for the GPT-2, Llama and BERT families, and presets.

The three families differ only in a handful of switches (norm, activation, positions, causal mask,
norm placement, biases, tied head), so one transformer in `model.py` serves them all.
Presets come in two kinds: tiny ones that train on a laptop core in seconds (tests, the default
`meshlm train`), and the published shapes (gpt2-*, llama-*, bert-*) for the planner and for
importing real checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and the rule."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: Literal["gpt", "llama", "bert"] = "gpt"
    """Model family: 'gpt' (GPT-2), 'llama' or 'bert'. Sets nothing by itself; presets set the switches below."""
    vocab_size: int = 0
    """Vocabulary size. 0 means: take it from the tokenizer of the training data."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of the learned position table; RoPE tables too)."""
    d_model: int = 256
    """Hidden size."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention (Ainslie et al. 2023). 0 means n_heads (plain multi-head)."""
    d_ff: int = 1024
    """Hidden size of the feed-forward block (per branch for SwiGLU)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """LayerNorm (GPT-2, BERT) or RMSNorm (Llama)."""
    norm_position: Literal["pre", "post"] = "pre"
    """'pre': norm before each sub-block (GPT-2, Llama); 'post': after the residual add (original BERT)."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"
    """Feed-forward activation: 'gelu_tanh' (GPT-2), 'gelu' (BERT), 'swiglu' (Llama, Shazeer 2020)."""
    position: Literal["learned", "rope"] = "learned"
    """Learned absolute positions (GPT-2, BERT) or rotary embeddings (Su et al. 2021, Llama)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    causal: bool = True
    """Causal (decoder) attention. False for BERT's bidirectional encoder."""
    bias: bool = True
    """Biases in linear layers and norms (GPT-2, BERT yes; Llama no)."""
    tie_embeddings: bool = True
    """Output projection shares the token embedding matrix (GPT-2, BERT)."""
    type_vocab_size: int = 0
    """Token-type (segment) embeddings; 2 for BERT, 0 for none."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention output and feed-forward output."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; residual projections are scaled by 1/sqrt(2*n_layers)."""
    n_experts: int = 0
    """Experts per mixture-of-experts layer; 0 means a dense model."""
    experts_per_token: int = 2
    """Top-k routing: experts each token is sent to (1 as in Switch, 2 as in GShard and Mixtral)."""
    moe_every: int = 1
    """Every n-th block is a mixture-of-experts block (1: all, as Mixtral; 2: every other one, as GShard)."""
    moe_dropless: bool = True
    """Dropless routing: every expert takes every token sent to it. False: a capacity per expert, the rest dropped."""
    moe_capacity_factor: float = 1.25
    """Without dropless: each expert takes at most ceil(factor * T * k / n_experts) tokens of each sequence."""
    moe_aux_weight: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer, Fedus et al. 2021)."""
    moe_z_weight: float = 0.001
    """Weight of the router z-loss (ST-MoE, Zoph et al. 2022): mean squared log-sum-exp of the router logits."""
    moe_shared_experts: int = 0
    """Shared experts every token goes through (DeepSeekMoE), as one dense MLP of d_ff * this width; 0: none."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def check_model(cfg: ModelConfig) -> None:
    """Pure checks of a model config; raises ConfigError naming field, value and rule."""
    for name in ("max_seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{name} ({value}) must be a positive integer")
    if cfg.vocab_size < 0:
        raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) must be >= 0 (0: from the data)")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"model.n_heads ({cfg.n_heads}) must divide model.d_model ({cfg.d_model})")
    if cfg.n_kv_heads < 0 or cfg.n_heads % cfg.kv_heads:
        raise ConfigError(f"model.n_kv_heads ({cfg.n_kv_heads}) must divide model.n_heads ({cfg.n_heads})")
    if cfg.position == "rope" and cfg.head_dim % 2:
        raise ConfigError(f"head_dim ({cfg.head_dim}) must be even for rope positions")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout ({cfg.dropout}) must be in [0, 1)")
    if cfg.family == "bert" and cfg.causal:
        raise ConfigError("model.causal (True) must be False for the bert family")
    if cfg.family != "bert" and not cfg.causal:
        raise ConfigError(f"model.causal (False) is only for the bert family (family is {cfg.family!r})")
    if cfg.n_experts < 0:
        raise ConfigError(f"model.n_experts ({cfg.n_experts}) must be >= 0 (0: a dense model)")
    if cfg.n_experts:
        if not 1 <= cfg.experts_per_token <= cfg.n_experts:
            raise ConfigError(
                f"model.experts_per_token ({cfg.experts_per_token}) must be in [1, n_experts ({cfg.n_experts})]")
        if not cfg.moe_capacity_factor > 0:
            raise ConfigError(f"model.moe_capacity_factor ({cfg.moe_capacity_factor}) must be > 0")
        if cfg.moe_every < 1:
            raise ConfigError(f"model.moe_every ({cfg.moe_every}) must be >= 1")
        if cfg.moe_shared_experts < 0:
            raise ConfigError(f"model.moe_shared_experts ({cfg.moe_shared_experts}) must be >= 0")
        for name in ("moe_aux_weight", "moe_z_weight"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"model.{name} ({getattr(cfg, name)}) must be >= 0")


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
    """Whether block `index` has a mixture-of-experts feed-forward (every moe_every-th block, the last of each run)."""
    return cfg.n_experts > 0 and index % cfg.moe_every == cfg.moe_every - 1


# --- families -----------------------------------------------------------------------------------

def gpt(**kw) -> ModelConfig:
    """GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm, tanh-GELU, biases, tied head."""
    return ModelConfig(family="gpt", norm="layernorm", activation="gelu_tanh", position="learned",
                       causal=True, bias=True, tie_embeddings=True, **kw)


def llama(**kw) -> ModelConfig:
    """Llama (Touvron et al. 2023): RoPE, pre-RMSNorm, SwiGLU, no biases, untied head, GQA."""
    kw.setdefault("norm_eps", 1e-5)
    return ModelConfig(family="llama", norm="rmsnorm", activation="swiglu", position="rope",
                       causal=True, bias=False, tie_embeddings=False, **kw)


def bert(**kw) -> ModelConfig:
    """BERT (Devlin et al. 2019): bidirectional, post-LayerNorm, exact GELU, token types, tied MLM head."""
    kw.setdefault("norm_eps", 1e-12)
    return ModelConfig(family="bert", norm="layernorm", norm_position="post", activation="gelu",
                       position="learned", causal=False, bias=True, tie_embeddings=True,
                       type_vocab_size=2, **kw)


PRESETS: dict[str, ModelConfig] = {
    # tiny: tests and CPU runs (vocab 0 = from the data)
    "gpt-tiny": gpt(d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128),
    "llama-tiny": llama(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=128),
    "bert-tiny": bert(d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128),
    "gpt-moe-tiny": gpt(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128,
                        n_experts=4, experts_per_token=1),  # Switch-style top-1
    "llama-moe-tiny": llama(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128,
                            n_experts=4, experts_per_token=2),  # Mixtral-style top-2
    "gpt-small": gpt(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256),
    "llama-small": llama(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=704, max_seq_len=256),
    "bert-small": bert(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256),
    # published shapes
    "gpt2": gpt(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "gpt2-medium": gpt(vocab_size=50257, max_seq_len=1024, d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    "gpt2-large": gpt(vocab_size=50257, max_seq_len=1024, d_model=1280, n_layers=36, n_heads=20, d_ff=5120),
    "gpt2-xl": gpt(vocab_size=50257, max_seq_len=1024, d_model=1600, n_layers=48, n_heads=25, d_ff=6400),
    "llama-7b": llama(vocab_size=32000, max_seq_len=4096, d_model=4096, n_layers=32, n_heads=32, d_ff=11008),
    "llama-13b": llama(vocab_size=32000, max_seq_len=4096, d_model=5120, n_layers=40, n_heads=40, d_ff=13824),
    "llama-70b": llama(vocab_size=32000, max_seq_len=4096, d_model=8192, n_layers=80, n_heads=64,
                       n_kv_heads=8, d_ff=28672),
    "mixtral-8x7b": llama(vocab_size=32000, max_seq_len=32768, d_model=4096, n_layers=32, n_heads=32,
                          n_kv_heads=8, d_ff=14336, rope_theta=1e6, n_experts=8, experts_per_token=2),
    "bert-base": bert(vocab_size=30522, max_seq_len=512, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    "bert-large": bert(vocab_size=30522, max_seq_len=512, d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model.preset ({name!r}) is not one of: {', '.join(PRESETS)}") from None


# --- counting -----------------------------------------------------------------------------------

def param_count(cfg: ModelConfig, *, vocab_size: int | None = None) -> dict[str, int]:
    """Parameters by kind, from the shapes alone (the planner uses this for models it never builds).

    Returns {"embedding", "blocks", "head", "total", "active"}; "head" is 0 when tied to the embedding;
    "active" is what one token uses: in a mixture-of-experts model, k of the n_experts experts.
    """
    v = vocab_size or cfg.vocab_size
    d, L = cfg.d_model, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0
    attn = d * d + 2 * d * kv + d * d + b * (d + 2 * kv + d)
    mlp = _mlp_params(cfg, cfg.d_ff)
    norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    n_moe = sum(is_moe_layer(cfg, i) for i in range(L))
    shared = _mlp_params(cfg, cfg.d_ff * cfg.moe_shared_experts) if cfg.moe_shared_experts else 0
    moe = d * cfg.n_experts + cfg.n_experts * mlp + shared  # router, experts, shared experts
    blocks = L * (attn + 2 * norm) + (L - n_moe) * mlp + n_moe * moe
    idle = n_moe * (cfg.n_experts - cfg.experts_per_token) * mlp if cfg.n_experts else 0
    emb = v * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0) + cfg.type_vocab_size * d
    if cfg.family == "bert":
        emb += norm  # embedding LayerNorm
    head = 0 if cfg.tie_embeddings else v * d
    final = norm if cfg.norm_position == "pre" else 0
    if cfg.family == "bert":  # MLM transform (dense + norm) and output bias
        final += d * d + d + norm + v
    total = emb + blocks + head + final
    return {"embedding": emb, "blocks": blocks, "head": head + final, "total": total, "active": total - idle}


def _mlp_params(cfg: ModelConfig, f: int) -> int:
    """Parameters of one feed-forward block of hidden size f."""
    n_ff_in = 2 if cfg.activation == "swiglu" else 1
    return n_ff_in * cfg.d_model * f + f * cfg.d_model + (n_ff_in * f + cfg.d_model if cfg.bias else 0)


def flops_per_token(cfg: ModelConfig, *, seq_len: int, vocab_size: int | None = None) -> float:
    """Training FLOPs per token: 6 per matmul weight (2 forward, 4 backward) plus attention.

    The matmul weights are the blocks' linear layers and the output projection (tied or not, it is a
    matmul); the attention scores and weighted sum add 12 * n_layers * d_model * seq_len per token
    (Kaplan et al. 2020; PaLM appendix B counts the same). The causal mask is not discounted, as PaLM does.
    A mixture-of-experts block counts its router and the k experts (plus shared ones) a token goes through.
    """
    v = vocab_size or cfg.vocab_size
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    n_ff_in = 2 if cfg.activation == "swiglu" else 1
    ff = (n_ff_in + 1) * d * f
    n_moe = sum(is_moe_layer(cfg, i) for i in range(L))
    moe_ff = d * cfg.n_experts + (cfg.experts_per_token + cfg.moe_shared_experts) * ff
    matmul = L * (2 * d * d + 2 * d * kv) + (L - n_moe) * ff + n_moe * moe_ff + v * d
    if cfg.family == "bert":
        matmul += d * d
    return 6.0 * matmul + 12.0 * L * d * seq_len
