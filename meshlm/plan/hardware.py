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
calibration file (`MESHLM_CALIBRATION`, else ~/.cache/meshlm/calibration.json; `calibrate_cpu`
writes one) or else defaults: 80 GFLOP/s per core in fp32 and 0.5 GB/s gloo all-reduce bandwidth.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

LINK_EFFICIENCY = 0.8
"""Fraction of a link's nominal bandwidth that a NCCL collective reaches (bus bandwidth in nccl-tests)."""

GB = 1e9


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


def load_calibration() -> dict[str, float]:
    """CPU figures from the calibration file, each missing (or unreadable) one from CPU_DEFAULTS."""
    figures = dict(CPU_DEFAULTS)
    path = calibration_path()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"calibration file {path} is not readable JSON: {e}") from None
        figures.update({k: float(v) for k, v in data.items() if k in CPU_DEFAULTS})
    return figures


def calibrate_cpu(path: str | Path | None = None) -> dict[str, float]:
    """Measure this machine's fp32 GEMM FLOP/s per core and write the calibration file."""
    import torch

    from ..hardware import measure_peak_flops

    threads = torch.get_num_threads()
    figures = load_calibration()
    figures["gflops_per_core"] = measure_peak_flops(torch.float32) / threads / 1e9
    path = Path(path) if path else calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1))
    return figures


def cpu_gpu() -> GPU:
    """This machine as one 'GPU' per core: calibrated (or default) FLOP/s; gloo for every link."""
    fig = load_calibration()
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / cores
    except (ValueError, OSError, AttributeError):
        memory = 4 * GB
    peak = fig["gflops_per_core"] / 1e3  # TFLOP/s; bf16 is not faster than fp32 on most CPUs
    bw = fig["allreduce_gb_per_s"] * GB / LINK_EFFICIENCY  # the calibrated figure is already effective
    return GPU(name="cpu", description=f"this machine: {cores} CPU cores over gloo",
               peak_tflops={"bf16": peak, "fp16": peak, "fp32": peak}, memory_bytes=memory,
               hbm_bytes_per_s=10 * GB, nvlink_bytes_per_s=bw, nic_bytes_per_s=bw, gpus_per_node=cores,
               intra_latency_s=fig["latency_us"] * 1e-6, inter_latency_s=fig["latency_us"] * 1e-6)


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
