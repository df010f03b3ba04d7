"""The hardware the planner costs: GPUs (peak FLOP/s, memory) and clusters (how they are wired).

GPU figures are the vendors' datasheet numbers for the SXM parts, dense (no 2:4 sparsity):

    GPU          bf16/fp16   fp32 (no TF32)   memory    HBM bandwidth
    A100 40GB    312 TF/s    19.5 TF/s        40 GB     1555 GB/s      NVIDIA A100 datasheet
    A100 80GB    312 TF/s    19.5 TF/s        80 GB     2039 GB/s
    H100 SXM     989 TF/s    67 TF/s          80 GB     3350 GB/s      NVIDIA H100 datasheet
    H200         989 TF/s    67 TF/s          141 GB    4800 GB/s      same compute as H100 SXM

Links. Bandwidths are per GPU and per direction, which is what a ring collective uses
(each GPU sends to one neighbour and receives from the other at once):

    intra-node   NVLink 3 (A100): 12 links x 25 GB/s = 300 GB/s;  NVLink 4 (H100/H200): 450 GB/s
    inter-node   one NIC per GPU: 8 x 200 Gb/s HDR InfiniBand per DGX A100 node = 25 GB/s per GPU
                 (the cluster of Narayanan et al. 2021); 8 x 400 Gb/s NDR per DGX H100 = 50 GB/s
    latency      ~5 us per step inside a node, ~10 us across nodes (NCCL's per-hop latency)

A collective never reaches the nominal figure: NCCL's measured bus bandwidth is about 80% of it on
NVLink and InfiniBand alike (nccl-tests), so every cluster applies `LINK_EFFICIENCY` once, here.

"cpu" is this machine: ranks are CPU processes talking over gloo. Its figures come from a
calibration file (`MESHLM_CALIBRATION`, else ~/.cache/meshlm/calibration.json; `calibrate_cpu`,
i.e. `meshlm plan --calibrate`, writes one) or else defaults: 80 GFLOP/s per core in fp32 and
0.5 GB/s gloo all-reduce bandwidth. The calibration holds:

    gemm_gflops      {threads: {width: GFLOP/s}}: fp32 GEMMs of 1024 rows x width x width (a linear layer's
                     forward and its two backward GEMMs), one process at 1 thread and at all cores' threads
    gemm_gflops_concurrent {processes: {width: GFLOP/s}}: the same at 1 thread in each of `cores` processes
                     running at once (each one's rate): what a rank gets while the others compute
    head_gflops      the same for the output layer's GEMMs (1024 rows x width x HEAD_OUT)
    attention_gflops {threads: {head_dim: GFLOP/s}}: causal scaled_dot_product_attention, forward +
                     backward, counted as cost.py counts it (3.5 x 4 b s^2 d)
    mem_gb_per_s     {threads: GB/s}: element-wise bandwidth (c = a + b on 64 MB tensors)
    softmax_g_per_s  {threads: {logits: G elements/s}}: cross-entropy's log-softmax, forward + backward
                     (exp-bound), by the logits' size; head_gflops_by_size: the output layer's GEMMs by
                     the same sizes (both fall once the logits outgrow the caches)
    runtime_bytes    resident bytes of a training process beyond the modelled tensors (see _runtime_bytes)
    layer_overhead_s, step_overhead_s   time outside the modelled work per block and micro-batch, and per
                     step (Python, dispatcher, autograd, optimizer loop; see _framework_overhead);
                     moe_overhead_s, expert_overhead_s what a MoE block adds, and each expert it holds
    ring_step_s      CPU seconds of one ring-attention step (context parallelism) beyond its attention kernels:
                     posting and receiving the k/v block, the merge, the Python around them (_ring_overhead)
    compression      {name: {element_s, tensor_s}}: a compressed gradient all-reduce's local work (bf16 casts,
                     PowerSGD's products, QR and error) per element and per tensor (_compression_overhead)
    collectives      {op: {world: {alpha_s, bytes_per_s}}}: gloo all_reduce, all_gather (into tensor),
                     reduce_scatter (tensor), all_to_all (single) and p2p (send/recv), each a least-squares
                     fit t = A + K B over three message sizes B, stated as the ring model's per-hop latency
                     alpha = A / f_lat(n) and bandwidth bw = f_bw(n) / K (cost.py's formulas: f_bw = 2(n-1)/n,
                     f_lat = 2(n-1) for all-reduce; (n-1)/n and n-1 for the others; 1 and 1 for p2p)
                     and cpu_alpha_s, cpu_bytes_per_s: the same fit to the CPU time each rank spends per call
    loaded           the same figures fitted to two message sizes between compute bursts: W processes each
                     alternating LOADED_BURST_S of GEMMs with one call (p2p: a ring pass, as context and
                     pipeline parallelism post it); what the call adds to the loop (measure_loaded), in wall
                     time and in each rank's CPU time; queued_all_reduce, queued_all_gather and
                     queued_reduce_scatter: the CPU time of QUEUED calls launched at once and then waited for
    crowding         {world: factor}: the loaded loop's wall time / (the ranks' CPU time / cores), the median
                     over the collectives; what a job of more processes than cores loses to taking turns
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

LINK_EFFICIENCY = 0.8
"""Fraction of a link's nominal bandwidth that a NCCL collective reaches (bus bandwidth in nccl-tests)."""

GB = 1e9
HEAD_OUT = 8192
"""Output width (vocabulary shard) at which the output layer's GEMMs are timed."""
HEAD_ROWS = 1024
"""Rows (tokens) of the output layer's GEMMs timed by width (_gemm_gflops' default)."""


def _by_threads(table, size: float, threads: int) -> float | None:
    """A rate from ((threads, ((size, rate), ...)), ...): log-linear in size, linear in threads (fewer threads
    than calibrated: proportionally slower), or None for an empty table."""
    if not table:
        return None
    x = math.log(max(size, 1.0))
    by_t = [(t, _linear([(math.log(w), g) for w, g in rows], x)) for t, rows in table]
    if threads <= by_t[0][0]:
        return by_t[0][1] * threads / by_t[0][0]
    return _linear(by_t, threads)


def _nearest_link(table, op: str, n: int) -> tuple[float, float] | None:
    """(bandwidth, alpha) of `op` from ((op, ((world, alpha, bandwidth), ...)), ...) at the world size nearest
    n (the larger on a tie), or None."""
    for name, rows in table:
        if name == op and rows:
            _, alpha, bw = _nearest(rows, n)
            return bw, alpha
    return None


def _nearest(rows, n: int):
    """The row of ((world, ...), ...) whose world size is nearest n (the larger on a tie)."""
    return min(rows, key=lambda r: (abs(r[0] - n), -r[0]))


