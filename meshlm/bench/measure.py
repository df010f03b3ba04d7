"""What a bench job measures on each rank: step times, training-state bytes, activations, peak memory.

`state_bytes` is the memory that the parallel strategy decides about: parameters + gradients +
optimizer states held by this rank. For DDP-style data parallelism it is 16 bytes per parameter
in fp32 (4 weights + 4 gradients + 8 AdamW moments); ZeRO-1/2/3 and FSDP shard parts of it over the
ranks. It is counted from the tensors themselves, by distinct storage (views into one flat buffer
count once, a freed storage counts 0; a DTensor counts its local shard), at the moment it is
largest in a step: right after the optimizer step, before the gradients are freed.

The state is split by kind (`state_split`): parameters (the model's, and the shards an optimizer
holds that the model does not), gradients (their .grad) and optimizer states (AdamW's moments); a
storage counts once, in the first kind that holds it.

Activations (`ActivationProbe`): the bytes of the tensors autograd keeps for backward, counted by
a saved-tensors hook (parameters excluded) while they are alive; the peak over one step. A storage
counts once however many tensors save it, and it leaves the count when the last autograd node
holding it is freed (after its backward, or after W under zero-bubble's split backward).

Peak memory on CPU is the process's peak resident set (`peak_rss_bytes`: VmHWM of /proc/self/status,
the high-water mark of this process's own memory; getrusage's ru_maxrss would also carry the RSS
of the parent that forked it, kept across exec, which under a launcher bigger than the job hides the
job's own peak), which includes the Python and torch baseline of a few hundred MB; the bench also
records that baseline, taken before the model is built. What the peak holds beyond the baseline
and the four kinds is "other": the allocator's free lists, temporaries (logits, the gradient
buckets, gloo's buffers), and the libraries loaded after the baseline was taken. The kinds are
each taken at their own peak (the state inside the optimizer step, activations at the end of the
forwards), so their sum bounds what is held at any one moment from above.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor (FSDP2): this rank's shard
    return to_local() if callable(to_local) else t


STATE_KINDS = ("params", "grads", "optim")
MEMORY_KINDS = (*STATE_KINDS, "activations")


def state_split(params: Iterable[torch.Tensor], optimizer: object | None = None) -> dict[str, int]:
    """Bytes of distinct storages by kind: params (the model's and the optimizer's parameters), grads
    (their .grad), optim (the optimizer's state tensors); a storage counts once, in its first kind."""
    params = list(params)
    kinds: dict[str, list[torch.Tensor]] = {k: [] for k in STATE_KINDS}
    opt_params = []
    if isinstance(optimizer, torch.optim.Optimizer):  # a sharded optimizer may hold flat shards the model does not
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        kinds["optim"] = [v for state in optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor)]
    kinds["params"] = params + opt_params
    kinds["grads"] = [p.grad for p in params + opt_params if p.grad is not None]
    seen: set[int] = set()
    out = dict.fromkeys(STATE_KINDS, 0)
    for kind in STATE_KINDS:
        for t in kinds[kind]:
            storage = _local(t).untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            out[kind] += storage.nbytes()
    return out


def state_bytes(params: Iterable[torch.Tensor], optimizer: object | None = None) -> int:
    """Bytes of distinct storages behind params, their .grad, and the optimizer's params, grads and states."""
    return sum(state_split(params, optimizer).values())


class StateProbe:
    """Counts `state_split` right after every optimizer step (gradients still held); keeps the largest
    total (`peak`) and its split."""

    def __init__(self, params: list[torch.Tensor], optimizer: object):
        self.params, self.optimizer, self.peak = params, optimizer, 0
        self.split = dict.fromkeys(STATE_KINDS, 0)
        self.handle = None
        if isinstance(optimizer, torch.optim.Optimizer):
            self.handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.count())

    def count(self) -> None:
        split = state_split(self.params, self.optimizer)
        if sum(split.values()) > self.peak:
            self.peak, self.split = sum(split.values()), split

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


class _Saved:
    """What autograd holds instead of a saved tensor while the probe is on; leaves the count when freed."""

    __slots__ = ("probe", "ptr", "tensor")

    def __init__(self, probe: "ActivationProbe", ptr: int, tensor: torch.Tensor):
        self.probe, self.ptr, self.tensor = probe, ptr, tensor

    def __del__(self):
        self.probe.release(self.ptr)


class ActivationProbe:
    """`with ActivationProbe(params): step()` -> `.peak`: the most bytes of saved activations alive at once.

    Parameters (and views of them) are not activations: the leaf tensors that require grad, their
    views, and the storages of `params` when the probe was made are skipped.
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self.skip = {_local(p).untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage -> [holders alive, nbytes]
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _is_param(t: torch.Tensor) -> bool:
        base = t._base if t._base is not None else t
        return base.is_leaf and base.requires_grad

    def _pack(self, t: torch.Tensor):
        if self._is_param(t):
            return t
        storage = _local(t).untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.skip:
            return t
        ref = self.refs.setdefault(ptr, [0, nbytes])
        if ref[0] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        ref[0] += 1
        return _Saved(self, ptr, t)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Saved) else held

    def release(self, ptr: int) -> None:
        ref = self.refs.get(ptr)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[ptr]

    def __enter__(self) -> "ActivationProbe":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def peak_rss_bytes() -> int:
    """This process's peak resident set in bytes (Linux: VmHWM, reset by exec; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource
    import sys
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory_bytes(device: torch.device) -> int:
    """The allocator's peak on CUDA, this process's peak resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum of a list of numbers over all ranks (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def max_per_key_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """{key: the largest value any rank has for it}: a parameter server's ranks send different things."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    every: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, values)
    out: dict[str, float] = {}
    for d in every:
        for k, v in d.items():
            out[k] = max(out.get(k, 0.0), v)
    return dict(sorted(out.items()))


def median_step_time(step_times: list[float], *, warmup: int) -> float:
    """Median of the step times after the warm-up steps (all of them if there are no others)."""
    timed = step_times[warmup:] or step_times
    return statistics.median(timed)
