"""Cost model of one training step: compute, communication per axis, pipeline bubble, memory per rank.

Notation: b micro-batch (sequences), s sequence length, d hidden, f feed-forward width, kv the
key/value width (n_kv_heads * head_dim), V vocabulary, L layers, t/c/e/p/n the tp/cp/ep/pp/dp-group
degrees, m micro-batches per step and data-parallel rank (m = global_batch / (dp * ep * b)).

Compute (FLOPs of one layer's forward for one micro-batch, counting a multiply-add as 2):

    projections    2bs(2d^2 + 2d*kv)                 q, o: d x d;  k, v: d x kv
    attention      4bs^2 d                           QK^T and softmax(.)V, causal mask not discounted
    MLP            2bs(n_in + 1) d f                 n_in = 2 for SwiGLU, 1 for GELU
    MoE MLP        2bs d E + k * (the MLP above)     router + the k experts each token visits
    output layer   2bs d V                           once per step's micro-batch, on the last stage

Per rank each is divided by t*c (tensor and context parallelism; expert parallelism splits the batch,
so a rank's expert work is the k/E share of the tokens of ep ranks: the same count). Backward costs
2x forward; full recomputation adds one forward of every layer, selective one of the attention core
(Korthikanti et al. 2022). Summed over a GPT with f = 4d this is Narayanan et al. 2021's (eq. 3)
96 B s L d^2 (1 + s/(6d) + V/(16 L d)) with full recomputation.

A rank runs its GEMMs at `peak * efficiency(d/t)`, a saturating function of the per-rank matrix width
(small GEMMs under-fill the GPU and the memory-bound element-wise work weighs more):

    efficiency(x) = E_MAX * x / (x + X0)

with E_MAX, X0 fitted once (by least squares, not per row) to Table 1 of Narayanan et al. 2021; see
tests/assets/plan/narayanan2021_table1.json.

Communication, alpha-beta model, n ranks, B bytes per rank, bandwidth bw, latency alpha:

    ring all-reduce        2(n-1)/n * B/bw + 2(n-1) alpha
    all-gather, reduce-scatter   (n-1)/n * B/bw + (n-1) alpha     (B = the whole, gathered size)
    all-to-all             (n-1)/n * B/bw + (n-1) alpha
    point-to-point         B/bw + alpha

An axis' group uses the intra-node link when it lies inside one node: ranks are placed tp fastest,
then cp, ep, dp, pp (layout.AXES reversed), each node holding gpus_per_node consecutive ranks as
torchrun numbers them; `meshlm.mesh.axis_nodes`, which the trainer's placement table and warnings
use too, decides. Otherwise the inter-node link (the ring's slowest hop).

    tp    per layer and micro-batch, 2 all-reduces of bs d in forward and 2 in backward (+2 under full
          recomputation); under sequence parallelism 2 all-gathers and 2 reduce-scatters each way (the
          same ring time), and where nothing hides it (the CPU) 2 more all-gathers in backward (the inputs
          gathered again for the weight gradients). Per micro-batch the vocabulary-parallel embedding
          and head add 2 all-reduces of bs d and the loss 3 of one number per token. Not overlapped.
    cp    ring attention: c-1 passes of this rank's k and v (2 b(s/c) kv) per layer forward, c+1 in
          backward (k, v with the travelling fp32 dk, dv, and a last hop home); hidden behind the
          attention core, only the excess counts.
    ep    4 all-to-alls of b(s/c) k d per MoE layer and micro-batch (dispatch and combine, forward and
          backward; +2 under full recomputation) and one of the token counts. Not overlapped.
    pp    one activation b(s/c) d (/t under sequence parallelism) per stage boundary, given to the
          schedule simulation as its t_comm.
    dp    gradients of the dense parameters all-reduced over dp*ep*cp (experts over dp*cp), once a
          step, one call per DP_BUCKET_BYTES bucket; overlapped with the backward of the step's last
          micro-batch except the last bucket. ZeRO-1/2: reduce-scatter of gradients (overlapped
          likewise) + all-gather of the updated parameters (not overlapped), one call per flat group (two
          per block and one for the rest). ZeRO-3 instead all-gathers the parameters in forward and in
          backward of every micro-batch (once a step under pp, as meshlm/parallel/zero.py does),
          prefetched: only what exceeds the compute it hides behind counts. Compressed (train.compression,
          plain dp only): every bucket reduced after the backward, as parallel/data.py does; bf16/fp16
          send 2 bytes an element; PowerSGD rank r sends (n + m) r per n x m matrix in two calls (P,
          then Q) and the vectors whole in a third; on the CPU the local work per element and per tensor
          is calibrated (hardware._compression_overhead).
    step  the loss and the gradient norm: STEP_ALL_REDUCES small all-reduces over every rank; tied
          embeddings under pp: their gradient all-reduced between the first and the last stage.

Pipeline: the action table of `schedules.build(schedule, p, m, v)` is run by `schedules.simulate` with
a stage's t_f, t_b (for zb: B the backward less its weight GEMMs, W a whole backward, as meshlm's
autograd split does) and t_comm, the last stage's actions carrying the
output layer and the loss as well (so the other stages wait for it: an unbalanced pipeline's bubble);
its makespan is the step's pipeline time and its bubble is reported. Simulations are cached by their
normalised arguments, and for tables larger than SIMULATE_MAX_ACTIONS the closed form
(m + (p-1)/v)(t_f + t_b) + 2(m + p - 1) t_comm (every stage as slow as the last) is used instead.
Between the two, the makespan is extrapolated linearly in m from simulations at m = 2p and 3p (past
warm-up the schedule is periodic).

Memory per rank (the larger of the first and the last pipeline stage):

    params/grads/optim    zero_state_bytes(psi, n, stage) with, per parameter, bf16/fp16 training:
                          2 bytes of weights, 4 of fp32 gradients (Megatron's main_grad), 12 of fp32
                          master weights and Adam m, v = 18 bytes (Megatron's convention; its
                          distributed optimizer is ZeRO-1: 6 + 12/n); fp32: 4 + 4 + 8 = 16.
                          Under pp, ZeRO-2/3 keep the stage's whole gradients (and parameters) during
                          the schedule (meshlm/parallel/zero.py), so they count as ZeRO-1 there.
    activations           memory.korthikanti_bytes_per_layer (s/c for the sequence; x2 for fp32) times
                          the layers of a chunk (L/(p v)) times the chunks in flight on each pipeline rank,
                          read off the schedule's action table (pipeline_activation_bytes: from a chunk's F
                          to its B, or to its W under zb, as meshlm's runtime keeps it; 1F1B gives rank r
                          min(m, p - r), interleaved v p + p - 1 - 2r, GPipe m v; Narayanan et al. 2021);
                          without pp one micro-batch of L layers. Full recomputation adds one layer's full
                          activations (the one being recomputed). The last stage adds the loss: at its
                          peak 6 bytes per element (bf16 logits, fp32 softmax) of b(s/c)V/t, on the CPU in
                          fp32 16 (logits, log-probabilities and both gradients), and 4 (the fp32 softmax)
                          for every other micro-batch it holds for the backward (GPipe: all of them).
    buffers               10% of the above + 1 GB (allocator fragmentation, NCCL and CUDA workspaces,
                          DP buckets), plus under ZeRO-3 two gathered layers (the one in use, the prefetch).

This machine (gpu 'cpu', figures from `meshlm plan --calibrate`, hardware.calibrate_cpu): W ranks are
W processes sharing the machine's cores, each running max(1, cores // W) threads (as `meshlm bench` and
`launch_local` set them; one process uses every core). Every rate below is calibrated, at the rank's thread
count, on shapes no bench row uses:

    GEMMs            FLOP/s of one process at per-rank width d/t (no GPU efficiency curve); ranks that
                     compute at once each get the rate calibrated with `cores` 1-thread processes running
                     the GEMM probe together (`share`: they share caches, the memory bus and clocks; two
                     hyperthreads of one core would each get about half)
    attention core   the fused kernel's own FLOP/s by head size (small heads run far below the GEMMs)
    output layer     its GEMMs (d x V/t: a short inner dimension, a wide output) and the loss's
                     log-softmax (exp-bound), both by the size of the logits: they slow down 2-3x once
                     the logits outgrow the caches
    element-wise     memory-bound: 3 passes (forward write, backward read and gradient write) over a
                     layer's activations (Korthikanti's, no recomputation) and the logits, and AdamW's 7
                     fp32 reads/writes per parameter the rank updates, at the element-wise bandwidth
                     (the machine's, split among the running processes)
    framework        Python, dispatcher, autograd and the optimizer loop: a time per block and micro-batch
                     and per step, from a model too small to compute anything; a MoE block adds its router
                     and dispatch and a time per expert the rank holds
    ring attention   context parallelism's c ring steps per forward and per backward each cost the CPU
                     time of posting and receiving a k/v block, the merge and the Python around them,
                     beyond the fused kernels (calibrated at cp = 2: `ring_step_s`, 0.7-1 ms here)
    compute_scale    the measured / modelled ratio of a real training step of a small calibration model
                     (width 192, 2 blocks, one process at 1 thread) multiplies the compute

Collectives: each uses its calibrated (alpha, bandwidth) at the group's size (the nearest calibrated world
size) in the formulas above. Communication is not hidden behind compute once the ranks' threads fill the
cores (gloo copies and reduces with those cores). Those rates give the critical path (the pipeline
simulation and the exposed communication), and the step is the larger of it and a throughput bound:

    W <= cores       a call costs at least what it costs between compute bursts in a job of W processes
                     (`measure_loaded`: waiting for every member, and gloo's own threads, to be scheduled);
                     the throughput bound is the ranks' busy time shared by the cores plus the communication
                     the busiest rank waits for
    W > cores        the processes take turns on the cores (an idle pipeline stage gives its core away), so
                     the step is their CPU time shared by the cores, times the calibrated crowding (wall /
                     (CPU / cores) of a loaded probe job: waking, switching, moments with too few ready to
                     run). A rank's CPU time is its busy time plus each call's calibrated CPU time (gloo's
                     threads included, at W processes): between compute bursts for tensor and expert
                     parallelism's calls and the step's all-reduces, queued (QUEUED launched at once) for data
                     parallelism's buckets and ZeRO's groups, back to back for the pipeline's transfers (a
                     peer waits for them). The critical path then uses the idle figures, as waiting for the
                     others is already in that CPU time. With 8 processes on 2 cores a 16 KB all-reduce costs
                     each rank some 4.5 ms of CPU and the loop 24 ms of wall time.

Memory has no GPU allocator/NCCL allowance: buffers are CPU_BUFFER_FRACTION of the
rest plus the calibrated runtime memory of a training process (allocator arenas, workspaces, gradient
buckets: a 2-rank gpt-tiny job's first steps), to be compared with the peak resident set minus the one
before the model was built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from ..config import ConfigError, ModelConfig, is_moe_layer, param_count
from ..layout import AXES, Layout, LayoutError, validate
from ..memory import korthikanti_bytes_per_layer
from ..mesh import axis_nodes
from ..parallel import schedules
from ..parallel.zero import zero_state_bytes
from .hardware import GPU, Cluster, cluster

E_MAX = 0.65
"""Efficiency a GEMM-bound layer reaches at very large per-rank widths (fraction of peak)."""
X0 = 128.0
"""Per-rank width d/t at which the efficiency is half of E_MAX."""
DP_BUCKET_BYTES = 25e6
"""Gradient bucket (PyTorch DDP's default 25 MB): the last one is reduced after backward, exposed."""
BUFFER_FRACTION = 0.10
BUFFER_BYTES = 1e9
CPU_BUFFER_FRACTION = 0.10
"""The CPU's buffers: a stated 10% of the modelled bytes (gloo buffers, autograd temporaries), no fixed part."""
SIMULATE_MAX_ACTIONS = 4000
"""Largest table (p*m*v actions) simulated; larger ones are extrapolated from m = 2p, 3p, or above
3p*p*v actions use the closed form."""
PRECISIONS = ("bf16", "fp16", "fp32")
BYTES_PER_PARAM = {"bf16": (2, 4, 12), "fp16": (2, 4, 12), "fp32": (4, 4, 8)}
"""(weights, gradients, optimizer states) bytes per parameter by training precision."""
RECOMPUTE = ("none", "selective", "full")


def efficiency(width: float) -> float:
    """Fraction of peak FLOP/s a rank's GEMMs reach at per-rank width `width` (= d_model / tp)."""
    return E_MAX * width / (width + X0)


# --- collectives (alpha-beta) ----------------------------------------------------------------------

def all_reduce_time(nbytes: float, n: int, bw: float, alpha: float) -> float:
    """Ring all-reduce of `nbytes` over n ranks: 2(n-1)/n * B/bw + 2(n-1) alpha."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha


def all_gather_time(nbytes: float, n: int, bw: float, alpha: float) -> float:
    """Ring all-gather (or reduce-scatter) whose gathered size is `nbytes`: (n-1)/n * B/bw + (n-1) alpha."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw + (n - 1) * alpha


reduce_scatter_time = all_gather_time


def all_to_all_time(nbytes: float, n: int, bw: float, alpha: float) -> float:
    """All-to-all of `nbytes` per rank: (n-1)/n of it leaves the rank; (n-1) alpha."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw + (n - 1) * alpha


def p2p_time(nbytes: float, bw: float, alpha: float) -> float:
    return nbytes / bw + alpha


COLLECTIVE_TIME = {"all_reduce": all_reduce_time, "all_gather": all_gather_time, "reduce_scatter": reduce_scatter_time,
                   "all_to_all": all_to_all_time, "p2p": lambda nbytes, n, bw, alpha: p2p_time(nbytes, bw, alpha)}
STEP_ALL_REDUCES = 2
"""Small all-reduces over every rank once a step: the loss and the gradient norm."""


def axis_link(layout: Layout, axes: tuple[str, ...], net: Cluster) -> tuple[int, float, float]:
    """(group size, bandwidth, latency) of the group spanning `axes` (adjacent in the rank grid)."""
    size = math.prod(layout.degrees[a] for a in axes)
    inside = axis_nodes(layout, axes, gpus_per_node=net.gpus_per_node) == 1  # the runtime's placement (meshlm.mesh)
    bw, alpha = net.link(inside_node=inside)
    return size, bw, alpha


# --- the prediction --------------------------------------------------------------------------------

@dataclass
class Prediction:
    layout: Layout
    micro_batch: int
    recompute: str
    step_time_s: float
    compute_s: float
    """Busy compute time of the slowest rank in a step (GEMMs at the modelled efficiency)."""
    comm_s: dict[str, float]
    """Exposed (not hidden) communication time per axis in a step."""
    bubble: float
    tokens_per_s: float
    tflops_per_gpu: float
    """Model FLOPs (6N per token plus attention, no recomputation) per second per GPU."""
    hw_tflops_per_gpu: float
    """Hardware FLOPs (with recomputation, as Narayanan et al. count) per second per GPU."""
    mfu: float
    memory_bytes: dict[str, float]
    """Per rank (the larger stage): params, grads, optim, activations, buffers."""
    gpu_memory_bytes: float
    fits: bool
    detail: dict = field(default_factory=dict)

    @property
    def total_memory_bytes(self) -> float:
        return sum(self.memory_bytes.values())

    def describe(self) -> str:
        return self.layout.describe()

    def as_dict(self) -> dict:
        lay = self.layout
        return {"layout": {k: getattr(lay, k) for k in ("dp", "tp", "pp", "ep", "cp", "zero", "vpp",
                                                        "sequence_parallel", "micro_batches", "schedule")},
                "micro_batch": self.micro_batch, "recompute": self.recompute, "step_time_s": self.step_time_s,
                "compute_s": self.compute_s, "comm_s": self.comm_s, "bubble": self.bubble,
                "tokens_per_s": self.tokens_per_s, "tflops_per_gpu": self.tflops_per_gpu,
                "hw_tflops_per_gpu": self.hw_tflops_per_gpu, "mfu": self.mfu, "memory_bytes": self.memory_bytes,
                "total_memory_bytes": self.total_memory_bytes, "gpu_memory_bytes": self.gpu_memory_bytes,
                "fits": self.fits}


def layer_flops(model: ModelConfig, *, b: int, s: int, moe: bool) -> dict[str, float]:
    """Forward FLOPs of one layer for b sequences of s tokens: {'linear', 'attention', 'expert'}."""
    d, f, kv = model.d_model, model.d_ff, model.kv_heads * model.head_dim
    n_in = 2 if model.activation == "swiglu" else 1
    mlp = 2 * b * s * (n_in + 1) * d * f
    out = {"linear": 2 * b * s * (2 * d * d + 2 * d * kv), "attention": 4 * b * s * s * d, "expert": 0.0}
    if moe:
        out["linear"] += 2 * b * s * d * model.n_experts
        out["expert"] = (model.experts_per_token + model.moe_shared_experts) * mlp
    else:
        out["linear"] += mlp
    return out


def _expert_params(model: ModelConfig) -> int:
    """Parameters of all experts of all MoE layers (sharded over ep)."""
    if not model.n_experts:
        return 0
    d, f = model.d_model, model.d_ff
    n_in = 2 if model.activation == "swiglu" else 1
    mlp = n_in * d * f + f * d + (n_in * f + d if model.bias else 0)
    n_moe = sum(is_moe_layer(model, i) for i in range(model.n_layers))
    return n_moe * model.n_experts * mlp


def _compression_rank(compression: str) -> int:
    """PowerSGD's rank for train.compression (0: a bf16/fp16 cast or none), parsed by the trainer's own
    make_compressor; ConfigError for anything it refuses."""
    from ..parallel.compress import make_compressor

    try:
        compressor = make_compressor(compression)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return getattr(compressor, "rank", 0)


@lru_cache(maxsize=256)
def _grad_tensors(model: ModelConfig, vocab: int, rank: int, layers: float, t: int
                  ) -> tuple[float, float, float, float]:
    """(gradient tensors, matrices PowerSGD of `rank` compresses, the elements it sends for their P and Q
    together, their elements) of a rank holding `layers` blocks and the embedding and head, with tensor shards
    1/t: counted on one block and the rest of the model built on the meta device (parallel/compress.py's rule:
    a tensor is an n x (numel / n) matrix, compressed when n m >= 2 (n + m) r)."""
    import dataclasses

    import torch

    from ..model import Transformer

    with torch.device("meta"):
        one = Transformer(dataclasses.replace(model, n_layers=1, vocab_size=vocab))
    found = {"block": [0, 0, 0, 0], "rest": [0, 0, 0, 0]}
    for name, param in one.named_parameters():
        part = found["block" if ".0." in f".{name}." else "rest"]
        part[0] += 1
        n = param.shape[0] if param.dim() >= 2 else 0
        m = param.numel() // max(n, 1)
        r = min(rank, n, m)
        if rank and n and n * m >= 2 * (n + m) * r:
            part[1] += 1
            part[2] += (n + m) * r / t
            part[3] += n * m / t
    blk, rest = found["block"], found["rest"]
    return tuple(layers * x + y for x, y in zip(blk, rest))


@lru_cache(maxsize=1024)
def _live_at_forwards(schedule: str, p: int, m: int, v: int) -> tuple[tuple[tuple[int, int, bool], ...], ...]:
    """Per pipeline rank, what is alive at its forwards (where its activation memory peaks), read off the
    schedule's action table: (chunks in flight, loss chunks among them before this one, whether this forward
    computes the loss), the Pareto-largest of them.

    A (micro-batch, chunk) is in flight from its F to its B, or to its W in tables that have W's (zb): meshlm's
    runtime keeps a micro-batch's saved tensors until its weight gradient is done (bench activation probe: the
    last of 4 zb stages holds 4 micro-batches, 1F1B's 1). The loss chunk is the last rank's last chunk. Past
    warm-up the peaks no longer grow with m (every schedule but GPipe frees one per forward), so tables are
    read at m <= 3p; GPipe's is every chunk, in closed form."""
    if schedule == "gpipe":
        return tuple(((m * v, m - 1 if r == p - 1 else 0, r == p - 1),) for r in range(p))
    table = schedules.build(schedule, p=p, m=min(m, 3 * p), v=v)
    frees = "W" if any(a.kind == "W" for rank in table for a in rank) else "B"
    out = []
    for rank, actions in enumerate(table):
        live: set[tuple[int, int]] = set()
        found: set[tuple[int, int, bool]] = set()
        for a in actions:
            if a.kind == "F":
                loss = rank == p - 1 and a.chunk == v - 1
                found.add((len(live) + 1, sum(ch == v - 1 for _, ch in live) if rank == p - 1 else 0, loss))
                live.add((a.mb, a.chunk))
            elif a.kind == frees:
                live.discard((a.mb, a.chunk))
        out.append(tuple(x for x in found if not any(y != x and all(yi >= xi for yi, xi in zip(y, x))
                                                      for y in found)))
    return tuple(out)


