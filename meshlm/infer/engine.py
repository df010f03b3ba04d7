"""Generation with a key/value cache, in one process or under tensor and pipeline parallelism.

Decoding token t+1 needs the keys and values of tokens 0..t at every layer. Recomputing them costs a
forward over the whole sequence per new token (O(T^2) work per token); keeping them costs memory,
2 * layers * kv_heads * head_dim * T values per sequence, and makes each step a forward of one token.

    prefill   the (left-padded) prompts go through the model once; every layer's k, v are cached
    decode    one token per sequence per step: its q against the cached k, v (which it appends to)

Batches of prompts of different lengths are left-padded: row b's real tokens end at the last column,
positions count real tokens only (so a padded row computes exactly what it would alone), and the
attention mask lets a query see the real keys at or before it (pad queries see themselves, so no
softmax row is empty).

Under tensor parallelism each rank holds its heads' projections, so its cache holds those heads
only (a 1/tp share); the logits are gathered over the vocabulary before sampling, and every tp rank
draws the same token from the same generator. Under pipeline parallelism each stage holds its
layers' cache; at every step the hidden states pass down the stages (point-to-point), the last stage
samples, and the new tokens are broadcast to every stage. Sequence parallelism is a training
memory optimisation and is off here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..layout import Layout
from ..mesh import Mesh
from ..model import Transformer, init_weights
from ..parallel.pipeline import stage_ranges

# --- the cache ------------------------------------------------------------------------------------


class LayerCache:
    """One layer's keys and values, (B, K_local, max_len, D), filled up to the owner's length."""

    def __init__(self, owner: "KVCache"):
        self.owner = owner
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, K, T, D = k.shape
        if self.k is None:
            self.k = k.new_empty(B, K, self.owner.max_len, D)
            self.v = v.new_empty(B, K, self.owner.max_len, D)
        start = self.owner.length
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]


class KVCache:
    """Every layer's cache; `length` positions are filled (the model's forward appends, `advance` counts)."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.layers: dict[int, LayerCache] = {}

    def layer(self, index: int) -> LayerCache:
        return self.layers.setdefault(index, LayerCache(self))

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers.values() if c.k is not None)


# --- sampling -------------------------------------------------------------------------------------


