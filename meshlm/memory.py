"""Activation memory: measured (what autograd saves for backward) and predicted (Korthikanti et al. 2022).

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), Table 2:
activation bytes per transformer layer with 16-bit activations, s sequence, b batch, h hidden,
a heads, t tensor-parallel ranks:

    tensor parallelism                     s*b*h * (10 + 24/t + 5*a*s/(h*t))
    tensor + sequence parallelism          s*b*h * (34/t + 5*a*s/(h*t))
    ... + selective recomputation          the same without the 5*a*s/(h*t) term
    full recomputation                     s*b*h * 2  (the layer input; / t when it is a sequence shard)

The formula counts dropout masks (1 byte per element, 4 of the 34) and the a*s*s attention scores
and softmax output; a fused attention kernel (SDPA) saves neither, and fp32 activations take twice
the bytes. So the measured figure is compared with the formula as a ratio, and what must hold is
the formula's shape: sequence parallelism divides the replicated part by t.

Where the measurement (fp32, PyTorch's CPU kernels) departs from 2x the formula, term by term:

- no dropout (p = 0): the masks are not there (the formula always counts them);
- dropout masks are fp32 on CPU (4 bytes, the formula 1 byte, so 2x it would be 2);
- the attention core: the flash kernel (chosen when dropout is 0) saves q, k, v, its output
  (s*b*h) and the log-sum-exp (a*s*b floats) instead of the 5*a*s*s*b bytes; the math kernel
  (dropout > 0, or forced) saves the a*s*s softmax output (and with dropout the mask and the
  dropped probabilities, all fp32) plus scaled copies of q and k;
- the flash kernel's output is laid out so that the heads-to-hidden reshape before the output
  projection is a view: it is the projection's saved input, so 'selective' frees only the
  log-sum-exp there;
- norms also save their per-token mean and 1/std (s*b floats each), ignored by the formula;
- the formula's MLP is 4h wide with GELU (19 of the 34); SwiGLU or another d_ff differs;
- under full recomputation rope models also keep the (cos, sin) tables, once per forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def korthikanti_bytes_per_layer(*, s: int, b: int, h: int, a: int, t: int, sequence_parallel: bool,
                                recompute: str = "none") -> float:
    """Activation bytes of one layer per rank, 16-bit activations (Table 2 of Korthikanti et al.).

    recompute='selective' drops the 5*a*s/(h*t) attention-core term (Table 2's "selective
    activation recompute" rows: s*b*h*(10 + 24/t) and s*b*h*34/t). recompute='full' keeps only the
    layer input, 2*s*b*h bytes (Table 2's last row, written for the replicated input of plain tensor
    parallelism); under sequence parallelism that input is this rank's sequence shard, so 2*s*b*h/t
    (what Megatron's --distribute-saved-activations does without it).
    """
    from .train.recompute import check_recompute
    check_recompute(recompute)
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    attention = 0.0 if recompute == "selective" else 5 * a * s / (h * t)
    if sequence_parallel:
        return s * b * h * (34 / t + attention)
    return s * b * h * (10 + 24 / t + attention)


def saved_activation_bytes(fn: Callable[[], torch.Tensor], *, exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs (parameters excluded)."""
    return sum(saved_activation_bytes_by_module(fn, {}, exclude=exclude).values())


def saved_activation_bytes_by_module(fn: Callable[[], object], modules: dict[str, nn.Module], *,
                                     exclude: list[torch.Tensor] = ()) -> dict[str, int]:
    """Like `saved_activation_bytes`, split by the module (of `modules`, by name) whose forward was
    running when a storage was first saved; "" collects the rest (embedding, head, loss).

    Storages are counted once, whole, where first saved: a block's input is first saved by its own
    first norm, so it counts in that block. Under recomputation a checkpoint saves its inputs and
    nothing inside it (what it saves while recomputing in backward is transient), which is what
    this counts, so the figures per mode compare directly.
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: set[int] = set()
    out = {name: 0 for name in modules}
    out[""] = 0
    running: list[str] = [""]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            out[running[-1]] += storage.nbytes()
        return t

    def enter(name: str):
        def hook(module, args) -> None:
            running.append(name)
        return hook

    def leave(module, args, result) -> None:  # a hook's return value would replace the output
        running.pop()

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return out


def recompute_report(cfg, *, seq_len: int, batch: int, attention: str = "default", seed: int = 0) -> list[dict]:
    """Activation bytes per layer of one forward for each recompute mode: measured and by the formula.

    One process (t = 1), fp32. For each mode a model is built with `build_model` (vocabulary 512
    unless `cfg` sets one), wrapped by `apply_recompute`, and run forward on random tokens with the
    loss; the bytes saved while each block ran are averaged over the blocks. attention='math'
    forces SDPA's math kernel, which saves the a*s*s softmax output the formula counts; 'default'
    lets PyTorch choose (flash when dropout is 0: output and log-sum-exp only).

    Returns rows {mode, measured_bytes_per_layer, formula_bytes_per_layer, ratio}, formula scaled
    x2 for fp32 (see the module docstring for the terms that differ).
    """
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .model import build_model
    from .train.recompute import RECOMPUTE, apply_recompute

    if attention not in ("default", "math"):
        raise ValueError(f"attention ({attention!r}) must be 'default' or 'math'")
    cfg = cfg.replace(vocab_size=cfg.vocab_size or 512, max_seq_len=max(cfg.max_seq_len, seq_len))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    rows = []
    for mode in RECOMPUTE:
        model = build_model(cfg, seed=seed)
        model.train()
        apply_recompute(model, mode)
        blocks = {name: block for name, block in model.layers.items()}
        with sdpa_kernel(SDPBackend.MATH) if attention == "math" else nullcontext():
            by_block = saved_activation_bytes_by_module(lambda: model.loss_sum(model(x), y)[0], blocks,
                                                        exclude=list(model.parameters()))
        measured = sum(by_block[name] for name in blocks) / len(blocks)
        formula = 2 * korthikanti_bytes_per_layer(s=seq_len, b=batch, h=cfg.d_model, a=cfg.n_heads, t=1,
                                                  sequence_parallel=False, recompute=mode)
        rows.append({"mode": mode, "measured_bytes_per_layer": measured, "formula_bytes_per_layer": formula,
                     "ratio": measured / formula})
    return rows
