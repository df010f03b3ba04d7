"""`meshlm bench --gpu-baseline`: meshlm against a plain single-file PyTorch training loop, on one device.

The plain loop (the first half of this file, which imports nothing but torch) is what a careful engineer
writes for one GPU without a framework, in the style of nanoGPT's `model.py` and `train.py` (Karpathy
2022): a GPT-2 module with q, k and v in one matmul, `scaled_dot_product_attention(is_causal=True)`
(the flash kernel on a GPU), fused AdamW, `torch.compile` of the whole model, bf16 autocast over fp32
weights, batches copied from pinned memory, and no host synchronisation inside a step. It is the bar:
meshlm carries layouts, gradient hooks, meters and checkpoints, and on one GPU all of that must cost
nothing.

The runner (the second half) trains the same model with both, one after the other in this process:
the same config, the same initial weights (copied from meshlm's model into the plain one), the same
batches (the same seed), the same AdamW, schedule and clipping. Each reports tokens/s, MFU, peak memory
and its losses; since the mathematics is the same the two loss curves agree (to rounding), which shows
that both loops do the same work.

    MFU = tokens/s * FLOPs per token / peak FLOP/s
    FLOPs per token = 6 N + 12 L d s            (meshlm.config.flops_per_token)

N counts the matmul weights (the blocks' linear layers and the output projection): 2 FLOPs per weight
per token forward and 4 backward; 12 L d s is the attention scores and their weighted sum over s
positions in L layers of width d (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B), the
causal mask not discounted. Peak: the datasheet's dense figure for the dtype (H100 SXM bf16: 989
TFLOP/s, meshlm.hardware); on a CPU, the best measured matmul.

Defaults: on CUDA a GPT of 1.3B parameters (24 layers, d_model 2048, 16 heads, d_ff 8192, vocabulary
50304, sequence 2048) in bf16 with batches of 8 sequences; on a CPU a tiny GPT in fp32 that runs in
seconds, to check the comparison itself (the GPU figures stay open there).
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# === the plain loop ==============================================================================


@dataclass
class GPTConfig:
    block_size: int = 2048
    vocab_size: int = 50304  # GPT-2's 50257 rounded up to a multiple of 64: faster matmuls
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 2048
    n_ff: int = 8192  # 4 * n_embd
    eps: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        # no mask tensor, is_causal: the flash kernel applies the mask itself and never stores the scores
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_ff)
        self.c_proj = nn.Linear(cfg.n_ff, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (Press & Wolf 2017)
        for name, p in self.named_parameters():  # GPT-2's initialisation; residual projections scaled down
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.startswith("ln") or ".ln_" in name:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        B, T = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def train_plain(model: GPT, get_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *, steps: int,
                warmup: int, lr_at: Callable[[int], float], device: torch.device, dtype: torch.dtype | None,
                weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), grad_clip: float = 1.0,
                compile: bool = False) -> dict:
    """`warmup` untimed steps (compilation happens there), then `steps` timed ones. get_batch(step) gives
    the host tensors (x, y) of a step. Returns the losses of every step, the timed seconds and the peak
    memory."""
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=lr_at(0), betas=betas, **({"fused": True} if cuda else {}))
    step_fn = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    losses = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for it in range(warmup + steps):
        if it == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        x, y = get_batch(it)
        if cuda:  # page-locked memory: the copy does not block the host
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        model.train()
        with autocast:
            loss = step_fn(x, y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read after the loop: .item() here would wait for the GPU every step
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"losses": torch.stack(losses).tolist(), "seconds": seconds,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


# === the comparison ==============================================================================

USAGE = """usage: meshlm bench --gpu-baseline [--steps N] [--warmup W] [--batch-size B] [--seq-len S]
                    [--precision bf16|fp32] [--compile auto|true|false] [--device auto|cuda|cpu]
                    [--data DIR] [--out DIR] [--model.FIELD VALUE ...]

