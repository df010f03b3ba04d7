"""The strategy matrix: what each name on `--strategies` runs, and which PyTorch peer it is measured against.

Every strategy trains the same model (same config, seed and initial weights) on the same global
batches; only the way the work is spread over the W ranks differs:

    single       1 process, default layout                                   (meshlm Trainer)
    dp           layout dp=W: bucketed all-reduce overlapped with backward    (meshlm Trainer)
    zero1|2|3    dp=W + layout.zero=K: optimizer states / +gradients / +parameters sharded
    ps           dp=W + train.grad_sync="ps": a parameter server on rank 0 (the classic baseline)
    dp-bf16, dp-powersgd  dp=W with compressed gradient all-reduce (train.compression): bf16 buffers
                 (half the bytes), PowerSGD rank 2 with error feedback (approximate: its loss curve departs)
    torch-ddp    our model wrapped in torch.nn.parallel.DistributedDataParallel
    torch-fsdp2  our model with torch.distributed.fsdp.fully_shard on every block, then the root
                 (reshard_after_forward=True: ZeRO-3-like)
    torch-fsdp2-z2  the same without resharding after forward (ZeRO-2-like)
    deepspeed-zero1|2|3  our model and AdamW in deepspeed.initialize with ZeRO stage 1, 2 or 3
                 (optional: the `peers` extra, pip install -e '.[peers]')
    megatron-single|tp|ddp  Megatron-core's own GPTModel at our model's shapes (GPT family), with our
                 batches, schedule, torch AdamW, clipping and loss normalisation: one process,
                 tensor_model_parallel_size=W, or its DistributedDataParallel at dp=W (optional: the
                 `peers` extra). Its initialisation is not ours: its curves compare with megatron-single's
    tp, tp-sp    layout tp=W (and sequence parallelism)                     (meshlm Trainer)
    torch-tp     our model's blocks split by DTensor parallelize_module
    pp-SCHEDULE  layout pp=W, 2W micro-batches, schedule gpipe|1f1b|interleaved (v=2)|zb
    torch-pp-SCHEDULE  the same stages under torch.distributed.pipelining's schedule of that name
                 (zb: ScheduleInterleavedZeroBubble, two stages per rank)
    cp           layout cp=W: context parallelism, each sequence split over the ranks (ring attention)
    moe-single   the run's model made a mixture of experts (8 experts, top-2, dropless), 1 process
    moe-dp       that MoE model, layout dp=W: every rank holds all experts
    ep           that MoE model, layout ep=W: experts split over the ranks, tokens sent by all-to-all
                 (the MoE rows compare their losses and step times with moe-single, not single)
    dp2-tp2, tp2-pp2, dp2-cp2, tp2-sp-cp2 (4 ranks), dp2-tp2-pp2, tp2-cp2-pp2, dp2-ep2-tp2 (MoE) (8 ranks):
                 hybrid layouts of fixed degrees, whatever --world-size says

Our strategies are nothing but settings overrides of `meshlm train`, so whatever the trainer
implements is what is measured; the peers are adapters in `peers/`, imported only when asked for.

`SUITES["full"]` is what `meshlm bench --suite full` runs at every world size: all of the above but
the optional DeepSpeed and Megatron-core peers (add them with --strategies). Each strategy has a
`family` (data, tensor, pipeline, context, expert, hybrid): the report's scaling curves are drawn per
family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError


@dataclass(frozen=True, kw_only=True)
class Strategy:
    name: str
    runner: str
    """'meshlm' (our Trainer) or a peer adapter in meshlm.bench.peers: 'module' (its class Peer) or 'module:Class'."""
    distributed: bool = True
    """Runs on the W ranks of --world-size; False: one process."""
    settings: dict[str, str] = field(default_factory=dict)
    """Settings overrides on top of the run's; '{world}' is replaced by the world size."""
    about: str = ""
    baseline: str = "single"
    """The one-process strategy of the same model: its losses are the reference, its step time the 'vs single'."""
    world: int = 0
    """A fixed number of ranks (a hybrid layout of fixed degrees); 0: --world-size."""
    family: str = "data"
    """What it splits: single, data, tensor, pipeline, context, expert or hybrid (the report's scaling panels)."""

    def overrides(self, world: int) -> dict[str, str]:
        return {k: v.replace("{2world}", str(2 * world)).replace("{world}", str(world))
                for k, v in self.settings.items()}

    def ranks(self, world: int) -> int:
        return self.world or (world if self.distributed else 1)

    @property
    def is_peer(self) -> bool:
        return self.runner != "meshlm"


