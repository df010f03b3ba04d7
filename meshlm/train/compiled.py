"""torch.compile, one transformer block at a time (as torchtitan's `apply_compile`).

The order of the transforms matters, and is the trainer's: tensor parallelism (inside `build_model`),
then activation recomputation (`recompute.py`), then compile, then the data-parallel gradient hooks
(parallel/data.py, zero.py), which sit on the parameters and so never see whether a block is compiled.

Why per block and not the whole model:

- every block runs the same code on the same shapes, and since torch 2.5 dynamo treats a module's
  parameters as graph inputs (`inline_inbuilt_nn_modules`), so one compiled graph serves all blocks:
  compile time does not grow with depth;
- what lies outside the blocks (the embedding, the vocabulary-parallel loss, a pipeline stage's sends
  and receives) stays eager, where it is easy to read and to debug;
- `nn.Module.compile()` compiles in place: parameter names, state dicts, hooks and `isinstance` are
  those of the eager module, so checkpoints load under either setting.

The cross-entropy of a whole model (`Transformer.loss_sum`, tp 1) is compiled too: eager, it writes an
fp32 copy of the (B, T, V) logits and reads it twice (log-softmax, then its gradient), several GB per
step at V = 50k; compiled, the cast and the softmax are fused into the reduction.

What it gains on a GPU: inductor fuses the memory-bound work between the matmuls (layer norms, bias
and residual adds, GELU, dropout) into a few Triton kernels: fewer launches and fewer round trips
through HBM. On a CPU the gain is small and compiling costs tens of seconds, so `auto` leaves it off.

`auto` also leaves it off on CUDA where it pays less or breaks the graph: mixture-of-experts blocks
(the routing's token counts are data-dependent), tensor or context parallelism (our collectives are
Python calls inside autograd functions, and dynamo breaks the graph at each) and the zero-bubble
pipeline schedule (it splits each backward into input and weight gradients, which a compiled backward
computes together). `true` compiles them anyway (correct, with graph breaks); `false` never compiles.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..layout import Layout
from ..model import Block, Transformer

COMPILE_MODES = ("auto", "true", "false")
"""Allowed values of `train.compile`."""

BACKEND = "inductor"
"""The torch.compile backend. Tests set "aot_eager" (the same graph capture and autograd tracing, no code
generation), since inductor's C++ compilation takes a minute on a small CPU."""


def wants_compile(mode: str, *, device_type: str, model: ModelConfig, layout: Layout) -> bool:
    """Whether `train.compile` = mode compiles the blocks on this device for this model and layout."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile ({mode!r}) must be one of: {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode == "true"
    zero_bubble = layout.pp > 1 and layout.schedule == "zb"
    return device_type == "cuda" and not model.n_experts and layout.tp == 1 and layout.cp == 1 and not zero_bubble


def apply_compile(model: nn.Module) -> int:
    """Compile every `Block` of `model` in place (a whole model, a pipeline stage or several); returns
    how many. The first step after it is slow: each distinct graph is compiled when first run."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=BACKEND)
    if isinstance(model, Transformer) and model.post and model.tp.size == 1:
        model.loss_sum = torch.compile(model.loss_sum, backend=BACKEND)  # on this instance only
    return len(blocks)
