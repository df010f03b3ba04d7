"""Activation recomputation: keep less for backward, compute it again when backward needs it.

Backward needs the activations that forward produced; stored, they grow with batch x sequence x
width x depth and soon outweigh the weights. Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (arXiv:2205.05198), count them per layer (16-bit, t
tensor-parallel ranks, sequence parallelism on; `meshlm.memory.korthikanti_bytes_per_layer`):

    none        s*b*h * (34/t + 5*a*s/(h*t))    everything autograd saves
    selective   s*b*h * 34/t                    the attention core recomputed (section 5)
    full        s*b*h * 2/t                     only each layer's input kept (2*s*b*h without SP)

Three modes, one per row:

- 'none': store everything (fastest; most memory).
- 'selective': wrap each `Attention.core` (softmax(q k^T / sqrt(D)) v, with its dropout) in a
  checkpoint. Its q, k, v inputs are kept; the a*s*s scores, softmax output and dropout mask are
  recomputed in backward. That term dominates at long sequences (for GPT-3 175B, a=96, s=2048,
  h=12288: 5as/h = 80 against 34, about 70% of the layer) yet costs few FLOPs (4*b*s*s*h of the
  layer's 24*b*s*h*h + 4*b*s*s*h; the paper: 2.7% extra FLOPs for GPT-3). With sequence
  parallelism the paper reports 5x less activation memory than tensor parallelism alone and 90%
  less recomputation overhead than full recomputation (530B GPT: 54.2% MFU against 42.1%).
- 'full': wrap every `Block.forward`. Only the block's inputs are kept (the hidden state, plus the
  shared rope tables and mask); the whole block runs again when its backward starts: about one
  extra forward, ~33% more FLOPs per step, for the least memory.

Caveat for fused attention (measured in `meshlm.memory.recompute_report`): the 5*a*s/(h*t) term
counts the a*s*s softmax output, its dropout mask and the dropout output. A fused SDPA kernel (the
flash kernel PyTorch picks on CPU and GPU when dropout is 0) stores none of them, only its output
and the log-sum-exp (b*a*s floats), so 'none' already sits near the 'selective' row there and
selective recomputation saves little; it pays off with the math kernel (dropout > 0 on CPU, masks
some kernels do not take).

How. Both modes replace a bound method on the module instance (`block.forward`, `attn.core`) with
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` around the original. Parameter names,
state dicts, hooks and `isinstance` are untouched, so it applies to any module that holds `Block`s:
a whole `Transformer`, a pipeline stage, `PipelineStages`. The non-reentrant checkpoint

- restores the CPU (and device) RNG state before recomputing, so dropout draws the same masks;
- recomputes in backward on every rank in the same order, so tensor/sequence-parallel collectives
  inside a block pair up across ranks as in forward (they run again: a full recompute repeats a
  block's forward all-gathers / all-reduces, up to the last saved activation);
- works with `torch.autograd.grad(..., inputs=...)` and retained graphs (the zero-bubble split).

Side effects run twice. Code inside a wrapped region that counts something (the MoE router's
statistics) runs again when backward recomputes it; it should check `recomputing()`, which is True
only while a checkpoint re-runs its forward. (A recompute stops after the region's last saved
tensor, so whether code at the end of a block runs again depends on what follows it.)

Under `torch.no_grad()` (evaluation, generation) the wrapped methods run the original directly.
A checkpointed region must compute the same thing when recomputed: do not switch SDPA backends or
autocast around forward only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import threading

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..model import Attention, Block

RECOMPUTE = ("none", "selective", "full")
"""Allowed values of `train.recompute`."""

_WRAPPED = {"selective": (Attention, "core"), "full": (Block, "forward")}  # mode -> (module type, method)


def check_recompute(mode: str) -> None:
    """Raise ValueError naming `train.recompute` unless `mode` is one of RECOMPUTE."""
    if mode not in RECOMPUTE:
        raise ValueError(f"train.recompute ({mode!r}) must be one of: {', '.join(RECOMPUTE)}")


def apply_recompute(model: nn.Module, mode: str) -> int:
    """Recompute activations of `model` in backward per `mode`; returns how many modules were wrapped.

    'none' wraps nothing. 'selective' wraps every `Attention.core`, 'full' every `Block.forward`
    found in `model` (itself included). Applying the same mode again is a no-op (returns 0: the
    modules already wrapped are skipped); applying the other mode to a model already wrapped raises
    ValueError, and so does an unknown mode.
    """
    check_recompute(mode)
    if mode == "none":
        return 0
    done = {m.meshlm_recompute for m in model.modules() if hasattr(m, "meshlm_recompute")}
    if done - {mode}:
        raise ValueError(f"train.recompute ({mode!r}): the model already recomputes "
                         f"{', '.join(sorted(done))} activations; apply one mode per model")
    kind, method = _WRAPPED[mode]
    count = 0
    for module in model.modules():
        if isinstance(module, kind) and not hasattr(module, "meshlm_recompute"):
            # a partial of the bound method: deepcopy rebinds it to the copy (a closure would not)
            setattr(module, method, functools.partial(_checkpointed, getattr(module, method)))
            module.meshlm_recompute = mode
            count += 1
    return count


class _State(threading.local):
    depth = 0  # checkpointed forwards being recomputed on this thread (backward may run on its own thread)


_state = _State()


def recomputing() -> bool:
    """True while backward re-runs a checkpointed forward: skip side effects that must count once."""
    return _state.depth > 0


class _Recomputation:
    """Context of a recomputation; reusable (a checkpoint recomputes once per backward graph task)."""

    def __enter__(self):
        _state.depth += 1

    def __exit__(self, *exc) -> None:  # also when checkpoint stops the recomputation early (by raising)
        _state.depth -= 1


def _checkpointed(fn, *args, **kwargs):
    """fn(*args, **kwargs) under a non-reentrant checkpoint: only its tensor inputs are saved.

    Tensors nested in tuples and lists (the rope (cos, sin) pair) are passed to checkpoint as
    top-level arguments, so they are saved like any input (counted by the saved-tensor hooks,
    checked for in-place changes) rather than held by a closure.
    """
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    leaves: list = []
    structure = _flatten((args, kwargs), leaves)

    def replay(*values):
        a, kw = _unflatten(structure, iter(values))
        return fn(*a, **kw)

    if torch.compiler.is_compiling():  # a compiled block (train.compile): dynamo traces the checkpoint as
        return checkpoint(replay, *leaves, use_reentrant=False)  # one region, and takes no context_fn
    return checkpoint(replay, *leaves, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _Recomputation()))


def _flatten(tree, leaves: list):
    """Structure of nested tuples/lists/dicts with every leaf appended to `leaves` (None marks one)."""
    if isinstance(tree, (tuple, list)):
        return type(tree), [_flatten(x, leaves) for x in tree]
    if isinstance(tree, dict):
        return dict, {k: _flatten(v, leaves) for k, v in tree.items()}
    leaves.append(tree)
    return None


def _unflatten(structure, values):
    """Inverse of `_flatten`: rebuild the tree, taking its leaves from the iterator `values`."""
    if structure is None:
        return next(values)
    kind, children = structure
    if kind is dict:
        return {k: _unflatten(v, values) for k, v in children.items()}
    items = [_unflatten(c, values) for c in children]
    return kind(*items) if hasattr(kind, "_fields") else kind(items)  # a namedtuple takes fields


# --- python -m meshlm.train.recompute: measured against the formula ---------------------------------


def main(argv: list[str] | None = None) -> None:
    """Print measured and predicted activation bytes per layer for each recompute mode."""
    from ..config import ConfigError, preset
    from ..memory import recompute_report

    parser = argparse.ArgumentParser(prog="python -m meshlm.train.recompute",
                                     description="Activation bytes per layer per recompute mode: "
                                                 "measured (autograd's saved tensors, fp32) vs Korthikanti et al.")
    parser.add_argument("--preset", default="gpt-small", help="model preset (default gpt-small)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length s (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="batch size b (default 4)")
    parser.add_argument("--dropout", type=float, default=None, help="dropout (default: the preset's)")
    args = parser.parse_args(argv)
    try:
        cfg = preset(args.preset)
    except ConfigError as e:
        parser.error(str(e))  # one line, exit code 2
    if args.dropout is not None:
        cfg = cfg.replace(dropout=args.dropout)
    if args.seq_len < 1 or args.batch < 1 or not 0 <= cfg.dropout < 1:
        parser.error(f"--seq-len ({args.seq_len}) and --batch ({args.batch}) must be positive, "
                     f"--dropout ({cfg.dropout}) in [0, 1)")
    s, b, h, a = args.seq_len, args.batch, cfg.d_model, cfg.n_heads
    print(f"{args.preset}: s={s} b={b} h={h} a={a} layers={cfg.n_layers} dropout={cfg.dropout}; "
          f"bytes per layer, fp32 (formula: 2x the 16-bit Table 2 figure)")
    print(f"{'attention':>10} {'mode':>10} {'measured':>12} {'formula':>12} {'ratio':>6}")
    for backend in ("default", "math"):
        for row in recompute_report(cfg, seq_len=s, batch=b, attention=backend):
            print(f"{backend:>10} {row['mode']:>10} {row['measured_bytes_per_layer']:>12,.0f} "
                  f"{row['formula_bytes_per_layer']:>12,.0f} {row['ratio']:>6.2f}")
    if cfg.dropout == 0:
        print(f"dropout 0: the formula's two dropout masks per layer (2*s*b*h bytes, {4 * s * b * h:,} "
              f"scaled) are not there; the flash kernel ('default') saves no a*s*s term either")


if __name__ == "__main__":
    main()
