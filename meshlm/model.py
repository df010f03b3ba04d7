"""One transformer for the GPT-2, Llama and BERT families.

Shapes in comments: B batch, T sequence, C d_model, H heads, K key/value heads, D head_dim, V vocab.

Two design decisions here serve the parallelisms that build on this file:

1. **Deterministic initialisation per parameter.** Every parameter is created by `new_param`, which
   records its full (unsharded) shape, its initialiser and, when a parallel layer holds only a slice,
   which slice (`Shard`). `init_weights` draws each parameter's *full* tensor from a generator seeded
   by (seed, parameter name) and keeps the slice this rank holds. So a shard is exactly the slice of
   what one process would build, whatever the layout, and the order in which modules are created
   does not matter (DESIGN principle 4). Drawing the full tensor of one parameter at a time bounds
   the extra memory to the largest single parameter.
2. **Global names.** Blocks live in a ModuleDict keyed by their global layer index, so a pipeline
   stage that holds layers 4..7 names them `layers.4 .. layers.7`, exactly as the whole model does:
   initial values and checkpoints line up across layouts with no renaming.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import CommMeter
from .config import ConfigError, ModelConfig, check_model, is_moe_layer
from .mesh import Mesh
from .parallel.context import CP
from .parallel.expert import EP, MoE
from .parallel.tensor import (TP, column_parallel, gather_from_tp, leave_row_region,
                              padded_vocab, reduce_from_tp,
                              reduce_scatter_to_sequence, vocab_parallel_embedding,
                              vocab_parallel_loss_sum)

# --- parameters that know how to initialise themselves -------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This rank holds part `index` of `parts` equal parts of the full tensor along `dim`, split over the
    mesh axis `axis` ('tp' for tensor-parallel layers, 'ep' for the experts of a mixture-of-experts block)."""

    dim: int
    index: int
    parts: int
    axis: str = "tp"


def new_param(*full_shape: int, init: str, std: float = 0.0, shard: Shard | None = None,
              init_shape: tuple[int, ...] | None = None, tp_partial: bool = False) -> nn.Parameter:
    """An uninitialised parameter of the local (possibly sharded) shape, tagged for `init_weights`.

    init is 'normal' (mean 0, `std`), 'zeros' or 'ones'. `init_shape` is the shape the single-process
    model has when the full shape is padded (a vocabulary rounded up to a multiple of tp): the values
    are drawn for init_shape and the padding is zeros. `tp_partial` marks a parameter replicated over
    the tp ranks whose gradient each rank only sees part of (norms under sequence parallelism), so the
    gradients are summed over tp after backward (`partial_grads` of the gradient sync).
    """
    shape = list(full_shape)
    if shard is not None:
        if shape[shard.dim] % shard.parts:
            raise ValueError(f"dim {shard.dim} of {full_shape} does not split into {shard.parts} parts")
        shape[shard.dim] //= shard.parts
    p = nn.Parameter(torch.empty(shape))
    p.meshlm_init = (init, std)
    p.meshlm_full_shape = tuple(full_shape)
    p.meshlm_init_shape = tuple(init_shape or full_shape)
    p.meshlm_shard = shard
    p.meshlm_tp_partial = tp_partial
    return p


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name) that is the same in every process and Python run."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def full_init(name: str, p: nn.Parameter, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `name`, as one process would draw it."""
    kind, std = p.meshlm_init
    shape = p.meshlm_init_shape
    if kind == "zeros":
        value = torch.zeros(shape)
    elif kind == "ones":
        value = torch.ones(shape)
    else:
        gen = torch.Generator().manual_seed(stable_seed(seed, name))
        value = torch.empty(shape).normal_(0.0, std, generator=gen)
    return pad_to(value, p.meshlm_full_shape)


def pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad t at the end of every dimension up to `shape` (a padded vocabulary)."""
    if tuple(t.shape) == tuple(shape):
        return t
    pad = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pad += [0, want - have]
    return F.pad(t, pad)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every tagged parameter: its full value from (seed, name), then this rank's slice."""
    for name, p in model.named_parameters():
        full = full_init(name, p, seed)
        s = p.meshlm_shard
        if s is not None:
            size = full.shape[s.dim] // s.parts
            full = full.narrow(s.dim, s.index * size, size)
        p.copy_(full.to(p.dtype))


# --- building blocks ----------------------------------------------------------------------------


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig, *, tp: TP):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        sp = tp.sequence_parallel  # each rank normalises its sequence shard: partial gradients
        self.weight = new_param(cfg.d_model, init="ones", tp_partial=sp)
        self.bias = None
        if cfg.norm == "layernorm" and cfg.bias:
            self.bias = new_param(cfg.d_model, init="zeros", tp_partial=sp)

    def forward(self, x):
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Linear(nn.Linear):
    """y = x W^T + b, whole, or split over the tp ranks (Shoeybi et al. 2019):

    split='column': W's output features are split, Y_i = X W_i^T + b_i (the caller enters the
    column-parallel region first: `column_parallel` does both). split='row': W's input features are split
    and the partial products are summed over the ranks (`leave_row_region`) before the replicated
    bias is added.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool, std: float, tp: TP | None = None,
                 split: str | None = None):
        nn.Module.__init__(self)  # an nn.Linear (PyTorch's TP plans accept only those) with our parameters
        self.in_features, self.out_features = d_in, d_out
        self.tp = tp or TP(None)
        self.split = split if self.tp.size > 1 else None
        shard_w = {"column": Shard(0, self.tp.rank, self.tp.size),
                   "row": Shard(1, self.tp.rank, self.tp.size)}.get(self.split)
        self.weight = new_param(d_out, d_in, init="normal", std=std, shard=shard_w)
        self.bias = None
        if bias:
            column = self.split == "column"
            self.bias = new_param(d_out, init="zeros", shard=Shard(0, self.tp.rank, self.tp.size) if column else None,
                                  tp_partial=self.split == "row" and self.tp.sequence_parallel)

    def forward(self, x):
        if self.split == "row":
            y = leave_row_region(F.linear(x, self.weight), self.tp)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_len, head_dim), in the 'rotate half' layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by the angles of their positions (Su et al. 2021)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal or bidirectional attention; under tp each rank holds n_heads/tp query heads.

    Key/value heads are split too when tp divides them; otherwise (tp a multiple of n_kv_heads) every
    rank holds all of wk, wv and uses the one kv head its query heads share, and their gradients
    are summed over tp.
    """

    def __init__(self, cfg: ModelConfig, *, out_std: float, tp: TP, cp: CP | None = None):
        super().__init__()
        self.tp, self.cp = tp, cp or CP(None, causal=cfg.causal)
        self.head_dim = cfg.head_dim
        self.n_heads = cfg.n_heads // tp.size  # local query heads
        self.kv_split = cfg.kv_heads % tp.size == 0
        self.n_kv = cfg.kv_heads // tp.size if self.kv_split else 1
        self.kv_index = (tp.rank * self.n_heads) // (cfg.n_heads // cfg.kv_heads)  # when kv is replicated
        self.causal, self.dropout = cfg.causal, cfg.dropout
        C, kvC = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.wq = Linear(C, C, bias=cfg.bias, std=cfg.init_std, tp=tp, split="column")
        kv_split = "column" if self.kv_split else None
        self.wk = Linear(C, kvC, bias=cfg.bias, std=cfg.init_std, tp=tp, split=kv_split)
        self.wv = Linear(C, kvC, bias=cfg.bias, std=cfg.init_std, tp=tp, split=kv_split)
        if not self.kv_split and tp.size > 1:
            for p in (*self.wk.parameters(), *self.wv.parameters()):
                p.meshlm_tp_partial = True
        self.wo = Linear(C, C, bias=cfg.bias, std=out_std, tp=tp, split="row")

    def forward(self, x, rope=None, attn_mask=None, cache=None):
        """cache: this layer's key/value cache during generation (infer/engine.py): the new keys and values
        are appended and attention sees every cached position (attn_mask says which)."""
        q, k, v = column_parallel(x, [self.wq, self.wk, self.wv], self.tp)  # whole sequence, local heads
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if not self.kv_split and self.tp.size > 1:  # this rank's query heads share one kv head
            k, v = k[:, self.kv_index:self.kv_index + 1], v[:, self.kv_index:self.kv_index + 1]
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, K, cached + T, D): under tp this rank's heads only
        y = self.core(q, k, v, attn_mask)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # row-parallel: summed over tp

    def core(self, q, k, v, attn_mask=None):
        """softmax(q k^T / sqrt(D)) v: the part selective recomputation recomputes (its a*s*s activations).
        Under context parallelism q, k, v hold this rank's part of the sequence: ring attention.

        Training passes no mask: causal attention is `is_causal=True` (BERT's is unmasked), which the
        flash kernel applies itself (Dao 2023, FlashAttention-2), so on a GPU in bf16/fp16 with
        head_dim <= 256 SDPA picks it and never stores the (T, T) scores. A materialised mask tensor
        would push SDPA to the memory-efficient or math kernel; only generation with a cache passes one."""
        if self.cp.size > 1:
            return self.cp.attention(q, k, v, dropout=self.dropout if self.training else 0.0, attn_mask=attn_mask)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_heads,
        )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, *, out_std: float, tp: TP):
        super().__init__()
        self.tp, self.activation = tp, cfg.activation
        self.w1 = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias, std=cfg.init_std, tp=tp, split="column")  # up
        if cfg.activation == "swiglu":
            self.w3 = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias, std=cfg.init_std, tp=tp, split="column")  # gate
        self.w2 = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias, std=out_std, tp=tp, split="row")  # down

    def forward(self, x):
        if self.activation == "swiglu":
            up, gate = column_parallel(x, [self.w1, self.w3], self.tp)
            return self.w2(F.silu(gate) * up)
        (up,) = column_parallel(x, [self.w1], self.tp)
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.w2(F.gelu(up, approximate=approximate))


