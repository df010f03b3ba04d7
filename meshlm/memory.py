"""Activation memory: measured (what autograd saves for backward) and predicted (Korthikanti et al. 2022).

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), Table 2:
activation bytes per transformer layer with 16-bit activations, s sequence, b batch, h hidden,
a heads, t tensor-parallel ranks:

    tensor parallelism                     s*b*h * (10 + 24/t + 5*a*s/(h*t))
    tensor + sequence parallelism          s*b*h * (34/t + 5*a*s/(h*t))

The formula counts dropout masks (1 byte per element, 4 of the 34) and the a*s*s attention scores
and softmax output; a fused attention kernel (SDPA) saves neither, and fp32 activations take twice
the bytes. So the measured figure is compared with the formula as a ratio, and what must hold is
the formula's shape: sequence parallelism divides the replicated part by t.
"""

from __future__ import annotations

from typing import Callable

import torch


def korthikanti_bytes_per_layer(*, s: int, b: int, h: int, a: int, t: int, sequence_parallel: bool) -> float:
    """Activation bytes of one layer per rank, 16-bit activations, no recomputation (Table 2)."""
    attention = 5 * a * s / (h * t)
    if sequence_parallel:
        return s * b * h * (34 / t + attention)
    return s * b * h * (10 + 24 / t + attention)


def saved_activation_bytes(fn: Callable[[], torch.Tensor], *, exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
