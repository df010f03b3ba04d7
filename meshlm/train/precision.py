"""Mixed precision: which autocast dtype a precision means, and dynamic loss scaling for fp16.

fp32 master weights. Under `torch.autocast` the parameters, their gradients and the AdamW moments stay
fp32; only the matmuls (linear, attention) run in 16 bits, on 16-bit copies of their inputs that
autocast makes on the fly, and numerically touchy ops (softmax cross-entropy, norms on GPUs) stay fp32.
So the optimizer always updates fp32 weights: tiny updates (lr * g, often < 2^-11 of the weight) are
not rounded away as they would be in a 16-bit weight (Micikevicius et al. 2018, "Mixed Precision
Training", section 3.1).

bf16 keeps fp32's 8 exponent bits (range ~1e-38 .. 3e38) with 8 bits of mantissa: gradients neither
underflow nor overflow more than in fp32, so it needs no loss scaling. fp16 has 5 exponent bits: its
smallest subnormal is 2^-24 ~ 6e-8 and its largest value 65504. The activation gradients that flow
through the 16-bit regions of backward are often smaller than 2^-24 and would flush to zero.

Loss scaling (Micikevicius et al. 2018, section 3.2). Backward is linear in its seed, so multiplying
the loss L by S multiplies every gradient by S:

    d(S*L)/dw = S * dL/dw        (shifts the small gradients up into fp16's range)
    g = (S * dL/dw) / S          (unscaled in fp32 before the norm, the clip and the optimizer)

Too large an S overflows instead: some scaled gradient becomes inf (then nan). Dynamic scaling finds
the largest S that does not: start high (2^16); a step whose gradients hold an inf or nan is
*skipped* (no optimizer update) and S is multiplied by backoff_factor (0.5); after growth_interval
(2000) consecutive good steps S is multiplied by growth_factor (2). With powers of two for S and
the factors, scaling and unscaling are exact (they only move the exponent).

Every rank must agree. Each rank checks only what it holds: its gradient shards under ZeRO, its
tensor slices, its pipeline stage. If one rank skipped a step that another took, the replicas would
no longer hold the same weights (and the next collectives would pair mismatched tensors). So the local
found-inf flag is all-reduced with MAX over groups that together span the mesh (e.g. tp, the data
axes and pp), and every rank takes the same decision. `torch.amp.GradScaler` makes that decision per
process; this scaler makes it per job, for any layout.

On CPUs torch 2.13 autocasts fp16 too (linear, matmul, scaled_dot_product_attention in fp16,
cross-entropy in fp32, checked by tests/test_precision.py), so fp16 runs on CPU, for tests: it is no
faster than fp32 there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..comm import CommMeter, all_reduce_
from ..config import ConfigError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Training precision -> autocast dtype (None: no autocast, plain fp32)."""


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in for `precision`; None for fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision ({precision!r}) must be one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def needs_loss_scaling(precision: str) -> bool:
    """Only fp16 needs it: bf16 has fp32's exponent range."""
    return autocast_dtype(precision) is torch.float16


def check_precision(precision: str, device: torch.device | str) -> None:
    """Refuse a precision this device cannot train in, with one line naming the value and the reason."""
    dtype = autocast_dtype(precision)
    device = torch.device(device)
    if dtype is None:
        return
    if device.type == "cuda":
        if dtype is torch.bfloat16:
            with torch.cuda.device(device):
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            if not native:
                name = torch.cuda.get_device_name(device)
                raise ConfigError(f"train.precision ('bf16') needs a GPU with bf16 units (compute capability 8.0+, "
                                  f"Ampere or newer); {name} has none; use fp16 or fp32")
        return
    if device.type == "cpu":
        return  # bf16 and fp16 autocast both work on CPU (slowly: no fp16/bf16 matmul units on most)
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"train.precision ({precision!r}) needs autocast, which torch has not for device "
                          f"{device.type!r}; use fp32")