def sample(logits: torch.Tensor, generators: list[torch.Generator], *, temperature: float, top_k: int,
           top_p: float) -> torch.Tensor:
    """One token per row of (B, V) logits: greedy at temperature 0, else temperature, top-k, top-p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)])


# --- the engine -----------------------------------------------------------------------------------


class Engine:
    """This rank's part of a decoder model, loaded from a checkpoint, and batched generation."""

    def __init__(self, cfg, *, mesh: Mesh, device: torch.device | str = "cpu", seed: int | None = 0):
        """seed: initialise the weights as training would (any layout gives the same model); None: leave them
        for a checkpoint to fill."""
        if cfg.family == "bert":
            raise ValueError("generation needs a decoder (gpt or llama); this is a bert model (see fill_mask)")
        self.cfg, self.mesh, self.device = cfg, mesh, torch.device(device)
        layout = mesh.layout
        pp = layout.pp
        ranges = stage_ranges(cfg, layout.replace(vpp=1)) if pp > 1 else [range(cfg.n_layers)]
        stage = mesh.coords["pp"]
        self.first, self.last = stage == 0, stage == pp - 1
        self.model = Transformer(cfg, mesh=mesh, layers=ranges[stage], pre=self.first, post=self.last)
        if seed is not None:
            init_weights(self.model, seed)
        self.model.to(device).eval()
        self.last_stats: dict[str, float] = {}
        """Timings of the last generate: ttft_s (prefill and first token), tokens, seconds, tokens_per_s,
        per_token_ms (mean latency of a decode step)."""
        self.pp_group = mesh.group("pp")
        self.tokenizer = None
        self.eot_id: int | None = None

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, *, layout: Layout | None = None, device="cpu") -> "Engine":
        """Build this rank's part under `layout` (tp, pp; a process group must exist when it has several
        ranks) and read its slices of a checkpoint written under any layout."""
        from tokenizers import Tokenizer

        from ..settings import RunConfig
        from ..train import checkpoint

        folder = checkpoint.resolve(ckpt)
        reader = checkpoint.Reader(folder)
        cfg = RunConfig.from_dict(reader.manifest["config"]).model
        layout = (layout or Layout()).replace(sequence_parallel=False)
        mesh = Mesh.build(layout) if layout.world_size > 1 else Mesh.single()
        engine = cls(cfg, mesh=mesh, device=device, seed=None)
        with torch.no_grad():
            for n, p in engine.model.named_parameters():
                key = f"p/{n}"
                if not reader.has(key):
                    raise checkpoint.CheckpointError(f"checkpoint {folder}: no tensor for parameter {n}")
                p.copy_(checkpoint.read_local(reader, key, p, p.meshlm_init_shape))
        if (folder / "tokenizer.json").is_file():
            engine.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            engine.eot_id = engine.tokenizer.token_to_id("<|endoftext|>")
        return engine

    # one forward of the whole model, through the stages ------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: KVCache | None) -> torch.Tensor | None:
        """Logits of the last column (B, V) on the last stage (None elsewhere)."""
        B, T = tokens.shape
        if self.first:
            x = tokens
        else:
            x = torch.empty(B, T, self.cfg.d_model, device=self.device)
            dist.recv(x, self._pp_peer(-1), group=self.pp_group)
        out = self.model(x, positions=positions, attn_mask=mask, cache=cache)
        if not self.last:
            dist.send(out.contiguous(), self._pp_peer(+1), group=self.pp_group)
            return None
        return self.model.full_logits(out[:, -1:])[:, 0].float()  # gathered over the vocabulary shards

    def _pp_peer(self, step: int) -> int:
        return dist.get_global_rank(self.pp_group, self.mesh.coords["pp"] + step)

    def _share_tokens(self, nxt: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The last stage's sampled tokens, on every stage."""
        if self.pp_group is None:
            return nxt
        buf = nxt if nxt is not None else torch.empty(batch, dtype=torch.long, device=self.device)
        dist.broadcast(buf, self._pp_peer(self.mesh.layout.pp - 1 - self.mesh.coords["pp"]), group=self.pp_group)
        return buf

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: set[int] | None = None,
                 use_cache: bool = True) -> list[list[int]]:
        """The new tokens of every prompt (ending with a stop token when one is drawn). Collective under tp/pp:
        every rank calls it with the same arguments. Row i samples from a generator seeded with seed + i."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must have at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"max_seq_len ({self.max_seq_len})")
        B, dev = len(prompts), self.device
        tokens = torch.zeros(B, longest, dtype=torch.long, device=dev)
        valid = torch.zeros(B, longest + max_new_tokens, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):  # left padding
            tokens[b, longest - len(p):] = torch.tensor(p, device=dev)
            valid[b, longest - len(p):longest] = True
        gens = [torch.Generator(device=dev).manual_seed(seed + b) for b in range(B)]
        stop = stop or set()
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        cache = KVCache(longest + max_new_tokens) if use_cache else None
        seq = tokens
        start = time.perf_counter()
        ttft = None
        for step in range(max_new_tokens):
            length = seq.shape[1]
            if cache is None or step == 0:  # the whole sequence (prefill, or no cache: every step)
                q_cols = torch.arange(length, device=dev)
                x = seq
            else:
                q_cols = torch.tensor([length - 1], device=dev)
                x = seq[:, -1:]
            k_cols = torch.arange(length, device=dev)
            live = valid[:, :length]
            positions = (live.long().cumsum(-1) - 1).clamp(min=0)[:, q_cols]  # real tokens before, per row
            mask = live[:, None, :] & (k_cols[None, :] <= q_cols[:, None])[None]  # (B, Tq, Tk)
            mask = mask | (k_cols[None, :] == q_cols[:, None])[None]  # a pad query sees itself
            logits = self._forward(x, positions, mask[:, None], cache)
            if cache is not None:
                cache.advance(x.shape[1])
            nxt = sample(logits, gens, temperature=temperature, top_k=top_k, top_p=top_p) if self.last else None
            nxt = self._share_tokens(nxt, B)
            if ttft is None:
                ttft = time.perf_counter() - start
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
                    done[b] = int(nxt[b]) in stop
            if bool(done.all()):
                break
            valid[:, length] = True
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        seconds = time.perf_counter() - start
        n = sum(len(o) for o in out)
        steps = max(len(o) for o in out)
        self.last_stats = {"ttft_s": ttft, "tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
                           "per_token_ms": 1e3 * (seconds - ttft) / max(1, steps - 1)}
        return out


@torch.no_grad()
def fill_mask(model: Transformer, tokens: list[int], *, mask_id: int, top_k: int = 5) -> list[list[tuple[int, float]]]:
    """BERT: for every [MASK] in `tokens`, the top-k (token, probability) candidates."""
    if mask_id not in tokens:
        raise ValueError("the text has no [MASK] token to fill")
    model.eval()
    x = torch.tensor([tokens])
    logits = model.full_logits(model(x, token_types=torch.zeros_like(x)))[0].float()
    out = []
    for i, t in enumerate(tokens):
        if t == mask_id:
            p = logits[i].softmax(-1)
            top = p.topk(top_k)
            out.append([(int(j), float(v)) for v, j in zip(top.values, top.indices)])
    return out