class Block(nn.Module):
    """Attention and a feed-forward block, each with a residual; the feed-forward block is a
    mixture of experts (parallel/expert.py) in the blocks `is_moe_layer` picks."""

    def __init__(self, cfg: ModelConfig, *, tp: TP, index: int = 0, ep: EP | None = None, cp: CP | None = None):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual projections scaled down
        self.pre_norm, self.dropout = cfg.norm_position == "pre", cfg.dropout
        self.norm1, self.attn = Norm(cfg, tp=tp), Attention(cfg, out_std=out_std, tp=tp, cp=cp)
        self.norm2 = Norm(cfg, tp=tp)
        if is_moe_layer(cfg, index):
            shared = None
            if cfg.moe_shared_experts:
                shared = MLP(cfg.replace(d_ff=cfg.d_ff * cfg.moe_shared_experts), out_std=out_std, tp=tp)
            self.mlp = MoE(cfg, out_std=out_std, tp=tp, ep=ep or EP(None), cp=cp, shared=shared)
        else:
            self.mlp = MLP(cfg, out_std=out_std, tp=tp)

    def forward(self, x, rope=None, attn_mask=None, cache=None):
        drop = lambda y: F.dropout(y, self.dropout, self.training)  # noqa: E731
        if self.pre_norm:
            x = x + drop(self.attn(self.norm1(x), rope, attn_mask, cache))
            return x + drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + drop(self.attn(x, rope, attn_mask, cache)))
        return self.norm2(x + drop(self.mlp(x)))


# --- the model ----------------------------------------------------------------------------------