PP_SCHEDULES = {"gpipe": "GPipe", "1f1b": "OneFOneB", "interleaved": "Interleaved", "zb": "ZeroBubble"}
"""Our pipeline schedules and the torch.distributed.pipelining peer class of each."""

MOE = {"model.n_experts": "8", "model.experts_per_token": "2", "model.moe_dropless": "true"}
"""What the MoE rows change in the run's model (8 experts divide ep = 2, 4 and 8)."""

HYBRID = [  # name, ranks, layout degrees, model changes
    ("dp2-tp2", 4, {"dp": "2", "tp": "2"}, {}),
    ("tp2-pp2", 4, {"tp": "2", "pp": "2", "micro_batches": "4"}, {}),
    ("dp2-cp2", 4, {"dp": "2", "cp": "2"}, {}),
    ("tp2-sp-cp2", 4, {"tp": "2", "sequence_parallel": "true", "cp": "2"}, {}),
    ("dp2-tp2-pp2", 8, {"dp": "2", "tp": "2", "pp": "2", "micro_batches": "2"}, {}),
    ("tp2-cp2-pp2", 8, {"tp": "2", "cp": "2", "pp": "2", "micro_batches": "4"}, {}),
    ("dp2-ep2-tp2", 8, {"dp": "2", "ep": "2", "tp": "2"}, MOE),
]
"""Hybrid (N-D) layouts of fixed degrees, at 4 and 8 ranks."""

STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy(name="single", runner="meshlm", distributed=False, about="default layout", family="single"),
    Strategy(name="dp", runner="meshlm", settings={"layout.dp": "{world}"},
             about="data parallel, bucketed all-reduce"),
    Strategy(name="zero1", runner="meshlm", settings={"layout.dp": "{world}", "layout.zero": "1"},
             about="ZeRO-1: optimizer states sharded"),
    Strategy(name="zero2", runner="meshlm", settings={"layout.dp": "{world}", "layout.zero": "2"},
             about="ZeRO-2: + gradients sharded"),
    Strategy(name="zero3", runner="meshlm", settings={"layout.dp": "{world}", "layout.zero": "3"},
             about="ZeRO-3: + parameters sharded"),
    Strategy(name="ps", runner="meshlm",
             settings={"layout.dp": "{world}", "train.grad_sync": "ps", "train.ps_ranks": "0"},
             about="parameter server on rank 0"),
    Strategy(name="dp-bf16", runner="meshlm", settings={"layout.dp": "{world}", "train.compression": "bf16"},
             about="data parallel, gradients all-reduced in bf16"),
    Strategy(name="dp-powersgd", runner="meshlm", settings={"layout.dp": "{world}", "train.compression": "powersgd"},
             about="data parallel, PowerSGD rank-2 gradient compression"),
    Strategy(name="tp", runner="meshlm", settings={"layout.tp": "{world}"}, family="tensor",
             about="tensor parallel (Megatron column/row, vocabulary-parallel head)"),
    Strategy(name="tp-sp", runner="meshlm", settings={"layout.tp": "{world}", "layout.sequence_parallel": "true"},
             about="tensor + sequence parallel", family="tensor"),
    Strategy(name="torch-ddp", runner="torch_ddp", about="torch DistributedDataParallel"),
    Strategy(name="torch-fsdp2-z2", runner="torch_fsdp2_z2",
             about="torch fully_shard without resharding after forward (ZeRO-2-like)"),
    Strategy(name="torch-tp", runner="torch_tp", about="torch DTensor parallelize_module on the blocks",
             family="tensor"),
    Strategy(name="torch-fsdp2", runner="torch_fsdp2", about="torch fully_shard per block (FSDP2)"),
    *[Strategy(name=f"pp-{sched}", runner="meshlm",
               settings={"layout.pp": "{world}", "layout.schedule": sched, "layout.micro_batches": "{2world}",
                         **({"layout.vpp": "2"} if sched == "interleaved" else {})},
               about=f"pipeline parallel, {sched} schedule, 2*pp micro-batches", family="pipeline")
      for sched in PP_SCHEDULES],
    *[Strategy(name=f"torch-pp-{sched}", runner=f"torch_pp:{cls}", settings={"layout.micro_batches": "{2world}"},
               about=f"torch.distributed.pipelining, {sched}", family="pipeline")
      for sched, cls in PP_SCHEDULES.items()],
    Strategy(name="cp", runner="meshlm", settings={"layout.cp": "{world}"}, family="context",
             about="context parallel: sequences split over the ranks, ring attention"),
    Strategy(name="moe-single", runner="meshlm", distributed=False, settings=MOE, baseline="moe-single",
             about="mixture of experts (8 experts, top-2), one process", family="single"),
    Strategy(name="moe-dp", runner="meshlm", settings={**MOE, "layout.dp": "{world}"}, baseline="moe-single",
             about="mixture of experts, data parallel: all experts on every rank", family="expert"),
    Strategy(name="ep", runner="meshlm", settings={**MOE, "layout.ep": "{world}"}, baseline="moe-single",
             about="mixture of experts, expert parallel: all-to-all dispatch", family="expert"),
    *[Strategy(name=name, runner="meshlm", world=w, about=f"hybrid layout {name}",
               settings={**{f"layout.{k}": v for k, v in degrees.items()}, **extra},
               baseline="moe-single" if extra else "single", family="hybrid")
      for name, w, degrees, extra in HYBRID],
    Strategy(name="deepspeed-zero1", runner="deepspeed_zero:Zero1", about="DeepSpeed ZeRO stage 1"),
    Strategy(name="deepspeed-zero2", runner="deepspeed_zero:Zero2", about="DeepSpeed ZeRO stage 2"),
    Strategy(name="deepspeed-zero3", runner="deepspeed_zero:Zero3", about="DeepSpeed ZeRO stage 3"),
    Strategy(name="megatron-single", runner="megatron:Single", distributed=False, baseline="megatron-single",
             about="Megatron-core GPTModel, one process", family="single"),
    Strategy(name="megatron-tp", runner="megatron:TP", about="Megatron-core GPTModel, tensor_model_parallel_size=W",
             baseline="megatron-single", family="tensor"),
    Strategy(name="megatron-ddp", runner="megatron:DDP", about="Megatron-core GPTModel, its DistributedDataParallel",
             baseline="megatron-single"),
]}

OPTIONAL_PEERS = ("deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3", "megatron-single", "megatron-tp",
                  "megatron-ddp")
"""Peers from the optional `peers` extra (DeepSpeed, Megatron-core): not in the full suite."""

SUITES: dict[str, list[str]] = {"full": [n for n in STRATEGIES if n not in OPTIONAL_PEERS]}
"""`--suite NAME`: the strategies it runs at every world size."""

FAMILIES = ("single", "data", "tensor", "pipeline", "context", "expert", "hybrid")

PEER_OF: dict[str, str] = {"dp": "torch-ddp", "zero1": "torch-ddp", "zero2": "torch-fsdp2-z2",
                           "zero3": "torch-fsdp2", "ps": "torch-ddp", "tp": "torch-tp", "tp-sp": "torch-tp",
                           **{f"pp-{sched}": f"torch-pp-{sched}" for sched in PP_SCHEDULES}}
"""The PyTorch peer each of our distributed strategies is compared with (step-time ratio ours/peer)."""


def parse_strategies(text: str) -> list[Strategy]:
    """'single,dp,torch-ddp' -> the strategies, in the order given; ConfigError on an unknown or repeated name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--strategies ({text!r}) names no strategy; choose from: {', '.join(STRATEGIES)}")
    out = []
    for name in names:
        if name not in STRATEGIES:
            raise ConfigError(f"unknown strategy {name!r} in --strategies; choose from: {', '.join(STRATEGIES)}")
        if STRATEGIES[name] in out:
            raise ConfigError(f"strategy {name!r} appears twice in --strategies")
        out.append(STRATEGIES[name])
    return out