Train one GPT with meshlm's Trainer and with a plain single-file PyTorch loop (nanoGPT style: SDPA,
fused AdamW, torch.compile), from the same weights on the same batches, one after the other on one
device, and report tokens/s, MFU and peak memory of both.

  --steps N          timed steps of each (default 20 on CUDA, 4 on CPU)
  --warmup W         untimed steps before them, where compilation happens (default 5 on CUDA, 1 on CPU)
  --batch-size B     sequences per step (default 8 on CUDA, 4 on CPU)
  --seq-len S        tokens per sequence (default 2048 on CUDA, 64 on CPU)
  --precision P      bf16 (default on CUDA) or fp32 (default on CPU)
  --compile C        torch.compile: meshlm's blocks, the plain loop's whole model (default auto: on CUDA)
  --device D         auto (CUDA when there is one), cuda or cpu
  --data DIR         a prepared dataset (default: the Python standard library corpus)
  --out DIR          also write gpu_baseline.json there
  --model.FIELD V    change the compared model (default on CUDA: 24 layers, d_model 2048, 16 heads,
                     d_ff 8192, vocab 50304, about 1.3B parameters; on CPU: gpt-tiny)
"""

CUDA_MODEL = {"model.n_layers": "24", "model.d_model": "2048", "model.n_heads": "16", "model.d_ff": "8192",
              "model.vocab_size": "50304", "model.max_seq_len": "2048"}
"""The GPU default: about 1.3B parameters (GPT-3 XL's shape, Brown et al. 2020, with GPT-2's vocabulary)."""

_VALUE_FLAGS = ("--steps", "--warmup", "--batch-size", "--seq-len", "--precision", "--compile", "--device",
                "--data", "--out")


@dataclass(frozen=True, kw_only=True)
class BaselineArgs:
    steps: int
    warmup: int
    batch_size: int
    seq_len: int
    precision: str
    compile: str
    device: torch.device
    data: str
    out: Path | None
    model: dict[str, str]
    """model.* settings for the compared model."""


def parse_args(argv: list[str]) -> BaselineArgs:
    """Flags after --gpu-baseline; a bad one is a ConfigError naming it (one line, exit 2 from the CLI)."""
    from ..config import ConfigError

    flags: dict[str, str] = {}
    model: dict[str, str] = {}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--gpu-baseline":
            i += 1
            continue
        is_model = name.startswith("--model.") and len(name) > len("--model.")
        if name not in _VALUE_FLAGS and not is_model:
            raise ConfigError(f"meshlm bench --gpu-baseline: unknown flag {argv[i]!r}; see --gpu-baseline --help")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            value = argv[i + 1]
            i += 1
        (model if is_model else flags)[name[2:] if is_model else name] = value
        i += 1

    def integer(flag: str, default: int) -> int:
        text = flags.get(flag)
        if text is None:
            return default
        try:
            n = int(text)
        except ValueError:
            raise ConfigError(f"{flag} ({text!r}) must be an integer") from None
        if n < (0 if flag == "--warmup" else 1):
            raise ConfigError(f"{flag} ({n}) must be >= {0 if flag == '--warmup' else 1}")
        return n

    def choice(flag: str, options: tuple[str, ...], default: str) -> str:
        value = flags.get(flag, default)
        if value not in options:
            raise ConfigError(f"{flag} ({value!r}) must be one of: {', '.join(options)}")
        return value

    kind = choice("--device", ("auto", "cuda", "cpu"), "auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device ('cuda') but no CUDA device is available")
    cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    out = flags.get("--out")
    return BaselineArgs(steps=integer("--steps", 20 if cuda else 4), warmup=integer("--warmup", 5 if cuda else 1),
                        batch_size=integer("--batch-size", 8 if cuda else 4),
                        seq_len=integer("--seq-len", 2048 if cuda else 64),
                        precision=choice("--precision", ("bf16", "fp32"), "bf16" if cuda else "fp32"),
                        compile=choice("--compile", ("auto", "true", "false"), "auto"),
                        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
                        data=flags.get("--data", ""), out=Path(out) if out else None, model=model)


def run_config(args: BaselineArgs, dataset):
    """meshlm's RunConfig of the comparison (one process, one device); ConfigError for a model the plain
    loop does not implement."""
    from ..config import ConfigError
    from ..settings import build_config
    from ..train.trainer import resolve_vocab

    cuda = args.device.type == "cuda"
    overrides = {"model.preset": "gpt-tiny", **(CUDA_MODEL if cuda else {}), **args.model,
                 "data.path": str(dataset.path), "train.batch_size": str(args.batch_size),
                 "train.seq_len": str(args.seq_len), "train.steps": str(args.warmup + args.steps),
                 "train.warmup_steps": str(max(1, (args.warmup + args.steps) // 4)),
                 "train.lr": "2e-4" if cuda else "2e-3", "train.precision": args.precision,
                 "train.compile": args.compile, "train.device": args.device.type, "train.eval_every": "0",
                 "train.progress": "false", "train.tensorboard": "false", "train.flight_recorder": "false"}
    if not cuda and "model.max_seq_len" not in args.model:
        overrides["model.max_seq_len"] = str(max(args.seq_len, 128))
    cfg = resolve_vocab(build_config(overrides=overrides), dataset)
    m = cfg.model
    wanted = {"family": "gpt", "norm": "layernorm", "norm_position": "pre", "activation": "gelu_tanh",
              "position": "learned", "causal": True, "bias": True, "tie_embeddings": True, "dropout": 0.0,
              "n_experts": 0}
    for name, value in wanted.items():
        if getattr(m, name) != value:
            raise ConfigError(f"model.{name} ({getattr(m, name)!r}) must be {value!r}: the plain loop is a GPT-2 "
                              "model (pre-LayerNorm, tanh GELU, learned positions, biases, tied head, no dropout)")
    if m.kv_heads != m.n_heads:
        raise ConfigError(f"model.n_kv_heads ({m.n_kv_heads}) must be 0 or n_heads ({m.n_heads}) for the plain loop")
    return cfg


def plain_config(m) -> GPTConfig:
    return GPTConfig(block_size=m.max_seq_len, vocab_size=m.vocab_size, n_layer=m.n_layers, n_head=m.n_heads,
                     n_embd=m.d_model, n_ff=m.d_ff, eps=m.norm_eps)


@torch.no_grad()
def load_meshlm_weights(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Copy meshlm's GPT parameters (by meshlm's names) into the plain model; q, k, v are concatenated."""
    own = dict(model.named_parameters())
    own["wte.weight"].copy_(state["tok_emb"])
    own["wpe.weight"].copy_(state["pos_emb"])
    for i in range(model.cfg.n_layer):
        src, dst = f"layers.{i}.", f"h.{i}."
        for kind in ("weight", "bias"):
            own[dst + f"attn.c_attn.{kind}"].copy_(torch.cat([state[src + f"attn.w{c}.{kind}"] for c in "qkv"]))
            for a, b in (("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.c_proj", "attn.wo"), ("mlp.c_fc", "mlp.w1"),
                         ("mlp.c_proj", "mlp.w2")):
                own[dst + f"{a}.{kind}"].copy_(state[src + f"{b}.{kind}"])
    own["ln_f.weight"].copy_(state["norm_f.weight"])
    own["ln_f.bias"].copy_(state["norm_f.bias"])


