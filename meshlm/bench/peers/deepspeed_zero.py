"""Peer: DeepSpeed ZeRO stages 1, 2 and 3 (`deepspeed.initialize`) around our model and our AdamW.

ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models") shards over the W data-parallel ranks the optimizer states (stage 1), + the gradients
(stage 2), + the parameters (stage 3), as our `zero1|2|3` do. DeepSpeed is handed exactly our
model (`build_model`, same seed) and our optimizer (`make_optimizer`: torch AdamW with our decay
groups, which ZeRO keeps and steps on its flat fp32 partitions), our clipping value
(`gradient_clipping`) and our gradient buckets (`train.bucket_mb`); we set the learning rate of
`lr_at` on the optimizer's groups before each step, as PeerTrainer does.

The step is DeepSpeed's, not PeerTrainer's: forward through the engine, `engine.backward` and
`engine.step` per micro-batch, with `gradient_accumulation_steps = layout.micro_batches` so that
the engine reduces gradients, clips and steps only on the last one. The loss is normalised as in
PeerTrainer (DeepSpeed averages gradients over the ranks, so the local loss is scaled by W), and
`scale_wrt_gas=False` keeps DeepSpeed from dividing it again by the micro-batch count:

    grad = 1/W * sum_r sum_m d(W * loss_sum_rm / n_global) = sum_rm d(loss_sum_rm / n_global)

Two ZeRO-3 settings differ from DeepSpeed's defaults, so that it shards and gathers as our `zero3`
and `torch-fsdp2` do: `stage3_param_persistence_threshold=0` (by default parameters under 1e5
elements, all of a tiny model's, stay whole on every rank) and `stage3_max_reuse_distance=0` (by
default a parameter reused within 1e9 elements, i.e. all of a small model, stays gathered from
forward to backward, which is ZeRO-2's schedule).

DeepSpeed keeps fp32 parameters here (no fp16/bf16 section; `train.precision=bf16` autocasts the
forward, as the other peers do). Its stages 1 and 2 still clone an fp32 master copy of the
rank's partition, and all of its stages keep gradients in buffers of their own and step AdamW
one parameter group at a time; so the bench's state/rank, which counts the model's parameters
and gradients and what the optimizer holds when its step ends, sees the parameters (none in
stage 3, whose partitions live outside them), the AdamW moments and the group being stepped, not
the rest of DeepSpeed's partitions. The row's note says so.

Communication is measured by DeepSpeed's comms logger (`comms_logger` in the config): every
collective that goes through `deepspeed.comm`, by payload bytes of the full tensor (the CommMeter
convention: an all-gather or reduce-scatter of a tensor of n bytes counts n), under 'op/dp'.
Stages 1 and 2 all-reduce the gradient buckets (each rank keeps its part) and all-gather the
updated parameters; stages 2 and 3 reduce on every micro-batch, not once per step.

DeepSpeed's communication backend would compile a C++ op on its first start (its shared-memory
all-reduce, 20 to 60 s on 2 cores, into TORCH_EXTENSIONS_DIR) whether used or not; only its
`inference_all_reduce` (DeepSpeed-Inference's tensor-parallel layers) uses it, never ZeRO's training
step, which calls torch.distributed's collectives. We skip that build, so every start is the same and
the training measured is unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch
import torch.distributed as dist

from ...config import ConfigError
from ...model import loss_sum
from . import PeerTrainer

INSTALL_HINT = "deepspeed is not installed: pip install -e '.[peers]'"

_OP_NAMES = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}
"""DeepSpeed's names of its collectives -> ours (all_reduce, all_gather, broadcast, ... are the same)."""
_LOGS_THE_SHARD = {"all_gather", "all_gather_into_tensor"}
"""Collectives whose logged size is this rank's input, 1/W of the payload in our convention."""


def _import_deepspeed(device: torch.device):
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # our device, not DeepSpeed's guess (and its warning)
    try:
        import deepspeed
    except ImportError as e:  # an optional extra: one clear line in this strategy's row, the others run
        raise ConfigError(INSTALL_HINT) from e
    # the inference-only shared-memory op: not built (module doc). The module by its full name: the package
    # attribute deepspeed.comm.torch is torch itself
    backend = importlib.import_module("deepspeed.comm.torch")
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # no per-rank INFO lines in the bench's output
    # DeepSpeed calls torch's all_gather_into_tensor and reduce_scatter_tensor, and torch says on every rank
    # that they have new names
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return deepspeed


class ZeroPeer(PeerTrainer):
    """One rank of a DeepSpeed ZeRO run of our model; `stage` is set by the subclasses below."""

    stage = 0
    note = ("DeepSpeed comm bytes measured by its comms logger; state/rank undercounts DeepSpeed: it keeps "
            "gradients and fp32 partitions in its own buffers and steps one parameter group at a time, so only "
            "the model's parameters, the AdamW moments and the group being stepped are counted")
    comm_coverage = "bytes by DeepSpeed's comms logger; not timed"

    def __init__(self, cfg, *, dataset, device):
        deepspeed = _import_deepspeed(device)
        super().__init__(cfg, dataset=dataset, device=device)  # our model and our AdamW, not wrapped yet
        t = cfg.train
        micro = t.batch_size // (self.data_world * cfg.layout.micro_batches)
        bucket = int(t.bucket_mb * 2**20 / 4)  # elements of fp32 gradients, as DDP's bucket_cap_mb
        config = {
            "train_batch_size": t.batch_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": cfg.layout.micro_batches,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": self.stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                  # ZeRO-3 as ours and torch-fsdp2: see the module doc
                                  "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0},
            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
        }
        # DeepSpeed joins the process group the worker made (gloo on CPU, nccl on CUDA)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                               config=config)
        self.module = self.engine
        if ds_optimizer.optimizer is not self.optimizer:  # then setting our groups' lr would change nothing
            raise RuntimeError("DeepSpeed did not keep our AdamW as its optimizer")
        self._comms = deepspeed.comm.comms_logger
        self._comms.reset_data()  # not the broadcast of the initial weights

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # DeepSpeed wraps the model and the optimizer together, in __init__

    def step(self) -> float:
        """One optimizer step on the global batch, DeepSpeed's way; the same math as PeerTrainer.step."""
        micro, count = self.begin_step()
        self.engine.train()
        total = torch.zeros((), device=self.device)
        for xm, ym, tm in micro:
            with self.autocast():
                logits = self.engine(xm, token_types=tm)
            loss, _ = loss_sum(logits, ym)
            self.engine.backward(loss / count * self.data_world, scale_wrt_gas=False)
            self.engine.step()  # reduces, clips and steps only at the accumulation boundary (the last micro-batch)
            total += loss.detach()
        if self.data_world > 1:
            self._all_reduce(total)
        self.step_num += 1
        return (total / count).item()

    def comm_bytes_per_step(self) -> dict[str, float]:
        steps = max(1, self.step_num)
        out = super().comm_bytes_per_step()  # the loss all-reduce, as every peer counts it
        for name, sizes in self._comms.get_raw_data().items():  # {op: {logged bytes: [calls, ...]}}
            scale = self.data_world if name in _LOGS_THE_SHARD else 1
            key = f"{_OP_NAMES.get(name, name)}/dp"
            out[key] = out.get(key, 0.0) + sum(size * calls for size, (calls, *_) in sizes.items()) * scale / steps
        return out


class Zero1(ZeroPeer):
    name = "deepspeed-zero1"
    stage = 1


class Zero2(ZeroPeer):
    name = "deepspeed-zero2"
    stage = 2


class Zero3(ZeroPeer):
    name = "deepspeed-zero3"
    stage = 3
