"""Peer: Megatron-core (NVIDIA's library) training its own GPTModel at our model's shapes.

Three strategies, all with Megatron's `GPTModel` (local layer spec: plain PyTorch layers, no
Transformer Engine, no fused kernels, dropout 0) built from our model config (layers, hidden size,
heads, feed-forward size, vocabulary, position table, norm epsilon, tanh-GELU, biases, tied head):

    megatron-single  tensor_model_parallel_size=1, one process
    megatron-tp      tensor_model_parallel_size=W (Megatron's ColumnParallelLinear/RowParallelLinear and
                     vocabulary-parallel embedding and cross-entropy); every rank reads the whole batch
    megatron-ddp     tensor_model_parallel_size=1, Megatron's DistributedDataParallel over W ranks
                     (gradients in its contiguous fp32 buffers, one all-reduce per bucket)

Megatron initialises its weights its own way (`use_cpu_initialization`: each full weight drawn on
the CPU from torch's RNG and split over tp, so megatron-tp starts from megatron-single's weights),
not as `build_model` does: so its curves are compared with megatron-single's, not with ours. All
else is ours: the batches (`PeerTrainer.batch`), the schedule (`lr_at`), torch AdamW with our decay
groups (matrices only, no embeddings), gradient clipping over the global norm, and the loss
normalisation (GPTModel returns per-token losses when given labels: summed, divided by the global
token count; DDP averages over the W ranks, so the local loss is scaled by W as in PeerTrainer).

Megatron's optimizer is not used: `megatron.core.optimizer` hard-codes CUDA tensors. Torch AdamW
steps the same parameters instead (under DDP, reading Megatron's gradient buffers, `main_grad`).

CPU workarounds (megatron-core 0.16 assumes CUDA in three places), applied by `_cpu_patches` only in
this peer's own worker processes, and only when the device is the CPU:
  * `torch.cuda.current_device()` -> "cpu": DistributedDataParallel allocates its gradient buffers
    on `torch.cuda.current_device()`;
  * `CudaRNGStatesTracker.fork` -> a no-op context: attention and dropout run inside a fork of the
    CUDA RNG state (dropout is 0 here, so no random numbers are drawn);
  * the causal attention mask is passed in explicitly (built on our device): Megatron's default
    mask is created with device="cuda".
Communication is Megatron's own (torch.distributed calls inside its layers); it is not metered, except
for the DDP gradient all-reduce, counted analytically (4 bytes per parameter, fp32 buffers).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...comm import CommMeter
from ...config import ConfigError
from ...parallel.zero import wants_decay
from ...train.trainer import make_optimizer
from . import PeerTrainer

INSTALL_HINT = "megatron-core is not installed: pip install -e '.[peers]'"


def _import_megatron():
    # its import and its layers say, on every rank, that they fall back to plain torch (as intended here),
    # and its config warns about a CUDA-graph default that does not apply
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=message)
    try:
        from megatron.core import parallel_state, tensor_parallel  # noqa: F401
    except ImportError as e:  # an optional extra: one clear line in this strategy's row, the others run
        raise ConfigError(INSTALL_HINT) from e
    import megatron.core
    return megatron.core


def _cpu_patches(core) -> None:
    """Let megatron-core run on the CPU (see the module doc); called in this peer's process only."""
    torch.cuda.current_device = lambda: "cpu"  # where DDP puts its gradient buffers

    @contextlib.contextmanager
    def fork(self, name=None):  # no CUDA RNG state to fork; dropout is 0
        yield

    core.tensor_parallel.random.CudaRNGStatesTracker.fork = fork


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MegatronPeer(PeerTrainer):
    """One rank of a Megatron-core GPTModel run; `tp` / `ddp` set by the subclasses below."""

    tp_all = False
    """tensor_model_parallel_size = W (else 1)."""
    ddp = False
    """Wrap in Megatron's DistributedDataParallel."""
    note = ("Megatron-core GPTModel (its own initialisation: compare with megatron-single), torch AdamW; "
            "Megatron's tensor-parallel collectives are not metered")
    comm_coverage = "DDP's all-reduce bytes analytical; tensor-parallel collectives not counted; not timed"

    def __init__(self, cfg, *, dataset, device):  # not PeerTrainer's: Megatron's model, not ours
        core = _import_megatron()
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer import TransformerConfig

        m = cfg.model
        if m.family != "gpt":
            raise ConfigError(f"the megatron peers build Megatron's GPTModel: GPT family only, not {m.family!r}")
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        tp = self.world if self.tp_all else 1
        if m.n_heads % tp or m.d_ff % tp or m.vocab_size % tp:
            raise ConfigError(f"{self.name} needs tp ({tp}) to divide n_heads ({m.n_heads}), d_ff ({m.d_ff}) "
                              f"and vocab_size ({m.vocab_size})")
        if m.n_experts:
            raise ConfigError(f"{self.name} runs dense models only (model.n_experts={m.n_experts})")
        if device.type == "cpu":
            _cpu_patches(core)
        # tp: every rank reads the whole batch (as torch-tp); dp: this rank's rows
        self.data_rank, self.data_world = (0, 1) if tp > 1 else (self.rank, self.world)
        self.is_bert = False
        self.meter = CommMeter()
        self.step_num = 0

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        tcfg = TransformerConfig(
            num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.n_heads,
            ffn_hidden_size=m.d_ff, layernorm_epsilon=m.norm_eps, add_bias_linear=m.bias,
            activation_func=_gelu_tanh, init_method_std=m.init_std,
            hidden_dropout=0.0, attention_dropout=0.0,
            tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32,
            bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
            bf16=False)
        torch.manual_seed(cfg.train.seed)  # the CPU initialisation draws the full weights from torch's RNG
        model = GPTModel(config=tcfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                         vocab_size=m.vocab_size, max_sequence_length=m.max_seq_len,
                         share_embeddings_and_output_weights=m.tie_embeddings,
                         position_embedding_type="learned_absolute").to(device)
        self.model = model
        if self.ddp:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                    use_distributed_optimizer=False,
                                                    bucket_size=int(cfg.train.bucket_mb * 2**20 / 4))
            self.module = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=model)
        else:
            self.module = model
        named = list(model.named_parameters())  # 'embedding.*' takes no decay, as our 'emb' parameters
        self.optimizer = make_optimizer(
            [{"params": [p for n, p in named if wants_decay(n, p)], "weight_decay": cfg.train.weight_decay},
             {"params": [p for n, p in named if not wants_decay(n, p)], "weight_decay": 0.0}], cfg)
        s = cfg.train.seq_len
        # Megatron's mask: True = masked out (explicit: its default causal mask is made on "cuda")
        self.mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
        self.positions = torch.arange(s, device=device)[None]

    def wrap(self, model):
        return model

    def no_sync(self):
        return self.module.no_sync() if self.ddp else contextlib.nullcontext()

    def step(self) -> float:
        """One optimizer step on the global batch; the same math as PeerTrainer.step."""
        micro, count = self.begin_step()
        self.module.train()
        if self.ddp:
            self.module.zero_grad_buffer()
        total = torch.zeros((), device=self.device)
        for i, (xm, ym, _) in enumerate(micro):
            with contextlib.nullcontext() if i == len(micro) - 1 else self.no_sync():
                with self.autocast():  # per-token losses [b, s] (vocabulary-parallel cross-entropy under tp)
                    losses = self.module(xm, self.positions, self.mask, labels=ym)
                loss = losses.float().sum()
                (loss / count * self.data_world).backward()
            total += loss.detach()
        if self.ddp:
            self.module.finish_grad_sync()  # the all-reduce of the gradient buckets
            for p in self.model.parameters():
                p.grad = p.main_grad  # torch AdamW steps on Megatron's gradient buffers
            self.meter.record("all_reduce", "dp", 4 * sum(p.numel() for p in self.model.parameters()), 0.0)
        return self.end_step(total, count)

    def clip(self, max_norm: float) -> None:
        """Global norm: tp shards (Megatron marks them `tensor_model_parallel`) summed over tp, replicated
        tensors (norms, row-parallel biases, positions; identical on every tp rank) counted once."""
        grads = [(p.grad, bool(getattr(p, "tensor_model_parallel", False)))
                 for p in self.model.parameters() if p.grad is not None]
        sharded = torch.zeros((), device=self.device)
        replicated = torch.zeros((), device=self.device)
        for g, is_shard in grads:
            if is_shard:
                sharded += g.float().pow(2).sum()
            else:
                replicated += g.float().pow(2).sum()
        if self.tp_group is not None:
            dist.all_reduce(sharded, group=self.tp_group)
        scale = (max_norm / ((sharded + replicated).sqrt() + 1e-6)).clamp(max=1.0)
        for g, _ in grads:
            g.mul_(scale)


class Single(MegatronPeer):
    name = "megatron-single"


class TP(MegatronPeer):
    name = "megatron-tp"
    tp_all = True


class DDP(MegatronPeer):
    name = "megatron-ddp"
    ddp = True