def pipeline_activation_bytes(schedule: str, *, p: int, m: int, v: int, chunk: float, loss_saved: float,
                              loss_peak: float) -> list[float]:
    """Per pipeline rank, the peak bytes of activations: `chunk` per (micro-batch, chunk) in flight, plus
    `loss_saved` per micro-batch whose loss is held for its backward (the log-probabilities) and `loss_peak`
    for the one whose loss is being computed (logits, log-probabilities and their gradients at once)."""
    if p == 1:
        return [chunk + loss_peak]
    return [max(n * chunk + held * loss_saved + (loss_peak if now else 0.0) for n, held, now in rank)
            for rank in _live_at_forwards(schedule, p, m, v)]


@lru_cache(maxsize=4096)
def _simulated(schedule: str, p: int, m: int, v: int, t_b: float, t_w: float, t_comm: float,
               last: tuple[float, float, float]) -> tuple[float, float]:
    """(makespan, bubble) for t_f = 1 and the other costs relative to it (rounded by the caller)."""
    timeline = schedules.simulate(schedules.build(schedule, p=p, m=m, v=v), t_f=1.0, t_b=t_b, t_w=t_w,
                                  t_comm=t_comm, last=last)
    return timeline.makespan, timeline.bubble


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def pipeline_time(schedule: str, *, p: int, m: int, v: int, t_f: float, t_b: float, t_w: float,
                  t_comm: float, simulate: bool = True, last: tuple[float, float, float] = (0.0, 0.0, 0.0)
                  ) -> tuple[float, float]:
    """(makespan, bubble) of one step's pipeline; t_f, t_b, t_w are a micro-batch's times through a rank's
    layers (t_b is the input-gradient part of the backward when t_w > 0, zb; else the whole backward) and
    `last` = (f, b, w) what the last stage adds to its actions (the output layer and the loss)."""
    if p == 1:
        return m * (t_f + t_b + t_w + sum(last)), 0.0
    costs = (_round(t_b / t_f), _round(t_w / t_f), _round(t_comm / t_f), tuple(_round(x / t_f) for x in last))
    if simulate and p * m * v <= SIMULATE_MAX_ACTIONS:
        span, bubble = _simulated(schedule, p, m, v, *costs)
        return span * t_f, bubble
    work = m * (t_f + t_b + t_w + sum(last) / p)  # per rank, on average
    if simulate and schedule != "gpipe" and 3 * p * p * v <= SIMULATE_MAX_ACTIONS:
        # past warm-up the schedule repeats with period p micro-batches: the makespan is linear in m there,
        # so simulate m = 2p and 3p and extrapolate (exact for a periodic steady state)
        s2, _ = _simulated(schedule, p, 2 * p, v, *costs)
        s3, _ = _simulated(schedule, p, 3 * p, v, *costs)
        span = (s2 + (m - 2 * p) * (s3 - s2) / p) * t_f
        return span, 1 - work / span
    f, b, w = t_f + last[0], t_b + last[1], t_w + last[2]  # closed form: every stage as slow as the last
    if schedule == "zb":
        idle = (p - 1) * (f + b - w)
    else:
        idle = (p - 1) / v * (f + b + w)
    span = m * (f + b + w) + idle + 2 * (m + p - 1) * t_comm
    return span, 1 - work / span