def _linear(points, x: float) -> float:
    """y at x on the polyline through sorted (x, y) points; the end values beyond its ends."""
    pts = list(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


@dataclass(frozen=True, kw_only=True)
class GPU:
    name: str
    """Catalogue key, e.g. 'h100'."""
    description: str
    peak_tflops: dict[str, float]
    """Dense peak TFLOP/s by precision ('bf16', 'fp16', 'fp32')."""
    memory_bytes: float
    """Device memory in bytes (GB = 1e9, as datasheets count)."""
    hbm_bytes_per_s: float
    """Memory bandwidth."""
    nvlink_bytes_per_s: float
    """Intra-node bandwidth per GPU per direction (nominal)."""
    nic_bytes_per_s: float
    """Inter-node bandwidth per GPU per direction (nominal): the node's NICs divided by its GPUs."""
    gpus_per_node: int = 8
    intra_latency_s: float = 5e-6
    inter_latency_s: float = 10e-6
    runtime_bytes: float = 0.0
    """CPU only: resident memory a training process adds beyond its tensors (calibrated)."""
    layer_overhead_s: float = 0.0
    """CPU only: time per block and micro-batch outside the modelled work (Python, dispatcher; calibrated)."""
    step_overhead_s: float = 0.0
    """CPU only: fixed time per step outside the modelled work (calibrated)."""
    moe_overhead_s: float = 0.0
    """CPU only: what a mixture-of-experts block adds per micro-batch (router, dispatch; calibrated)."""
    expert_overhead_s: float = 0.0
    """CPU only: what each expert a rank holds adds per MoE block and micro-batch (calibrated)."""
    ring_step_s: float = 0.0
    """CPU only: CPU time of one ring-attention step beyond its kernels (posting, receiving, merging; calibrated)."""
    softmax_rate: tuple = ()
    """CPU only: ((threads, ((logits, elements/s), ...)), ...) of a cross-entropy's log-softmax forward +
    backward by the logits' size (calibrated)."""
    head_size: tuple = ()
    """CPU only: ((threads, ((logits, FLOP/s), ...)), ...) of the output layer's GEMMs at width 64 by the logits'
    size: how its rate (head_flops, at HEAD_ROWS rows) changes with the micro-batch."""
    compression: tuple = ()
    """CPU only: ((name, seconds per gradient element, seconds per tensor), ...) of a compressed all-reduce's
    local work ('bf16', 'powersgd' at rank 2; _compression_overhead)."""
    compute_scale: float = 1.0
    """CPU only: measured / modelled compute time of a real training step (calibrated; see COMPUTE_PROBE)."""
    mem_bandwidth: tuple = ()
    """CPU only: ((threads, bytes/s), ...) of element-wise work (calibrated)."""
    gemm_flops: tuple = ()
    """CPU only: ((threads, ((width, FLOP/s), ...)), ...) measured by calibrate_cpu."""
    gemm_concurrent: tuple = ()
    """CPU only: ((processes, ((width, FLOP/s), ...)),): each of that many 1-thread processes computing at once."""
    head_flops: tuple = ()
    """CPU only: ((threads, ((width, FLOP/s), ...)), ...) of the output layer's GEMMs (width x HEAD_OUT)."""
    attention_flops: tuple = ()
    """CPU only: ((threads, ((head_dim, FLOP/s), ...)), ...) of causal SDPA forward + backward (calibrate_cpu)."""
    collectives: tuple = ()
    """CPU only: ((op, ((world, alpha_s, bytes_per_s), ...)), ...) measured by calibrate_cpu."""
    loaded: tuple = ()
    """CPU only: ((op, ((world, alpha_s, bytes_per_s), ...)), ...): the ring model's figures of a collective
    between compute bursts in a job of that many processes (measure_loaded)."""

    loaded_cpu: tuple = ()
    """CPU only: ((op, ((world, alpha_s, bytes_per_s), ...)), ...): the ring model's figures fitted to the CPU
    time each rank spends on one call between compute bursts (gloo's threads included; measure_loaded)."""
    collectives_cpu: tuple = ()
    """CPU only: as loaded_cpu, of the calls back to back (measure_collectives)."""
    crowding: tuple = ()
    """CPU only: ((world, factor), ...): a job of more processes than cores takes `factor` x its ranks' CPU
    time over the cores (waking, switching and waiting for each other; measure_loaded)."""

    def collective(self, op: str, n: int) -> tuple[float, float] | None:
        """(bandwidth, alpha) calibrated for `op` at n ranks (the nearest calibrated world size), or None."""
        return _nearest_link(self.collectives, op, n)

    def loaded_link(self, op: str, world: int) -> tuple[float, float] | None:
        """(bandwidth, alpha) of `op` between compute bursts in a job of `world` processes (the nearest
        calibrated world size), or None when not calibrated."""
        return _nearest_link(self.loaded, op, world)

    def loaded_cpu_link(self, op: str, world: int) -> tuple[float, float] | None:
        """(bandwidth, alpha) of the CPU time a rank spends on `op` between compute bursts in a job of `world`
        processes (the nearest calibrated world size), or None."""
        return _nearest_link(self.loaded_cpu, op, world)

    def collective_cpu(self, op: str, world: int) -> tuple[float, float] | None:
        """(bandwidth, alpha) of the CPU time a rank spends on `op` called back to back in a job of `world`
        processes (the nearest calibrated world size), or None."""
        return _nearest_link(self.collectives_cpu, op, world)

    def crowd(self, world: int) -> float:
        """Wall time / (ranks' CPU time / cores) of a job of `world` processes that outnumber the cores
        (the nearest calibrated world size; 1 when not calibrated)."""
        return _nearest(self.crowding, world)[1] if self.crowding else 1.0

    def softmax(self, threads: int, logits: float = HEAD_ROWS * HEAD_OUT) -> float | None:
        """Calibrated log-softmax elements/s (forward + backward) at `threads` threads over `logits` elements
        (interpolated log-linearly in size), or None."""
        return _by_threads(self.softmax_rate, logits, threads)

    def mem_rate(self, threads: int) -> float:
        """Element-wise bytes/s at `threads` threads (calibrated, linear in threads between points; else HBM)."""
        return _linear(self.mem_bandwidth, threads) if self.mem_bandwidth else self.hbm_bytes_per_s

    def gemm_share(self, width: float, procs: int) -> float | None:
        """The GEMM rate each of `procs` 1-thread processes gets while all compute at once, as a fraction of
        one alone (calibrated at the core count, from 1 alone linearly in between), or None."""
        alone = self.gemm_rate(width, 1)
        if procs <= 1 or not self.gemm_concurrent or not alone:
            return None
        full, rows = self.gemm_concurrent[-1]  # (processes, ((width, FLOP/s of each), ...))
        together = _linear([(math.log(w), g) for w, g in rows], math.log(max(width, 1.0)))
        return 1.0 + (min(together / alone, 1.0) - 1.0) * (min(procs, full) - 1) / max(full - 1, 1)

    def gemm_rate(self, width: float, threads: int) -> float | None:
        """Calibrated FLOP/s of one process's fp32 GEMM at `threads` threads and width, interpolated
        (log-linear in width, linear in threads), or None."""
        return _by_threads(self.gemm_flops, width, threads)

    def head_rate(self, width: float, threads: int, logits: float = HEAD_ROWS * HEAD_OUT) -> float | None:
        """Calibrated FLOP/s of the output layer's GEMMs (a width x vocabulary-shard layer) making `logits`
        elements, or None."""
        rate = _by_threads(self.head_flops, width, threads)
        if rate is None or not self.head_size:
            return rate
        return rate * _by_threads(self.head_size, logits, threads) / _by_threads(self.head_size, HEAD_ROWS * HEAD_OUT,
                                                                                  threads)

    def attention_rate(self, head_dim: float, threads: int) -> float | None:
        """Calibrated FLOP/s (as the cost model counts them) of causal attention's fused kernel, forward and
        backward, at this head size and thread count (interpolated like gemm_rate), or None."""
        return _by_threads(self.attention_flops, head_dim, threads)

    def peak_flops(self, precision: str) -> float:
        if precision not in self.peak_tflops:
            raise ConfigError(f"precision ({precision!r}) must be one of: {', '.join(self.peak_tflops)}")
        return self.peak_tflops[precision] * 1e12


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Identical nodes of `gpus_per_node` GPUs; links as seen by one GPU, already derated by LINK_EFFICIENCY."""

    gpu: GPU
    gpus_per_node: int
    intra_bw: float
    """Bytes/s per GPU per direction inside a node."""
    inter_bw: float
    """Bytes/s per GPU per direction across nodes."""
    intra_latency_s: float
    inter_latency_s: float

    def link(self, *, inside_node: bool) -> tuple[float, float]:
        """(bandwidth, latency) of a collective whose group is (not) inside one node."""
        if inside_node:
            return self.intra_bw, self.intra_latency_s
        return self.inter_bw, self.inter_latency_s


_A100 = dict(peak_tflops={"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, nvlink_bytes_per_s=300 * GB,
             nic_bytes_per_s=200e9 / 8)
_H100 = dict(peak_tflops={"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, nvlink_bytes_per_s=450 * GB,
             nic_bytes_per_s=400e9 / 8)

GPUS: dict[str, GPU] = {
    "a100-40gb": GPU(name="a100-40gb", description="NVIDIA A100 SXM 40GB", memory_bytes=40 * GB,
                     hbm_bytes_per_s=1555 * GB, **_A100),
    "a100-80gb": GPU(name="a100-80gb", description="NVIDIA A100 SXM 80GB", memory_bytes=80 * GB,
                     hbm_bytes_per_s=2039 * GB, **_A100),
    "h100": GPU(name="h100", description="NVIDIA H100 SXM 80GB", memory_bytes=80 * GB,
                hbm_bytes_per_s=3350 * GB, **_H100),
    "h200": GPU(name="h200", description="NVIDIA H200 SXM 141GB", memory_bytes=141 * GB,
                hbm_bytes_per_s=4800 * GB, **_H100),
}
ALIASES = {"a100": "a100-80gb", "a100-80": "a100-80gb", "a100-40": "a100-40gb", "h100-sxm": "h100"}

# --- this machine (CPU processes over gloo) ------------------------------------------------------

CPU_DEFAULTS = {"gflops_per_core": 80.0, "allreduce_gb_per_s": 0.5, "latency_us": 50.0}
"""Used when no calibration file exists: fp32 GEMM per core (AVX2/AVX-512 FMA), gloo all-reduce bandwidth."""


def calibration_path() -> Path:
    return Path(os.environ.get("MESHLM_CALIBRATION") or Path.home() / ".cache" / "meshlm" / "calibration.json")


def _read_calibration() -> dict:
    path = calibration_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"calibration file {path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"calibration file {path} must hold a JSON object")
    return data


def load_calibration() -> dict[str, float]:
    """CPU figures from the calibration file, each missing (or unreadable) one from CPU_DEFAULTS."""
    figures = dict(CPU_DEFAULTS)
    figures.update({k: float(v) for k, v in _read_calibration().items() if k in CPU_DEFAULTS})
    return figures


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
CALIB_SIZES = (16 * 1024, 512 * 1024, 4 * 1024 * 1024)
"""Message sizes (bytes: the all-reduce's buffer, the gathered / scattered whole, the all-to-all's input,
the p2p message) that each collective is timed at."""
CALIB_WIDTHS = (32, 64, 128, 256, 512, 1024)
"""GEMM widths (1024 x w @ w x w) timed at 1 thread and at all threads."""


def ring_factors(op: str, n: int) -> tuple[float, float]:
    """(f_bw, f_lat) of cost.py's alpha-beta formula of `op` over n ranks: t = f_bw B / bw + f_lat alpha."""
    if op == "p2p":
        return 1.0, 1.0
    if op == "all_reduce":
        return 2 * (n - 1) / n, 2.0 * (n - 1)
    return (n - 1) / n, float(n - 1)


def fit_alpha_beta(op: str, n: int, sizes, times) -> dict[str, float]:
    """Least-squares t = A + K B over (sizes, times), as the ring model's (alpha, bandwidth) of `op` at n."""
    k = len(sizes)
    mb, mt = sum(sizes) / k, sum(times) / k
    var = sum((b - mb) ** 2 for b in sizes)
    slope = sum((b - mb) * (t - mt) for b, t in zip(sizes, times)) / var if var else 0.0
    slope = max(slope, 1e-13)  # no faster than 10 TB/s
    intercept = max(mt - slope * mb, 1e-7)
    f_bw, f_lat = ring_factors(op, n)
    return {"alpha_s": intercept / f_lat, "bytes_per_s": f_bw / slope}


def _gemm_gflops(threads: int, widths=CALIB_WIDTHS, rows: int = 1024, out: int | None = None) -> dict[str, float]:
    """GFLOP/s by width of a linear layer's three GEMMs (x W^T forward, g W and g^T x backward), together: a
    width x width layer, or with `out` a width x out one (the output layer: a short inner dimension and a
    wide output, which the forward writes at far below the square rate)."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    rates = {}
    try:
        for w in widths:
            n = out or w
            x, wt, g = torch.randn(rows, w), torch.randn(n, w), torch.randn(rows, n)

            def three():
                x @ wt.t()
                g @ wt
                g.t() @ x

            three()
            reps = max(2, int(2e9 / (6 * rows * w * n) / 50))  # about 20 ms at 50 GFLOP/s
            best = float("inf")
            for _ in range(5):  # the best of five: a neighbour's burst only ever slows a round down
                start = time.perf_counter()
                for _ in range(reps):
                    three()
                best = min(best, (time.perf_counter() - start) / reps)
            rates[str(w)] = 6 * rows * w * n / best / 1e9
    finally:
        torch.set_num_threads(old)
    return rates


CALIB_HEAD_DIMS = (8, 16, 32, 64, 128)
"""Head sizes at which causal attention (scaled_dot_product_attention) is timed."""


def _attention_gflops(threads: int, head_dims=CALIB_HEAD_DIMS, seq: int = 128, width: int = 512) -> dict[str, float]:
    """GFLOP/s by head size of causal scaled-dot-product attention, forward and backward, counted as the cost
    model counts them: 4 b s^2 d forward, twice that backward, half of it again for the fused backward's
    recomputation (3.5 x 4 b s^2 d in all). Small heads run far below the GEMM rate (the kernel's per-block
    work does not vectorise)."""
    import time

    import torch
    import torch.nn.functional as F

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for hd in head_dims:
            b, h = 4, width // hd
            q, k, v = (torch.randn(b, h, seq, hd, requires_grad=True) for _ in range(3))
            g = torch.randn(b, h, seq, hd)
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
                best = min(best, (time.perf_counter() - start) / 3)
            out[str(hd)] = 3.5 * 4 * b * seq * seq * h * hd / best / 1e9
    finally:
        torch.set_num_threads(old)
    return out


CALIB_LOGIT_ROWS = (128, 512, 2048)
"""Rows of HEAD_OUT logits (1M, 4M, 16M elements) at which the loss and the output layer are timed."""


def _logit_rates(threads: int, rows=CALIB_LOGIT_ROWS, vocab: int = HEAD_OUT, width: int = 64) -> dict[str, list]:
    """By the logits' size (elements): a cross-entropy's log-softmax, forward and backward together, in
    elements/s (an exp per element: compute-bound, several times slower than a copy), and the output layer's
    three GEMMs at `width` in FLOP/s. Both slow down by ~2-3x once the logits outgrow the caches."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, list] = {"elements": [], "softmax": [], "head": []}
    try:
        for n in rows:
            x = torch.randn(n, vocab, requires_grad=True)
            target = torch.randint(0, vocab, (n,))
            h, w, g = torch.randn(n, width), torch.randn(vocab, width), torch.randn(n, vocab)
            best_sm = best_head = float("inf")
            for _ in range(4):
                start = time.perf_counter()
                torch.nn.functional.cross_entropy(x, target).backward()
                mid = time.perf_counter()
                h @ w.t()
                g @ w
                g.t() @ h
                best_sm, best_head = min(best_sm, mid - start), min(best_head, time.perf_counter() - mid)
            out["elements"].append(n * vocab)
            out["softmax"].append(n * vocab / best_sm)
            out["head"].append(6 * n * width * vocab / best_head)
    finally:
        torch.set_num_threads(old)
    return out


def _mem_bandwidth(threads: int, numel: int = 1 << 24) -> float:
    """Bytes/s of an element-wise add (c = a + b: 3 x 4 bytes per element) at `threads` threads."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
        torch.add(a, b, out=c)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.add(a, b, out=c)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return 12 * numel / best


RUNTIME_PROBE = """
import json, os, sys
os.environ["MESHLM_CALIBRATION"] = os.devnull + ".none"  # predict without a runtime allowance (the ranks inherit it)
from meshlm import data
from meshlm.bench.run import run_strategy
from meshlm.bench.strategies import STRATEGIES
path = str(data.ensure_default_dataset(progress=False))
rec = run_strategy(STRATEGIES["dp"], world=2, warmup=1, steps=2, threads=1, settings={
    "model.preset": "gpt-tiny", "train.seq_len": "64", "data.path": path, "train.batch_size": "8",
    "train.threads": "1"})
print(json.dumps({"runtime_bytes": rec["peak_mem_bytes"] - rec["base_mem_bytes"] - rec["predicted_mem_bytes"]}))
"""


def _runtime_bytes() -> float:
    """Resident bytes a training process gains beyond the tensors the cost model counts (the CPU allocator's
    arenas, oneDNN/OpenMP workspaces, autograd's engine, the data, gradient buckets): the bench's own `dp` job
    on gpt-tiny (2 processes of 1 thread, 3 steps), measured peak - base minus its prediction without this
    allowance (a rank of a job, as most runs are; a lone process holds a little less)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RUNTIME_PROBE], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"runtime memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return max(0.0, float(json.loads(out.stdout.strip().splitlines()[-1])["runtime_bytes"]))


OVERHEAD_PROBE = """
import json, os, statistics, sys
os.environ["MESHLM_CALIBRATION"] = os.devnull + ".none"
from meshlm import data
from meshlm.bench.worker import run_job
path = str(data.ensure_default_dataset(progress=False))
out = {}
for layers, experts in ((1, 0), (5, 0), (5, 4), (5, 8)):
    rec = run_job(strategy="single", settings={"model.preset": "gpt-tiny", "model.n_layers": str(layers),
                  "model.d_model": "32", "model.n_heads": "2", "model.d_ff": "64", "train.seq_len": "8",
                  "model.n_experts": str(experts), "model.experts_per_token": "2", "model.moe_dropless": "true",
                  "train.batch_size": "1", "data.path": path, "train.threads": "1"}, warmup=3, steps=25)
    out[layers, experts] = statistics.median(rec["step_times_s"]) - rec["predicted_step_time_s"]
block = (out[5, 0] - out[1, 0]) / 4
moe4, moe8 = (out[5, 4] - out[5, 0]) / 5, (out[5, 8] - out[5, 0]) / 5  # what a MoE block adds to a dense one
print(json.dumps({"layer_overhead_s": block, "step_overhead_s": out[1, 0] - block,
                  "expert_overhead_s": (moe8 - moe4) / 4, "moe_overhead_s": moe4 - (moe8 - moe4)}))
"""


def _framework_overhead() -> dict[str, float]:
    """Seconds a training step spends outside the modelled work (Python, the dispatcher, autograd, the
    optimizer's per-tensor loop, data): the bench's `single` job at 1 thread on a model too small to
    compute anything (width 32, 8 tokens), with 1 and with 5 blocks. Per block (forward, backward and
    its share of the optimizer) = the difference / 4; per step = what remains at 1 block. Each is the
    measured median minus the cost model's prediction without these terms. A mixture-of-experts block
    adds moe_overhead_s (router, dispatch) + expert_overhead_s per expert the rank holds (the loop over
    them): the same 5 blocks with 4 and with 8 experts (top-2, dropless)."""
    import subprocess
    import sys

    runs = []
    for _ in range(3):  # the median of three runs: a slow spell of this shared machine spoils one at most
        out = subprocess.run([sys.executable, "-c", OVERHEAD_PROBE], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"framework overhead probe failed: {out.stderr.strip().splitlines()[-1:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: max(0.0, statistics.median(float(r[k]) for r in runs)) for k in runs[0]}


COMPRESSION_PROBE = """
import json, statistics, sys, time
import torch, torch.distributed as dist
from meshlm.parallel.compress import make_compressor
torch.set_num_threads(1)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
out = {}
for name in ("bf16", "powersgd"):
    times = {}
    for count, n in COMPRESSION_SHAPES:  # the same elements in few large and in many small matrices
        comp = make_compressor(name)
        grads = [torch.randn(n, n) for _ in range(count)]
        for _ in range(2):  # PowerSGD's first call draws its Q and error state
            comp.reduce_(grads, dist.group.WORLD, key="probe", meter=None)
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            comp.reduce_(grads, dist.group.WORLD, key="probe", meter=None)
            runs.append(time.perf_counter() - start)
        times[count, n] = statistics.median(runs)
    (c1, n1), (c2, n2) = COMPRESSION_SHAPES
    per_tensor = max(0.0, (times[c2, n2] - times[c1, n1]) / (c2 - c1))
    out[name] = {"element_s": max(0.0, times[c1, n1] - c1 * per_tensor) / (c1 * n1 * n1), "tensor_s": per_tensor}
dist.destroy_process_group()
print(json.dumps(out))
"""
COMPRESSION_SHAPES = ((8, 512), (128, 128))
"""(matrices, side) of the compression probe: 2M gradient elements as 8 matrices of 512^2 and as 128 of 128^2."""


def _compression_overhead(runs: int = 3) -> dict[str, dict[str, float]]:
    """{name: {element_s, tensor_s}}: the local work of a compressed gradient all-reduce (train.compression;
    parallel/compress.py) per gradient element and per tensor, at 1 thread, in a 1-process group (so nothing
    is sent: the collectives are costed apart). bf16 casts and copies the flat buffer; PowerSGD (rank 2) adds the
    error, multiplies by Q and P, orthogonalises P (QR) and forms the new gradient and error, per matrix. The
    median of `runs` probes, each the median of 7 calls on the shapes of COMPRESSION_SHAPES."""
    import subprocess
    import sys

    code = COMPRESSION_PROBE.replace("COMPRESSION_SHAPES", repr(COMPRESSION_SHAPES))
    found = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"compression probe failed: {out.stderr.strip().splitlines()[-1:]}")
        found.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {name: {k: statistics.median(r[name][k] for r in found) for k in found[0][name]} for name in found[0]}


COMPUTE_PROBE = """
import json, statistics
from meshlm import data
from meshlm.bench.worker import run_job
path = str(data.ensure_default_dataset(progress=False))
rec = run_job(strategy="single", settings={"model.preset": "gpt-tiny", "model.n_layers": "2", "model.d_model": "192",
              "model.n_heads": "4", "model.d_ff": "768", "train.seq_len": "96", "train.batch_size": "6",
              "data.path": path, "train.threads": "1"}, warmup=2, steps=12)
over, pred = rec["predicted_detail"]["overhead_s"], rec["predicted_step_time_s"]
print(json.dumps({"compute_scale": (statistics.median(rec["step_times_s"]) - over) / (pred - over)}))
"""


def _compute_scale(path: Path) -> float:
    """Measured / modelled compute time of one real training step (a width-192, 2-block GPT, 1 process at
    1 thread, with the framework overhead taken out of both): what the GEMM and bandwidth formulas leave
    out (the GEMMs' actual shapes, softmax, norms, copies). Run with the calibration at `path` in force."""
    import subprocess
    import sys

    env = {**os.environ, "MESHLM_CALIBRATION": str(path)}
    runs = []
    for _ in range(3):  # the median of three runs
        out = subprocess.run([sys.executable, "-c", COMPUTE_PROBE], capture_output=True, text=True, timeout=300,
                             env=env)
        if out.returncode != 0:
            raise RuntimeError(f"compute probe failed: {out.stderr.strip().splitlines()[-1:]}")
        runs.append(float(json.loads(out.stdout.strip().splitlines()[-1])["compute_scale"]))
    return max(0.25, min(4.0, statistics.median(runs)))


def _collective_worker(rank: int, world: int, port: int, result: str, sizes, iters: int) -> None:
    import statistics
    import time
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # *_tensor collectives: renamed, same op
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out: dict[str, list[float]] = {op: [] for op in COLLECTIVES}
        cpu: dict[str, list[float]] = {op: [] for op in COLLECTIVES}
        for nbytes in sizes:
            numel = max(world, nbytes // 4 // world * world)
            full = torch.ones(numel)
            part = torch.ones(numel // world)
            peer = rank ^ 1

            def p2p():
                if peer >= world:
                    return
                if rank % 2 == 0:  # ping-pong: the time of one message is half the round trip
                    dist.send(full, peer)
                    dist.recv(full, peer)
                else:
                    dist.recv(full, peer)
                    dist.send(full, peer)

            ops = {"all_reduce": lambda: dist.all_reduce(full),
                   "all_gather": lambda: dist.all_gather_into_tensor(full, part),
                   "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
                   "all_to_all": lambda: dist.all_to_all_single(torch.empty_like(full), full),
                   "p2p": p2p}
            for op, fn in ops.items():
                for _ in range(3):
                    fn()
                best, used = float("inf"), []
                for _ in range(5):
                    dist.barrier()
                    start, busy = time.perf_counter(), time.process_time()
                    for _ in range(iters):
                        fn()
                    t = torch.tensor([(time.perf_counter() - start) / iters])
                    c = torch.tensor([(time.process_time() - busy) / iters])
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    dist.all_reduce(c)  # the ranks' mean CPU per call, gloo's threads included
                    best = min(best, t.item())
                    used.append(c.item() / world)
                out[op].append(best / (2 if op == "p2p" else 1))
                cpu[op].append(statistics.median(used) / (2 if op == "p2p" else 1))
        if rank == 0:
            Path(result).write_text(json.dumps({"wall": out, "cpu": cpu}))
    finally:
        dist.destroy_process_group()


def measure_collectives(world: int, *, sizes=CALIB_SIZES, iters: int = 10) -> dict[str, dict[str, float]]:
    """{op: {alpha_s, bytes_per_s}} of gloo collectives among `world` local processes (1 thread each)."""
    got = _spawn(_collective_worker, world, list(sizes), iters)
    out = {}
    for op in COLLECTIVES:
        cpu = fit_alpha_beta(op, world, list(sizes), got["cpu"][op])
        out[op] = {**fit_alpha_beta(op, world, list(sizes), got["wall"][op]), "times_s": got["wall"][op],
                   "cpu_s": got["cpu"][op], "cpu_alpha_s": cpu["alpha_s"], "cpu_bytes_per_s": cpu["bytes_per_s"]}
    return out


def _spawn(worker, world: int, *args):
    """Run worker(rank, world, port, result, *args) in `world` local processes; what rank 0 wrote to `result`
    (JSON)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="meshlm-calib-") as tmp:
        result = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(world, port, result, *args), nprocs=world, join=True)
        return json.loads(Path(result).read_text())


LOADED_SIZES = (16 * 1024, 512 * 1024)
"""Message sizes of the loaded probe (as CALIB_SIZES), fitted to a loaded (alpha, bandwidth) per op and world."""
QUEUED = 8
"""Calls the loaded probe's queued variant launches at once (asynchronously) before waiting for them."""
LOADED_BURST_S = 2e-3
"""Compute between two collectives in the loaded probe (about one block's forward of the bench's models)."""


def _loaded_worker(rank: int, world: int, port: int, result: str, iters: int, nbytes: int = 16384) -> None:
    """Each rank alternates a GEMM burst of LOADED_BURST_S (alone on a core) with one small collective; the
    time per iteration with the collective minus without it is what the collective costs between compute,
    in wall time (the slowest rank) and in CPU time (the ranks' mean, gloo's threads included). The queued
    variants launch QUEUED calls at once and wait for them, after as many bursts."""
    import statistics
    import time
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a = torch.randn(128, 128)
        start = time.perf_counter()
        for _ in range(50):
            a @ a
        reps = max(1, round(LOADED_BURST_S / ((time.perf_counter() - start) / 50)))
        reps = int(max(torch.tensor([reps]), _max(dist, torch.tensor([reps]))))  # the same burst on every rank
        full, part = torch.ones(nbytes // 4 // world * world), torch.ones(nbytes // 4 // world)
        nxt, prev = (rank + 1) % world, (rank - 1) % world
        recv = torch.empty_like(part)

        def ring():  # a ring pass as context parallelism and the pipeline post it: send on, receive from behind
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, part, nxt), dist.P2POp(dist.irecv, recv, prev)]):
                w.wait()

        calls = {"all_reduce": lambda **kw: dist.all_reduce(full, **kw),
                 "all_gather": lambda **kw: dist.all_gather_into_tensor(full, part, **kw),
                 "reduce_scatter": lambda **kw: dist.reduce_scatter_tensor(part, full, **kw)}

        def queued(call):  # QUEUED calls launched at once, then waited for: as data parallelism posts its buckets
            def run():
                for w in [call(async_op=True) for _ in range(QUEUED)]:
                    w.wait()
            return run

        # (the iteration's call, the calls it makes): every iteration computes one burst per call
        ops = {"none": (lambda: None, 1), **{op: (fn, 1) for op, fn in calls.items()},
               "all_to_all": (lambda: dist.all_to_all_single(torch.empty_like(full), full), 1), "p2p": (ring, 1),
               **{f"queued_{op}": (queued(fn), QUEUED) for op, fn in calls.items()}}
        per_iter: dict[str, list[float]] = {op: [] for op in ops}
        cpu_iter: dict[str, list[float]] = {op: [] for op in ops}
        for _ in range(3):  # rounds: the median of each op's three
            for op, (fn, k) in ops.items():
                dist.barrier()
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    for _ in range(reps * k):
                        a @ a
                    fn()
                t = torch.tensor([(time.perf_counter() - start) / iters / k])
                c = torch.tensor([(time.process_time() - cpu) / iters / k])
                dist.all_reduce(c)  # the ranks' mean CPU per call, gloo's threads included
                per_iter[op].append(float(_max(dist, t)))
                cpu_iter[op].append(float(c) / world)
        if rank == 0:
            walls = {op: statistics.median(v) for op, v in per_iter.items()}
            cpus = {op: statistics.median(v) for op, v in cpu_iter.items()}
            Path(result).write_text(json.dumps({
                **{op: max(0.0, w - walls["none"]) for op, w in walls.items() if op != "none"},
                "cpu": {op: max(0.0, c - cpus["none"]) for op, c in cpus.items() if op != "none"},
                # wall time over (the ranks' CPU time shared by the cores), of the loop with each call
                "crowding": {op: walls[op] * min(world, os.cpu_count() or 1) / (world * cpus[op]) for op in walls}}))
    finally:
        dist.destroy_process_group()


def _max(dist, t):
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _concurrent_worker(rank: int, world: int, port: int, result: str) -> None:
    """_gemm_gflops at 1 thread, started with the other processes (a barrier); rank 0 writes every rank's
    {width: GFLOP/s}."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dist.barrier()
        rates = [None] * world
        dist.all_gather_object(rates, _gemm_gflops(1))
        if rank == 0:
            Path(result).write_text(json.dumps(rates))
    finally:
        dist.destroy_process_group()


def _concurrent_gemm(procs: int, runs: int = 3) -> dict[str, float]:
    """{width: GFLOP/s} of one of `procs` 1-thread processes running the GEMM probe at once (the median over
    them and over `runs` rounds: a neighbour's burst on this shared machine spoils one at most): what each
    rank of a job gets while the others compute too. Processes on the cores of one machine share caches,
    the memory bus and clocks, which one process running `procs` threads does not show the same way (its
    threads also wait for each other)."""
    got = [rates for _ in range(runs) for rates in _spawn(_concurrent_worker, procs)]
    return {width: statistics.median(g[width] for g in got) for width in got[0]}


RING_SHAPE = (2, 4, 8, 16)
"""(batch, heads, local tokens, head size) of the ring probe: too small for its kernels to matter."""


def _ring_worker(rank: int, world: int, port: int, result: str, runs: int = 40) -> None:
    """CPU seconds (the process's, gloo's threads included) of one ring-attention forward + backward at cp =
    world on RING_SHAPE, minus those of the same local attention through SDPA: what each ring step costs
    beyond its kernels, averaged over the ranks and divided by the 2 x cp steps."""
    import statistics
    import time
    import warnings

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from ..parallel.context import ring_attention

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b, h, t, d = RING_SHAPE
        q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
        calls = {"ring": lambda: ring_attention(q, k, v, dist.group.WORLD, causal=True, cp=world, cp_rank=rank),
                 "local": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        cpu = {}
        for name, fn in calls.items():
            times = []
            for i in range(runs + 3):
                dist.barrier()
                start = time.process_time()
                fn().sum().backward()
                if i >= 3:
                    times.append(time.process_time() - start)
            cpu[name] = statistics.median(times)
        step = torch.tensor([max(0.0, cpu["ring"] - cpu["local"]) / (2 * world)])
        dist.all_reduce(step)
        if rank == 0:
            Path(result).write_text(json.dumps({"ring_step_s": float(step) / world}))
    finally:
        dist.destroy_process_group()


def _ring_overhead(world: int = 2, runs: int = 3) -> float:
    """CPU seconds a ring-attention step (context parallelism: one k/v block's posting, receiving, kernel calls
    and merge) costs beyond its attention kernels, at 1 thread in a job of `world` processes (_ring_worker):
    the median of `runs` jobs, since one job's figure moves by up to 2x with this shared machine's state."""
    return statistics.median(float(_spawn(_ring_worker, world)["ring_step_s"]) for _ in range(runs))


def measure_loaded(world: int, *, iters: int = 10, nbytes: int = 16384) -> dict:
    """{op: seconds} a gloo collective of `nbytes` adds per call among `world` local processes that compute
    between calls: waiting for every member (and gloo's own threads) to be scheduled, which the idle probe
    (`measure_collectives`) does not see, and which grows once there are more processes than cores; with
    'cpu': {op: CPU seconds per call and rank} (the queued variants too) and 'crowding': {op: the loop's
    wall time / (the ranks' CPU time / cores)}."""
    return _spawn(_loaded_worker, world, iters, nbytes)


def calibrate_collectives(world_sizes=(2, 4, 8), *, log=None) -> dict:
    """The gloo figures at each world size: back to back (measure_collectives), and between compute bursts
    (measure_loaded: wall time and CPU time per call, plain and queued, and the crowding of a loaded job);
    the calibration file's 'collectives', 'loaded' and 'crowding' entries."""
    coll: dict[str, dict[str, dict]] = {op: {} for op in COLLECTIVES}
    loaded: dict[str, dict[str, dict]] = {op: {} for op in COLLECTIVES}
    crowding: dict[str, float] = {}
    for n in world_sizes:
        if n < 2:
            continue
        figs = measure_collectives(n)
        for op in COLLECTIVES:
            coll[op][str(n)] = figs[op]
            if log:
                f = figs[op]
                log(f"{op:<14} world {n}: alpha {f['alpha_s'] * 1e6:8.1f} us, "
                    f"bandwidth {f['bytes_per_s'] / 1e9:6.3f} GB/s"
                    f"  (times " + ", ".join(f"{1e3 * t:.2f}" for t in f["times_s"]) + " ms at "
                    + ", ".join(fmt_size(b) for b in CALIB_SIZES) + ")")
        times = [measure_loaded(n, nbytes=b) for b in LOADED_SIZES]
        for op in times[0]["cpu"]:  # the collectives and their queued variants
            cpu = [t["cpu"][op] for t in times]
            fit = fit_alpha_beta(op.removeprefix("queued_"), n, list(LOADED_SIZES), cpu)
            loaded.setdefault(op, {})[str(n)] = {"cpu_s": cpu, "cpu_alpha_s": fit["alpha_s"],
                                                 "cpu_bytes_per_s": fit["bytes_per_s"]}
            if op in COLLECTIVES:
                loaded[op][str(n)].update(fit_alpha_beta(op, n, list(LOADED_SIZES), [t[op] for t in times]),
                                          times_s=[t[op] for t in times])
        crowding[str(n)] = statistics.median(t["crowding"][op] for t in times for op in COLLECTIVES)
        if log:
            log(f"between compute bursts, world {n}: " + ", ".join(
                f"{op} " + "/".join(f"{1e3 * t:.2f}" for t in loaded[op][str(n)]["times_s"]) for op in COLLECTIVES)
                + " ms per call at " + ", ".join(fmt_size(b) for b in LOADED_SIZES) + "; CPU per rank " + ", ".join(
                f"{op} " + "/".join(f"{1e3 * t:.2f}" for t in loaded[op][str(n)]["cpu_s"]) for op in times[0]["cpu"])
                + f" ms; the loop's wall time is {crowding[str(n)]:.2f}x the ranks' CPU time over the cores")
    return {"collectives": coll, "loaded": loaded, "crowding": crowding}


def calibrate_cpu(path: str | Path | None = None, *, world_sizes=(2, 4, 8), log=None) -> dict:
    """Measure this machine (fp32 GEMM FLOP/s at 1 and all threads; gloo collectives at `world_sizes`)
    and write the calibration file; returns what it wrote."""
    cores = os.cpu_count() or 1
    data = {k: v for k, v in _read_calibration().items() if k in CPU_DEFAULTS}
    data = {**CPU_DEFAULTS, **data}
    # the probes train on the default corpus: build it here, not inside a probe, whose peak resident set
    # (the probe's baseline) would then hold the tokenizer's training and hide the training's own peak
    from .. import data as data_mod

    data_mod.ensure_default_dataset(progress=False)
    data["runtime_bytes"] = _runtime_bytes()
    data.update(_framework_overhead())
    if log:
        log(f"framework overhead at 1 thread: {data['layer_overhead_s'] * 1e3:.2f} ms per block and micro-batch, "
            f"{data['step_overhead_s'] * 1e3:.2f} ms per step; a MoE block adds "
            f"{data['moe_overhead_s'] * 1e3:.2f} ms + {data['expert_overhead_s'] * 1e3:.2f} ms per expert")
    data["compression"] = _compression_overhead()
    if log:
        log("compressed all-reduce, local work at 1 thread: " + ", ".join(
            f"{name} {f['element_s'] * 1e9:.1f} ns per element + {f['tensor_s'] * 1e6:.0f} us per tensor"
            for name, f in data["compression"].items()))
    data["ring_step_s"] = _ring_overhead()
    if log:
        log(f"ring attention (context parallelism): {data['ring_step_s'] * 1e3:.2f} ms of CPU per ring step beyond "
            "its kernels")
    gemm = {}
    for threads in sorted({1, cores}):
        gemm[str(threads)] = _gemm_gflops(threads)
        if log:
            log(f"GEMM fp32, {threads} thread(s): " + ", ".join(f"w={w} {g:.1f}" for w, g in gemm[str(threads)].items())
                + " GFLOP/s")
    data["gemm_gflops"] = gemm
    if cores > 1:
        data["gemm_gflops_concurrent"] = {str(cores): _concurrent_gemm(cores)}
        if log:
            log(f"GEMM fp32, 1 thread in each of {cores} processes at once: " + ", ".join(
                f"w={w} {g:.1f}" for w, g in data["gemm_gflops_concurrent"][str(cores)].items()) + " GFLOP/s")
    data["head_gflops"] = {str(t): _gemm_gflops(t, out=HEAD_OUT) for t in sorted({1, cores})}
    if log:
        for t, by_w in data["head_gflops"].items():
            log(f"output layer GEMMs (width x {HEAD_OUT}), {t} thread(s): "
                + ", ".join(f"w={w} {g:.1f}" for w, g in by_w.items()) + " GFLOP/s")
    data["mem_gb_per_s"] = {str(t): _mem_bandwidth(t) / GB for t in sorted({1, cores})}
    logits = {str(t): _logit_rates(t) for t in sorted({1, cores})}
    data["softmax_g_per_s"] = {t: {str(n): r / 1e9 for n, r in zip(f["elements"], f["softmax"])}
                               for t, f in logits.items()}
    data["head_gflops_by_size"] = {t: {str(n): r / 1e9 for n, r in zip(f["elements"], f["head"])}
                                   for t, f in logits.items()}
    data["attention_gflops"] = {str(t): _attention_gflops(t) for t in sorted({1, cores})}
    if log:
        for t, by_hd in data["attention_gflops"].items():
            log(f"causal attention (SDPA forward + backward), {t} thread(s): "
                + ", ".join(f"head {hd} {g:.1f}" for hd, g in by_hd.items()) + " GFLOP/s")
    if log:
        for t, by_n in data["softmax_g_per_s"].items():
            log(f"cross-entropy (log-softmax forward + backward), {t} thread(s): " + ", ".join(
                f"{float(n) / 1e6:g}M logits {g:.2f}" for n, g in by_n.items()) + " G elements/s; output layer "
                + ", ".join(f"{g:.1f}" for g in data["head_gflops_by_size"][t].values()) + " GFLOP/s")
    if log:
        log("memory bandwidth (c = a + b): " + ", ".join(f"{t} thread(s) {g:.1f} GB/s"
                                                         for t, g in data["mem_gb_per_s"].items()))
        log(f"runtime memory of a training process beyond its tensors: {data['runtime_bytes'] / 1e6:.0f} MB")
    data["sizes_bytes"] = list(CALIB_SIZES)
    data.update(calibrate_collectives(world_sizes, log=log))
    coll = data["collectives"]
    # the GEMM rates again, minutes later: a neighbour's burst on a shared machine can slow every round of one
    # probe down, never speed one up, so each width keeps the faster of the two
    for threads, first in gemm.items():
        again = _gemm_gflops(int(threads))
        gemm[threads] = {w: max(g, again[w]) for w, g in first.items()}
        if log:
            log(f"GEMM fp32, {threads} thread(s), again (the faster of the two kept): "
                + ", ".join(f"w={w} {g:.1f}" for w, g in gemm[threads].items()) + " GFLOP/s")
    data["gflops_per_core"] = max(gemm[str(cores)].values()) / cores
    if coll["all_reduce"]:
        first = coll["all_reduce"][min(coll["all_reduce"], key=int)]
        data["allreduce_gb_per_s"] = first["bytes_per_s"] / GB
        data["latency_us"] = first["alpha_s"] * 1e6
    data["cores"] = cores
    path = Path(path) if path else calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data["compute_scale"] = 1.0
    path.write_text(json.dumps(data, indent=1))
    data["compute_scale"] = _compute_scale(path)  # a real step, costed with the figures just written
    if log:
        log(f"compute: a real training step takes {data['compute_scale']:.2f}x the modelled GEMM and element-wise time")
    path.write_text(json.dumps(data, indent=1))
    return data


def fmt_size(n: float) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def cpu_gpu() -> GPU:
    """This machine as one 'GPU' per core: calibrated (or default) FLOP/s; gloo for every link."""
    fig = load_calibration()
    raw = _read_calibration()
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / cores
    except (ValueError, OSError, AttributeError):
        memory = 4 * GB
    peak = fig["gflops_per_core"] / 1e3  # TFLOP/s; bf16 is not faster than fp32 on most CPUs
    bw = fig["allreduce_gb_per_s"] * GB / LINK_EFFICIENCY  # the calibrated figure is already effective
    gemm, head, attention = (_size_table(raw.get(key)) for key in ("gemm_gflops", "head_gflops", "attention_gflops"))
    # the wall-time fits (alpha_s, bytes_per_s; the queued calls have only CPU time) and the CPU-time ones
    coll, loaded = (_link_table(raw.get(key)) for key in ("collectives", "loaded"))
    loaded_cpu, coll_cpu = (_link_table(raw.get(key), prefix="cpu_") for key in ("loaded", "collectives"))
    crowding = tuple(sorted((int(n), float(f)) for n, f in (raw.get("crowding") or {}).items()))
    return GPU(name="cpu", description=f"this machine: {cores} CPU cores over gloo", loaded=loaded,
               loaded_cpu=loaded_cpu, collectives_cpu=coll_cpu, crowding=crowding,
               peak_tflops={"bf16": peak, "fp16": peak, "fp32": peak}, memory_bytes=memory,
               hbm_bytes_per_s=10 * GB, nvlink_bytes_per_s=bw, nic_bytes_per_s=bw, gpus_per_node=cores,
               intra_latency_s=fig["latency_us"] * 1e-6, inter_latency_s=fig["latency_us"] * 1e-6,
               gemm_flops=gemm, head_flops=head, attention_flops=attention, collectives=coll,
               gemm_concurrent=_size_table(raw.get("gemm_gflops_concurrent")),
               runtime_bytes=float(raw.get("runtime_bytes", 0.0)),
               layer_overhead_s=float(raw.get("layer_overhead_s", 0.0)),
               step_overhead_s=float(raw.get("step_overhead_s", 0.0)),
               moe_overhead_s=float(raw.get("moe_overhead_s", 0.0)),
               expert_overhead_s=float(raw.get("expert_overhead_s", 0.0)),
               ring_step_s=float(raw.get("ring_step_s", 0.0)),
               compute_scale=float(raw.get("compute_scale", 1.0)),
               compression=tuple(sorted((name, float(f["element_s"]), float(f["tensor_s"]))
                                        for name, f in (raw.get("compression") or {}).items())),
               softmax_rate=_size_table(raw.get("softmax_g_per_s")),
               head_size=_size_table(raw.get("head_gflops_by_size")),
               mem_bandwidth=tuple(sorted((int(t), float(g) * GB) for t, g in (raw.get("mem_gb_per_s") or {}).items())))


def _link_table(by_op: dict | None, *, prefix: str = "") -> tuple:
    """((op, ((world, alpha_s, bytes_per_s), ...)), ...) of a calibration file's {op: {world: {...}}}: the fit
    named {prefix}alpha_s and {prefix}bytes_per_s ('cpu_': the CPU-time fit); entries without it (the queued
    calls' wall time, files from before CPU time was measured) are left out."""
    alpha, bw = f"{prefix}alpha_s", f"{prefix}bytes_per_s"
    return tuple(sorted((op, tuple(sorted((int(n), float(f[alpha]), float(f[bw])) for n, f in by_n.items()
                                          if alpha in f)))
                        for op, by_n in (by_op or {}).items() if any(alpha in f for f in by_n.values())))


def _size_table(by_threads: dict | None) -> tuple:
    """{threads: {size: G per s}} (a width, head size or logits count; an older file's softmax {threads: G per s}
    is at the default logits) as a rate table for _by_threads."""
    rows = []
    for t, by_n in (by_threads or {}).items():
        by_n = by_n if isinstance(by_n, dict) else {HEAD_ROWS * HEAD_OUT: by_n}
        rows.append((int(t), tuple(sorted((float(n), float(g) * 1e9) for n, g in by_n.items()))))
    return tuple(sorted(rows))


def known_gpus() -> list[str]:
    return [*GPUS, "cpu"]


def gpu_spec(name: str) -> GPU:
    """The catalogue entry for `name` (case-insensitive; 'a100' is the 80GB part)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return cpu_gpu()
    if key not in GPUS:
        raise ConfigError(f"gpu ({name!r}) is not one of: {', '.join(known_gpus())} "
                          f"(aliases: {', '.join(ALIASES)})")
    return GPUS[key]


def cluster(gpu: str | GPU, *, gpus_per_node: int | None = None) -> Cluster:
    """A cluster of `gpu` nodes, links derated by LINK_EFFICIENCY."""
    spec = gpu if isinstance(gpu, GPU) else gpu_spec(gpu)
    n = spec.gpus_per_node if gpus_per_node is None else gpus_per_node
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"gpus_per_node ({n!r}) must be a positive integer")
    return Cluster(gpu=spec, gpus_per_node=n, intra_bw=spec.nvlink_bytes_per_s * LINK_EFFICIENCY,
                   inter_bw=spec.nic_bytes_per_s * LINK_EFFICIENCY, intra_latency_s=spec.intra_latency_s,
                   inter_latency_s=spec.inter_latency_s)