def flash_attention_ok(device: torch.device, m, seq_len: int, dtype: torch.dtype | None) -> bool | None:
    """Whether SDPA's flash kernel takes the model's causal attention call (both loops make that call);
    None off CUDA, where the question does not arise."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, m.n_heads, seq_len, m.head_dim, device=device, dtype=dtype or torch.float32)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only flash: raises where it cannot run
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except RuntimeError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_meshlm(cfg, dataset, args: BaselineArgs) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train with meshlm's Trainer (one process, no process group); also return its initial weights."""
    from ..layout import Layout
    from ..mesh import Mesh
    from ..train.trainer import Trainer

    device = args.device
    trainer = Trainer(cfg, mesh=Mesh.build(Layout()), device=device, dataset=dataset)
    initial = {n: p.detach().to("cpu", copy=True) for n, p in trainer.model.named_parameters()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    start = time.perf_counter()
    for it in range(args.warmup + args.steps):
        if it == args.warmup:
            _sync(device)
            start = time.perf_counter()
        losses.append(trainer.step().loss_tensor)  # not read until the end: no synchronisation per step
    _sync(device)
    seconds = time.perf_counter() - start
    result = {"losses": torch.stack(losses).tolist(), "seconds": seconds, "compiled_blocks": trainer.compiled,
              "fused_adamw": bool(trainer.optimizer.defaults.get("fused")),
              "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    del trainer
    torch._dynamo.reset()  # compiled code can hold on to the modules, and so to their GPU memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, initial


def run_plain(cfg, dataset, args: BaselineArgs, initial: dict[str, torch.Tensor]) -> dict:
    """Train the plain loop from meshlm's initial weights on the same batches, schedule and optimizer."""
    from ..data import lm_batch
    from ..train.compiled import wants_compile
    from ..train.precision import autocast_dtype
    from ..train.trainer import lr_at

    t = cfg.train
    model = GPT(plain_config(cfg.model))
    load_meshlm_weights(model, initial)

    def get_batch(step: int):
        return lm_batch(dataset.train, step=step, seq_len=t.seq_len, global_batch=t.batch_size, data_rank=0,
                        data_world=1, seed=t.seed)

    compile_ = wants_compile(t.compile, device_type=args.device.type, model=cfg.model, layout=cfg.layout)
    result = train_plain(model, get_batch, steps=args.steps, warmup=args.warmup, device=args.device,
                         lr_at=lambda s: lr_at(s, lr=t.lr, warmup=t.warmup_steps, total=t.steps,
                                               min_ratio=t.min_lr_ratio),
                         dtype=autocast_dtype(t.precision), weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                         grad_clip=t.grad_clip, compile=compile_)
    result["compiled"] = compile_
    del model
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def compare(args: BaselineArgs) -> dict:
    """Both runs and their figures (the dict written to gpu_baseline.json)."""
    from .. import data as data_mod
    from ..config import flops_per_token, param_count
    from ..hardware import peak_flops
    from ..train.metrics import fmt_count
    from ..train.precision import autocast_dtype

    path = args.data or str(data_mod.ensure_default_dataset(progress=False))
    dataset = data_mod.TokenDataset.open(path)
    cfg = run_config(args, dataset)
    tokens_per_step = args.batch_size * args.seq_len
    flops_tok = flops_per_token(cfg.model, seq_len=args.seq_len)
    peak = peak_flops(args.device, args.precision)
    m = cfg.model
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"meshlm bench --gpu-baseline: GPT of {fmt_count(param_count(m)['total'])} parameters ({m.n_layers} layers, "
          f"d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff}, vocab {m.vocab_size}), batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.precision}, on {device_name}; {args.warmup} warm-up + {args.steps} timed "
          "steps each", flush=True)
    flash = flash_attention_ok(args.device, m, args.seq_len, autocast_dtype(args.precision))
    if flash is not None:
        print(f"meshlm bench --gpu-baseline: SDPA's flash kernel takes the attention call: {'yes' if flash else 'NO'}",
              flush=True)
    if args.device.type == "cpu":
        print("meshlm bench --gpu-baseline: no GPU here: a tiny model on CPU, to check the comparison itself; "
              "the GPU figures (1.3B parameters, bf16) stay open", flush=True)
    ours, initial = run_meshlm(cfg, dataset, args)
    plain = run_plain(cfg, dataset, args, initial)
    rows = {}
    for name, r in (("meshlm", ours), ("plain", plain)):
        tps = tokens_per_step * args.steps / r["seconds"]
        rows[name] = {**r, "tokens_per_s": tps, "mfu": tps * flops_tok / peak,
                      "step_time_s": r["seconds"] / args.steps}
    diff = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], plain["losses"]))
    return {"device": device_name, "precision": args.precision, "params": param_count(m)["total"],
            "model": {k: getattr(m, k) for k in ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size")},
            "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
            "flops_per_token": flops_tok, "peak_flops": peak, "flash_attention": flash,
            "meshlm": rows["meshlm"], "plain": rows["plain"],
            "speedup": rows["meshlm"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
            "loss_max_rel_diff": diff}


def table(result: dict) -> str:
    def mem(b):
        return f"{b / 2**30:.1f} GiB" if b is not None else "n/a"

    lines = [f"  {'loop':<8}{'tokens/s':>12}{'MFU':>8}{'step':>10}{'peak mem':>11}  loss first -> last  compiled"]
    for name in ("meshlm", "plain"):
        r = result[name]
        compiled = f"{r['compiled_blocks']} blocks" if name == "meshlm" else ("model" if r["compiled"] else "no")
        compiled = compiled if compiled != "0 blocks" else "no"
        lines.append(f"  {name:<8}{r['tokens_per_s']:>12,.0f}{100 * r['mfu']:>7.1f}%{1000 * r['step_time_s']:>8.1f}ms"
                     f"{mem(r['peak_mem_bytes']):>11}  {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}   {compiled}")
    lines.append(f"  meshlm / plain: {result['speedup']:.3f}x tokens/s; losses agree to "
                 f"{result['loss_max_rel_diff']:.1e} (same weights, batches and optimizer); "
                 "MFU = tokens/s x (6N + 12 L d s) / "
                 f"{result['peak_flops'] / 1e12:.4g} TFLOP/s peak")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    args = parse_args(argv)
    result = compare(args)
    print(table(result), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_baseline.json").write_text(json.dumps(result, indent=1))
        print(f"meshlm bench --gpu-baseline: wrote {args.out / 'gpu_baseline.json'}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