class _Weight:
    """A bare weight in the shape column_parallel takes (.weight, .bias, callable)."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.bias = weight, None

    def __call__(self, x):
        return F.linear(x, self.weight)


class Transformer(nn.Module):
    """Embedding -> blocks -> head, or the part of it that one pipeline stage holds.

    `layers` selects the global block indices this module builds (default: all); `pre` and `post`
    say whether it holds the embedding and the head. A module without `pre` takes hidden states
    (B, T, C) instead of tokens; one without `post` returns hidden states instead of logits.

    Under tensor parallelism (the mesh's tp axis) every matrix is split as parallel/tensor.py
    describes, the vocabulary is split over the ranks (padded to a multiple of tp), and the model
    returns this rank's slice of the logits (B, T, V_padded / tp); `loss_sum` takes them as they are
    and `full_logits` gathers them. Under sequence parallelism the hidden states between blocks are
    (B, T / tp, C).
    """

    def __init__(self, cfg: ModelConfig, *, mesh: Mesh | None = None, layers: range | None = None,
                 pre: bool = True, post: bool = True, meter: CommMeter | None = None):
        super().__init__()
        check_model(cfg)
        if cfg.vocab_size < 1:
            raise ConfigError("model.vocab_size (0) must be set before the model is built (0 means: from the data)")
        self.cfg, self.mesh = cfg, mesh or Mesh.single()
        m = self.mesh
        self.tp = tp = TP(m.group("tp"), sequence_parallel=m.layout.sequence_parallel, meter=meter,
                          size=m.size("tp"), rank=m.coords["tp"])
        self.pre, self.post = pre, post
        C, V = cfg.d_model, cfg.vocab_size
        Vp = padded_vocab(V, tp.size)
        vocab_shard = Shard(0, tp.rank, tp.size) if tp.size > 1 else None
        sp = tp.sequence_parallel
        if pre or (post and cfg.tie_embeddings):
            self.tok_emb = new_param(Vp, C, init="normal", std=cfg.init_std, shard=vocab_shard, init_shape=(V, C))
        if pre:
            if cfg.position == "learned":
                self.pos_emb = new_param(cfg.max_seq_len, C, init="normal", std=cfg.init_std, tp_partial=sp)
            if cfg.type_vocab_size:
                self.type_emb = new_param(cfg.type_vocab_size, C, init="normal", std=cfg.init_std, tp_partial=sp)
            if cfg.norm_position == "post":
                self.emb_norm = Norm(cfg, tp=tp)  # BERT normalises the summed embeddings
        layer_ids = range(cfg.n_layers) if layers is None else layers
        ep = EP(m.group("ep"), meter=meter, size=m.size("ep"), rank=m.coords["ep"])
        self.cp = cp = CP(m.group("cp"), causal=cfg.causal, meter=meter, size=m.size("cp"), rank=m.coords["cp"])
        self.layers = nn.ModuleDict({str(i): Block(cfg, tp=tp, index=i, ep=ep, cp=cp) for i in layer_ids})
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if post:
            if cfg.norm_position == "pre":
                self.norm_f = Norm(cfg, tp=tp)
            if cfg.family == "bert":  # MLM transform: dense, GELU, norm; then the tied decoder with a bias
                self.mlm_dense = Linear(C, C, bias=True, std=cfg.init_std)  # replicated over tp
                if sp:
                    for p in self.mlm_dense.parameters():
                        p.meshlm_tp_partial = True
                self.mlm_norm = Norm(cfg, tp=tp)
                self.mlm_bias = new_param(Vp, init="zeros", shard=vocab_shard, init_shape=(V,))
            if not cfg.tie_embeddings:
                self.head = new_param(Vp, C, init="normal", std=cfg.init_std, shard=vocab_shard, init_shape=(V, C))

    def forward(self, x: torch.Tensor, *, token_types: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """x: tokens (B, T) if this module holds the embedding, else hidden states (B, T, C).

        Under context parallelism x is this rank's part of each sequence (`CP.split`: two mirrored
        chunks for causal models) and attention runs as ring attention over the cp ranks.
        positions: (T,) or (B, T) absolute positions (default 0..T-1, or the global positions of this
        rank's part under cp; generation with a cache passes its offsets). attn_mask: optional boolean
        (B, 1, T, S), True where attention is allowed. cache: a key/value cache (infer/engine.py) that
        each block appends this call's keys and values to (S = cached + T positions).
        Returns logits (B, T, V / tp) if this module holds the head, else hidden states.
        """
        cfg, tp = self.cfg, self.tp
        sp = tp.sequence_parallel
        T = x.shape[1] * (tp.size if sp and not self.pre else 1)  # this rank's tokens (its cp part)
        if positions is None:  # under context parallelism: the global positions of this rank's part
            positions = self.cp.positions(T, device=x.device) if self.cp.size > 1 else torch.arange(T, device=x.device)
        if self.pre:
            if cfg.position == "learned" and T * self.cp.size > cfg.max_seq_len:
                raise ValueError(f"sequence length {T * self.cp.size} exceeds model.max_seq_len ({cfg.max_seq_len})")
            h = vocab_parallel_embedding(x, self.tok_emb, tp) if tp.size > 1 else F.embedding(x, self.tok_emb)
            # the rows live on different ranks: sum them (reduce-scattered along the sequence under SP)
            h = reduce_scatter_to_sequence(h, tp) if sp else reduce_from_tp(h, tp)  # (B, T or T/tp, C)
            local = positions.chunk(tp.size, dim=-1)[tp.rank] if sp else positions
            if cfg.position == "learned":
                h = h + F.embedding(local, self.pos_emb)
            if cfg.type_vocab_size:
                types = token_types if token_types is not None else torch.zeros_like(x)
                h = h + F.embedding(types.chunk(tp.size, dim=1)[tp.rank] if sp else types, self.type_emb)
            if cfg.norm_position == "post":
                h = self.emb_norm(h)
            x = F.dropout(h, cfg.dropout, self.training)
        rope = None
        if cfg.position == "rope":  # attention runs on the whole (gathered) sequence
            rope = (self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3))  # (.., 1, T, D)
        for index, block in self.layers.items():
            x = block(x, rope, attn_mask, cache.layer(int(index)) if cache is not None else None)
        if not self.post:
            return x
        if cfg.norm_position == "pre":
            x = self.norm_f(x)
        if cfg.family == "bert":
            x = self.mlm_norm(F.gelu(self.mlm_dense(x)))
        head = _Weight(self.tok_emb if cfg.tie_embeddings else self.head)
        (logits,) = column_parallel(x, [head], tp)  # (B, T, V / tp): column-parallel over the vocabulary
        return logits + self.mlm_bias if cfg.family == "bert" else logits

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and target count; vocabulary-parallel (never gathering logits) under tp."""
        if self.tp.size > 1:
            return vocab_parallel_loss_sum(logits, targets, self.tp, vocab_size=self.cfg.vocab_size)
        return loss_sum(logits, targets)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole (B, T, V) logits from this rank's vocabulary slice (all-gather under tp)."""
        return gather_from_tp(logits, self.tp)[..., :self.cfg.vocab_size]


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over positions whose target is not -100, and how many there were.

    The trainer divides by the count over the whole global batch, so that every layout (any split of
    the batch over ranks and micro-batches) computes the same mean loss and the same gradients.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def build_model(cfg: ModelConfig, *, mesh: Mesh | None = None, seed: int = 0,
                device: torch.device | str = "cpu", meter: CommMeter | None = None) -> Transformer:
    """This rank's part of the model, initialised deterministically from `seed`."""
    model = Transformer(cfg, mesh=mesh, meter=meter)
    init_weights(model, seed)
    return model.to(device)