def predict(model: ModelConfig, layout: Layout, *, gpus_per_node: int | None = None, gpu: str | GPU = "h100",
            global_batch: int, micro_batch: int, seq_len: int, precision: str = "bf16",
            recompute: str = "none", attention: str = "flash", dp_overlap: bool = True, simulate: bool = True,
            net: Cluster | None = None, compression: str = "none") -> Prediction:
    """Predict step time, throughput and memory per rank of `model` trained under `layout`.

    layout.micro_batches is derived (global_batch / (dp * ep * micro_batch)); raises ConfigError when
    the batch does not split or the layout is invalid for the model. attention='flash' (fused kernel,
    Dao et al. 2022) saves no a*s*s scores, so its activations are Korthikanti's 'selective' ones
    whatever the recompute mode, and its backward recomputes the scores (+half the attention core's
    forward FLOPs: FlashAttention-2's backward is 2.5x its forward); attention='math' (what Megatron
    ran in 2021) saves them. dp_overlap=False reduces the gradients after the backward instead of
    during it (Megatron-LM before its 2023 overlap_grad_reduce, so in Narayanan et al. 2021).
    compression is train.compression's gradient compression (none, bf16, fp16, powersgd, powersgd:R; plain dp
    only, as the trainer allows).
    """
    if attention not in ("flash", "math"):
        raise ConfigError(f"attention ({attention!r}) must be 'flash' or 'math'")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision ({precision!r}) must be one of: {', '.join(PRECISIONS)}")
    if recompute not in RECOMPUTE:
        raise ConfigError(f"recompute ({recompute!r}) must be one of: {', '.join(RECOMPUTE)}")
    for name, value in (("global_batch", global_batch), ("micro_batch", micro_batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} ({value!r}) must be a positive integer")
    power_rank = _compression_rank(compression)
    net = net or cluster(gpu, gpus_per_node=gpus_per_node)
    spec = net.gpu
    split = layout.dp * layout.ep * micro_batch
    if global_batch % split:
        raise ConfigError(f"global_batch ({global_batch}) must be divisible by dp*ep*micro_batch ({split})")
    m = global_batch // split
    if layout.pp > 1 and layout.vpp > 1 and layout.schedule != "interleaved":
        layout = layout.replace(schedule="interleaved")
    layout = layout.replace(micro_batches=m)
    try:
        validate(layout, model, seq_len=seq_len, batch_size=global_batch // micro_batch)
    except LayoutError as e:
        raise ConfigError(f"layout: {e}") from None
    if compression != "none" and layout.zero:
        raise ConfigError(f"compression ({compression!r}) works with plain data parallelism only (zero is "
                          f"{layout.zero})")
    vocab = model.vocab_size or 50257
    d, L = model.d_model, model.n_layers
    t, c, e, p, v = layout.tp, layout.cp, layout.ep, layout.pp, layout.vpp
    b, s_loc = micro_batch, seq_len // c
    act = 4 if precision == "fp32" else 2
    peak = spec.peak_flops(precision)
    eff = efficiency(d / t)
    rate = attn_rate = head_rate = peak * eff
    on_cpu = spec.name == "cpu"
    world = layout.world_size
    n_moe = sum(is_moe_layer(model, i) for i in range(L))
    moe_frac = n_moe / L
    slots = world  # ranks that compute at once
    if on_cpu:  # W processes share the cores: cores // W threads each (at least 1), time-sliced beyond
        cores = max(1, spec.gpus_per_node)
        threads = max(1, cores // world)
        slots = max(1, cores // threads)
        measured = spec.gemm_rate(d / t, threads)
        if measured is None:
            measured = spec.peak_flops(precision) * threads * E_MAX
        # a rank's rate while it runs: what each of `cores` 1-thread processes computing at once gets (two on
        # two hyperthreads do not each run at the 1-thread rate); more processes than cores wait for a core,
        # which the throughput bound at the end counts, not these rates
        share = spec.gemm_share(d / t, min(world, cores)) if threads == 1 else None
        if share is None:  # not calibrated: from one process's all-core rate
            machine = spec.gemm_rate(d / t, cores) or measured * cores / threads
            share = min(1.0, machine * threads / cores / measured)
        rate = measured * share / spec.compute_scale
        # the attention core runs in a fused kernel whose rate depends on the head size (small heads: far below
        # the GEMMs'), calibrated at this thread count and shared as the GEMMs are (a process's own threads
        # scale it worse than separate processes do, so its all-core figure is no guide)
        attn = spec.attention_rate(model.head_dim, threads)
        if attn is not None:
            attn_rate = attn * share / spec.compute_scale
        # the output layer's GEMMs (a short inner dimension d, a wide vocabulary shard): their own rate
        out_gemm = spec.head_rate(d, threads, b * s_loc * vocab / t)
        if out_gemm is not None:
            head_rate = out_gemm * share / spec.compute_scale
        eff = rate / (peak * cores)
        # the memory bus is shared: the running processes split the machine's element-wise bandwidth
        mem_rate = min(spec.mem_rate(threads), spec.mem_rate(cores) / min(world, cores))
        # gloo moves and reduces bytes with the CPU: once the ranks' threads fill the cores, nothing hides
        # communication (no idle core to run it on), so it adds to the compute instead of overlapping it
        hide = world * threads < cores
        # more processes than cores, and the collectives' CPU time calibrated: the step is bound by the CPU time
        saturated = world > cores and bool(spec.loaded_cpu)
        dp_overlap = dp_overlap and hide
        # Python, the dispatcher and autograd: a fixed time per block and micro-batch, and per step (calibrated)
        t_over_layer, t_over_step = spec.layer_overhead_s, spec.step_overhead_s
        if model.n_experts:  # a MoE block's router and dispatch, and the loop over the experts this rank holds
            t_over_layer += moe_frac * (spec.moe_overhead_s + spec.expert_overhead_s * model.n_experts / layout.ep)
    else:
        hide, saturated = True, False
        t_over_layer = t_over_step = 0.0

    def coll(op: str, nbytes: float, n: int, bw: float, a: float) -> float:
        """Seconds of one `op` call over n ranks: the calibrated (alpha, bandwidth) at n on this machine, and
        a latency no lower than what a call costs between compute bursts (waiting for every member to run)."""
        if n <= 1:
            return 0.0
        formula = COLLECTIVE_TIME[op]
        if not on_cpu:
            return formula(nbytes, n, bw, a)
        idle = formula(nbytes, n, *(spec.collective(op, n) or (bw, a)))
        if saturated:  # waiting for the others to be scheduled is in the throughput bound's CPU time
            return idle
        loaded = spec.loaded_link(op, world)
        return max(idle, formula(nbytes, n, *loaded)) if loaded else idle

    # --- compute per micro-batch and stage
    layers_stage = L / p
    dense = layer_flops(model, b=b, s=seq_len, moe=False)
    moe = layer_flops(model, b=b, s=seq_len, moe=True)
    per_layer = {k: (1 - moe_frac) * dense[k] + moe_frac * moe[k] for k in dense}
    fwd_layer = sum(per_layer.values()) / (t * c)  # FLOPs per rank
    attn_layer = per_layer["attention"] / (t * c)
    head = 2 * b * seq_len * d * vocab / (t * c)
    # seconds of the attention core's FLOPs at the GEMM rate -> at the attention kernel's own rate
    core = attn_layer / attn_rate - attn_layer / rate
    extra = {"none": 0.0, "selective": attn_layer, "full": fwd_layer}[recompute] / rate
    if recompute != "none":
        extra += core
    if attention == "flash" and recompute != "full":
        extra = attn_layer / 2 / attn_rate  # the fused backward recomputes the scores; 'selective': no more
    t_layer_f = fwd_layer / rate + core
    t_core = attn_layer / attn_rate

    t_elem = t_elem_head = 0.0
    if on_cpu:  # element-wise work is memory-bound: the forward writes the saved activations and logits once,
        # the backward reads them and writes their gradients (3 passes in all), at the calibrated bandwidth
        full_act = korthikanti_bytes_per_layer(s=s_loc, b=b, h=d, a=model.n_heads, t=t,
                                               sequence_parallel=layout.sequence_parallel, recompute="none")
        t_elem = full_act * act / 2 / mem_rate * spec.compute_scale  # per layer
        t_elem_head = b * s_loc * vocab / t * act / mem_rate * spec.compute_scale
        sm = spec.softmax(threads, b * s_loc * vocab / t)
        if sm:  # the cross-entropy's exp per logit is compute-bound: its calibrated rate, shared like the GEMMs
            sm *= share
            t_elem_head += b * s_loc * vocab / t / sm / 3  # forward + backward measured together; counted 3x

    # --- communication inside a stage, per layer and micro-batch (forward, backward)
    tp_n, tp_bw, tp_a = axis_link(layout, ("tp",), net)
    cp_n, cp_bw, cp_a = axis_link(layout, ("cp",), net)
    ep_n, ep_bw, ep_a = axis_link(layout, ("ep",), net)
    pp_n, pp_bw, pp_a = axis_link(layout, ("pp",), net)
    tp_bytes = b * s_loc * d * act
    kv_bytes = 2 * b * s_loc * model.kv_heads * model.head_dim * act

    def stage_comm(cost, *, hide: bool) -> dict[str, float]:
        """Seconds of a stage's collectives per layer and micro-batch (tp_f, tp_b, cp_f, cp_b, ep_f, ep_b), per
        micro-batch of the embedding and head (tp_head) and of one pipeline transfer (p2p), each call costing
        cost(op, nbytes, n, bw, alpha); with `hide`, what the GPU overlaps with compute is left out."""
        if layout.sequence_parallel:  # an all-gather before and a reduce-scatter after attention and the MLP;
            # the backward swaps them and gathers the inputs again for the weight gradients (hidden on a GPU)
            ag = cost("all_gather", tp_bytes, tp_n, tp_bw, tp_a)
            rs = cost("reduce_scatter", tp_bytes, tp_n, tp_bw, tp_a)
            tp_f, tp_b = 2 * (ag + rs), 2 * (ag + rs) + (0.0 if hide else 2 * ag)
            tp_full = 2 * (ag + rs)
        else:
            ar = cost("all_reduce", tp_bytes, tp_n, tp_bw, tp_a)
            tp_f, tp_b, tp_full = 2 * ar, 2 * ar, 2 * ar
        if recompute == "full":
            tp_b += tp_full
        # the vocabulary-parallel embedding and head: the embedding's output and the head input's gradient
        # (whole activations), the loss's max, sum of exponentials and target logit (one number per token)
        tp_head = (2 * cost("all_reduce", tp_bytes, tp_n, tp_bw, tp_a)
                   + 3 * cost("all_reduce", b * s_loc * 4, tp_n, tp_bw, tp_a))
        # ring attention: c-1 passes of k, v forward; backward c-1 of k, v with the travelling fp32 dk, dv and
        # 2 more
        cp_pass_f = (cp_n - 1) * cost("p2p", kv_bytes, cp_n, cp_bw, cp_a)
        cp_pass_b = (cp_n + 1) * cost("p2p", kv_bytes * (1 + 4 / act), cp_n, cp_bw, cp_a) if cp_n > 1 else 0.0
        a2a = cost("all_to_all", b * s_loc * model.experts_per_token * d * act, ep_n, ep_bw, ep_a)
        a2a_counts = cost("all_to_all", 4 * ep_n * model.n_experts, ep_n, ep_bw, ep_a)  # tokens per expert
        return {"tp_f": tp_f, "tp_b": tp_b, "tp_head": tp_head,
                "cp_f": max(0.0, cp_pass_f - t_core) if hide else cp_pass_f,
                "cp_b": max(0.0, cp_pass_b - 2 * t_core) if hide else cp_pass_b,
                "ep_f": moe_frac * (2 * a2a + a2a_counts), "ep_b": moe_frac * (4 if recompute == "full" else 2) * a2a,
                "p2p": cost("p2p", b * s_loc * d * act / (t if layout.sequence_parallel else 1), pp_n, pp_bw, pp_a)}

    sc = stage_comm(coll, hide=hide)
    tp_f, tp_b, tp_head, cp_f, cp_b, ep_f, ep_b = (sc[k] for k in ("tp_f", "tp_b", "tp_head", "cp_f", "cp_b",
                                                                   "ep_f", "ep_b"))
    # each of the c ring steps of a forward and of a backward (and the recomputed forward) costs the CPU time of
    # posting and receiving its block, the merge and the Python around them beyond its kernels (calibrated)
    ring_f = c * spec.ring_step_s if on_cpu and c > 1 else 0.0
    ring_b = ring_f * (2 if recompute == "full" else 1)
    comm_f, comm_b = tp_f + cp_f + ep_f, tp_b + cp_b + ep_b

    # per micro-batch and rank: the layers of a stage (t_f, t_b, t_w), and what the last stage adds (the head)
    t_f = layers_stage * (t_layer_f + comm_f + t_over_layer / 3 + t_elem + ring_f)
    t_b = layers_stage * (2 * t_layer_f + extra + comm_b + 2 * t_over_layer / 3 + 2 * t_elem + ring_b)
    head_f = head / head_rate + t_elem_head + tp_head / 2
    head_b = 2 * head / head_rate + 2 * t_elem_head + tp_head / 2
    t_w = head_w = redo = 0.0
    if layout.schedule == "zb" and p > 1:  # backward split: input gradients (B), weight gradients (W); meshlm's W
        # is autograd walking the kept graph again (parallel/pipeline.py), so it costs a whole backward and B the
        # backward without the weight-gradient GEMMs (bench timelines: B + W = 1.6-1.7x 1F1B's backward)
        t_w, head_w = t_b, head_b
        t_b, head_b = t_b - layers_stage * t_layer_f, head_b - head / head_rate
        redo = m * (t_b + head_b / p)  # each rank's B work done twice (the last stage's head: shared out)
    t_p2p = sc["p2p"]
    span, bubble = pipeline_time(layout.schedule, p=p, m=m, v=v, t_f=t_f, t_b=t_b, t_w=t_w, t_comm=t_p2p,
                                 simulate=simulate, last=(head_f, head_b, head_w))
    comm: dict[str, float] = {}
    comm["tp"] = m * (layers_stage * (tp_f + tp_b) + tp_head)
    comm["cp"] = m * layers_stage * (cp_f + cp_b)
    comm["ep"] = m * layers_stage * (ep_f + ep_b)
    work = t_f + t_b + t_w + head_f + head_b + head_w
    ideal = m * work + (p - 1) / v * (t_f + t_b + t_w) if layout.schedule != "zb" else span
    comm["pp"] = max(0.0, span - ideal) if p > 1 else 0.0  # what p2p adds to the bubble-only makespan
    busy_layers = m * layers_stage * (3 * t_layer_f + extra + t_over_layer + 3 * t_elem + ring_f + ring_b)  # a stage
    busy_head = m * (3 * head / head_rate + 3 * t_elem_head)  # the last stage
    busy_layers += redo
    compute = busy_layers + busy_head + t_over_step

    # --- parameters per rank (worst stage) and the data-parallel reduction
    counts = param_count(model, vocab_size=vocab)
    experts = _expert_params(model)
    dense_blocks = counts["blocks"] - experts
    first = dense_blocks / p + counts["embedding"]
    last = dense_blocks / p + counts["head"] + (counts["embedding"] if model.tie_embeddings and p > 1 else 0)
    if p == 1:
        first = last = counts["total"] - experts
    psi_dense = max(first, last) / t
    psi_expert = experts / (p * t * e)
    w_bytes, g_bytes, o_bytes = BYTES_PER_PARAM[precision]
    dn, d_bw, d_a = axis_link(layout, ("dp", "ep", "cp"), net)
    en, e_bw, e_a = axis_link(layout, ("dp", "cp"), net)
    groups = ((psi_dense, dn, d_bw, d_a), (psi_expert, en, e_bw, e_a))
    z = layout.zero
    z_mem = min(z, 1) if p > 1 else z  # under pp, ZeRO-2/3 keep whole gradients (and params) during the schedule
    # calls: DP's buckets; ZeRO's flat groups, two per block (weights with and without decay) and one for the rest
    z_calls = 2 * math.ceil(layers_stage) + 1
    if compression != "none":
        dp_overlap = False  # compressed buckets are reduced after the backward (parallel/data.py)

    def data_comm(cost) -> tuple[float, float, float, float]:
        """(the gradients' reduction, the updated shards' all-gather after the step, one ZeRO-3 gather of every
        layer, the local work of compression) of a step, each call costing cost(op, nbytes, n, bw, alpha)."""
        grad_reduce = gather = zero3 = t_compress = 0.0
        for psi, n, bw, a in groups:
            if not psi or n == 1:
                continue
            if z == 0:
                calls = max(1, math.ceil(psi * g_bytes / DP_BUCKET_BYTES))
                if compression == "none":
                    grad_reduce += calls * cost("all_reduce", psi * g_bytes / calls, n, bw, a)
                    continue
                # compressed: per bucket, after the backward, the local work then its all-reduces
                tensors, matrices, sent, compressed = _grad_tensors(model, vocab, power_rank, layers_stage, t)
                local = {name: (e_s, t_s) for name, e_s, t_s in spec.compression}
                cast_elem, cast_tensor = local.get("bf16", (0.0, 0.0))
                if not power_rank:
                    t_compress += psi * cast_elem + tensors * cast_tensor
                    grad_reduce += calls * cost("all_reduce", psi * 2 / calls, n, bw, a)
                else:  # the matrices' products, QR and error; the rest copied through one flat buffer; the
                    # vectors and small matrices reduced whole, then all P's, then all Q's (fp32)
                    power_elem, power_matrix = local.get("powersgd", (0.0, 0.0))
                    t_compress += (compressed * power_elem + matrices * power_matrix
                                   + (tensors - matrices) * cast_tensor)
                    exact = max(0.0, psi - compressed)
                    grad_reduce += calls * sum(cost("all_reduce", x * 4 / calls, n, bw, a)
                                               for x in (exact, sent / 2, sent / 2))
            else:
                grad_reduce += z_calls * cost("reduce_scatter", psi * g_bytes / z_calls, n, bw, a)
            if z in (1, 2):  # the updated shards gathered after the step (ZeRO-3 gathers them in the next forward)
                gather += z_calls * cost("all_gather", psi * w_bytes / z_calls, n, bw, a)
            if z == 3:
                zero3 += z_calls * cost("all_gather", psi * w_bytes / z_calls, n, bw, a)
        return grad_reduce, gather, zero3, t_compress

    grad_reduce, gather, zero3, t_compress = data_comm(coll)
    last_bucket = min(1.0, DP_BUCKET_BYTES / max(psi_dense * g_bytes, 1.0))
    dp_exposed = (max(grad_reduce * last_bucket, grad_reduce - t_b) if dp_overlap else grad_reduce) + gather
    if z == 3:  # a forward and a backward gather per micro-batch (once per step under pp), prefetched
        uses = 1 if p > 1 else m
        dp_exposed += uses * ((max(zero3 / layers_stage, zero3 - t_f) + max(zero3 / layers_stage, zero3 - t_b))
                              if hide else 2 * zero3)
    # every step: the loss and the gradient norm summed over all ranks; tied embeddings' gradients between the
    # first and the last stage
    w_n, w_bw, w_a = axis_link(layout, AXES, net)

    def step_calls(cost) -> float:
        out = STEP_ALL_REDUCES * cost("all_reduce", 8.0, w_n, w_bw, w_a)
        if model.tie_embeddings and p > 1:
            out += cost("all_reduce", counts["embedding"] / t * g_bytes, 2, pp_bw, pp_a)
        return out

    step_comm = step_calls(coll)
    comm["dp"] = dp_exposed
    comm["step"] = step_comm
    compute += t_compress
    step = span + dp_exposed + step_comm + t_over_step + t_compress
    mean_busy, throughput, cpu_per_rank = compute, 0.0, None  # a GPU computes alone: no throughput bound
    if on_cpu:  # the optimizer step: AdamW reads weights, gradients, m, v and writes weights, m, v (fp32)
        held = max(first, last) / t / (dn if z >= 1 else 1) + psi_expert / (en if z >= 1 else 1)
        t_optim = 7 * 4 * held / mem_rate
        compute += t_optim
        step += t_optim
        # throughput bound: the ranks' busy time shared by the cores (more processes than cores take turns,
        # a pipeline's idle stages give theirs away), plus the communication the busiest rank waits for
        mean_busy = (p * (busy_layers + t_over_step + t_optim + t_compress) + busy_head) / p
        waits = step_comm + comm["tp"] + comm["cp"] + comm["ep"] + dp_exposed + (2 * m * t_p2p if p > 1 else 0.0)
        throughput = world * mean_busy / slots + waits
        if saturated:  # the ranks' CPU time: their compute and what each collective call costs it, between
            # compute bursts (tensor and expert parallelism's calls, the step's all-reduces), queued
            # asynchronously (data parallelism's buckets and ZeRO's groups), or posted to a waiting peer (the
            # pipeline's transfers); context parallelism's ring steps are in the busy time (ring_step_s)
            def cpu_cost(link):
                def cost(op: str, nbytes: float, n: int, bw: float, a: float) -> float:
                    fig = link(op)
                    return COLLECTIVE_TIME[op](nbytes, n, *fig) if fig else coll(op, nbytes, n, bw, a)
                return cost

            between = cpu_cost(lambda op: spec.loaded_cpu_link(op, world))
            queued = cpu_cost(lambda op: spec.loaded_cpu_link("queued_" + op, world) if compression == "none"
                              else spec.loaded_cpu_link(op, world))  # compressed buckets: after the backward
            posted = cpu_cost(lambda op: spec.collective_cpu(op, world))
            per_layer = stage_comm(between, hide=False)
            grads, shards, layers_gather, _ = data_comm(queued)
            comm_cpu = (m * (layers_stage * (per_layer["tp_f"] + per_layer["tp_b"] + per_layer["ep_f"]
                                             + per_layer["ep_b"]) + per_layer["tp_head"])
                        + (2 * m * stage_comm(posted, hide=False)["p2p"] if p > 1 else 0.0) + grads + shards
                        + (2 * (1 if p > 1 else m) * layers_gather if z == 3 else 0.0) + step_calls(between))
            # processes beyond the cores take turns: the step is their CPU time shared by the cores, times the
            # calibrated crowding (waking, switching, and the moments when too few are ready to run)
            throughput = spec.crowd(world) * world * (mean_busy + comm_cpu) / cores
            cpu_per_rank = mean_busy + comm_cpu
        step = max(step, throughput)

    # --- memory per rank
    ws = {}
    for name, psi in (("dense", psi_dense), ("expert", psi_expert)):
        n = dn if name == "dense" else en
        ws[name] = zero_state_bytes(int(psi), n, z_mem, param_bytes=w_bytes, grad_bytes=g_bytes, optim_bytes=o_bytes)
    mem = {k: ws["dense"][k] + ws["expert"][k] for k in ("params", "grads", "optim")}
    sp = layout.sequence_parallel
    saved = "selective" if attention == "flash" and recompute == "none" else recompute
    per_layer_act = korthikanti_bytes_per_layer(s=s_loc, b=b, h=d, a=model.n_heads, t=t, sequence_parallel=sp,
                                                recompute=saved) * act / 2
    # the logits: at the loss's peak bf16 logits and their fp32 softmax (a fused cross-entropy), on the CPU in
    # fp32 the logits, the log-probabilities, their gradient and the logits' gradient; held for the backward,
    # the fp32 (log-)softmax
    logits = b * s_loc * vocab / t
    loss_peak = (16 if on_cpu and act == 4 else 6) * logits
    activations = max(pipeline_activation_bytes(layout.schedule, p=p, m=m, v=v, chunk=L / (p * v) * per_layer_act,
                                                loss_saved=4 * logits, loss_peak=loss_peak))
    if recompute == "full":
        activations += korthikanti_bytes_per_layer(s=s_loc, b=b, h=d, a=model.n_heads, t=t, sequence_parallel=sp,
                                                   recompute="selective" if attention == "flash" else "none") * act / 2
    mem["activations"] = activations
    if on_cpu:  # + what a process's runtime holds beyond its tensors (calibrated)
        buffers = CPU_BUFFER_FRACTION * sum(mem.values()) + spec.runtime_bytes
    else:
        buffers = BUFFER_FRACTION * sum(mem.values()) + BUFFER_BYTES
    if z_mem == 3:
        buffers += 2 * (psi_dense + psi_expert) / max(layers_stage, 1) * w_bytes
    mem["buffers"] = buffers

    tokens = global_batch * seq_len
    world = layout.world_size
    model_flops = _model_flops(model, seq_len=seq_len, vocab=vocab) * tokens
    hw_flops = model_flops + tokens * _recompute_flops_per_token(model, seq_len=seq_len, recompute=recompute,
                                                                 attention=attention)
    return Prediction(
        layout=layout, micro_batch=micro_batch, recompute=recompute, step_time_s=step, compute_s=compute,
        comm_s=comm, bubble=bubble, tokens_per_s=tokens / step, tflops_per_gpu=model_flops / step / world / 1e12,
        hw_tflops_per_gpu=hw_flops / step / world / 1e12, mfu=model_flops / step / world / peak,
        memory_bytes=mem, gpu_memory_bytes=spec.memory_bytes, fits=sum(mem.values()) <= spec.memory_bytes,
        detail={"t_f": t_f, "t_b": t_b, "t_w": t_w, "t_p2p": t_p2p, "t_head_f": head_f, "t_head_b": head_b + head_w,
                "pipeline_s": span, "efficiency": eff, "m": m,
                "mean_busy_s": mean_busy, "throughput_bound_s": throughput, "cpu_per_rank_s": cpu_per_rank,
                "overhead_s": t_over_step + m * layers_stage * t_over_layer,
                "psi_per_rank": psi_dense + psi_expert})


def _model_flops(model: ModelConfig, *, seq_len: int, vocab: int) -> float:
    """Training FLOPs per token without recomputation: 3x the forward of `layer_flops` plus the head."""
    n_moe = sum(is_moe_layer(model, i) for i in range(model.n_layers))
    dense = sum(layer_flops(model, b=1, s=seq_len, moe=False).values())
    moe = sum(layer_flops(model, b=1, s=seq_len, moe=True).values())
    fwd = (model.n_layers - n_moe) * dense + n_moe * moe + 2 * seq_len * model.d_model * vocab
    return 3 * fwd / seq_len


def _recompute_flops_per_token(model: ModelConfig, *, seq_len: int, recompute: str, attention: str) -> float:
    """FLOPs per token that recomputation adds: a forward of every layer (full) or of the attention core
    (selective; half of it inside a flash kernel's backward)."""
    n_moe = sum(is_moe_layer(model, i) for i in range(model.n_layers))
    dense = layer_flops(model, b=1, s=seq_len, moe=False)
    moe = layer_flops(model, b=1, s=seq_len, moe=True)
    if recompute != "full":
        share = 0.5 if attention == "flash" else {"none": 0.0, "selective": 1.0}[recompute]
        return share * model.n_layers * dense["attention"] / seq_len
    return ((model.n_layers - n_moe) * sum(dense.values()) + n_moe * sum(moe.values())) / seq_len