class LossScaler:
    """Dynamic loss scale for fp16 training; disabled (scale 1, never skips) for fp32 and bf16.

    Per step:  (loss * scaler.loss_multiplier()).backward(); gradient reduction;
               found_inf = scaler.unscale_and_check(grads, groups); scaler.update(found_inf);
               optimizer step only when not found_inf.
    """

    def __init__(self, *, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        """min_scale: the scale never backs off below it (as Megatron's min_loss_scale); a model whose
        gradients overflow even there has diverged, and the skipped count keeps growing."""
        if not init_scale > 0:
            raise ConfigError(f"init_scale ({init_scale}) must be > 0")
        if not growth_factor > 1:
            raise ConfigError(f"growth_factor ({growth_factor}) must be > 1")
        if not 0 < backoff_factor < 1:
            raise ConfigError(f"backoff_factor ({backoff_factor}) must be in (0, 1)")
        if growth_interval < 1:
            raise ConfigError(f"growth_interval ({growth_interval}) must be >= 1")
        if not 0 < min_scale <= init_scale:
            raise ConfigError(f"min_scale ({min_scale}) must be in (0, init_scale ({init_scale})]")
        self.enabled = enabled
        self.init_scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = growth_interval, float(min_scale)
        self._scale = self.init_scale
        self.good_steps = 0
        """Consecutive steps without overflow since the last change of the scale."""
        self.skipped = 0
        """Steps skipped because of an overflow, over the whole run."""

    @property
    def scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def loss_multiplier(self) -> float:
        """Multiply the loss by this before backward (or divide the loss's divisor by it)."""
        return self.scale

    def unscale_and_check(self, grads: list[torch.Tensor], groups: list[dist.ProcessGroup | None], *,
                          device: torch.device | None = None, meter: CommMeter | None = None) -> bool:
        """Divide `grads` in place by the scale; True when any rank of the job found an inf or nan.

        Call after the gradient reduction, before the norm and the clip. `groups` must together reach
        every rank whose step must agree (None entries are size-1 axes and skipped). `device`: where the
        flag lives for the all-reduce (NCCL needs a CUDA tensor); default the gradients' device, else CPU.
        Disabled: does nothing and returns False (no collective: every rank is disabled alike).
        """
        if not self.enabled:
            return False
        grads = list({id(g): g for g in grads if g is not None}.values())  # divide a shared tensor once
        if device is None:
            device = grads[0].device if grads else torch.device("cpu")
        if grads:
            torch._foreach_div_(grads, self._scale)  # exact: the scale is a power of two
            bad = torch.stack([g.isfinite().all() for g in grads]).logical_not().any()
            found = bad.to(device=device, dtype=torch.float32).reshape(1)
        else:  # a rank that owns no gradients (a parameter-server worker) still joins the vote
            found = torch.zeros(1, device=device)
        for group in groups:
            all_reduce_(found, group, axis="loss_scale", meter=meter, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def update(self, found_inf: bool) -> None:
        """After each step: back off and count a skipped step on overflow, else grow after the interval."""
        if not self.enabled:
            return
        if found_inf:
            self._scale = max(self.min_scale, self._scale * self.backoff_factor)
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            grown = self._scale * self.growth_factor
            if math.isfinite(grown):
                self._scale = grown
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready) for the checkpoint metadata."""
        return {"enabled": self.enabled, "scale": self._scale, "good_steps": self.good_steps,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the counters. The scale is taken only from an enabled scaler's state: resuming a
        bf16/fp32 run (scale 1) in fp16 starts again from init_scale rather than from 1."""
        self.skipped = int(state.get("skipped", 0))
        if state.get("enabled", True):
            self._scale = float(state["scale"])
            self.good_steps = int(state.get("good_steps", 0))

    def __repr__(self) -> str:
        if not self.enabled:
            return "LossScaler(disabled)"
        return f"LossScaler(scale={self._scale:g}, good_steps={self.good_steps}, skipped={self.skipped})"
