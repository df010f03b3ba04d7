"""Peak FLOP/s of the device a rank trains on: the denominator of MFU.

On a GPU the peak is the datasheet's dense (no sparsity) figure for the training dtype. A CPU has no
datasheet figure we can trust (it depends on the cores a process gets, AVX widths and clocks), so it
is measured once per process: the best of a few square matmuls at this process's thread count. MFU
on CPU therefore reads as "fraction of what a large GEMM reaches here", which is the honest bound.
"""

from __future__ import annotations

import time

import torch

# Dense peak TFLOP/s per GPU, by dtype, from the vendors' datasheets (SXM parts; no sparsity).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},  # NVIDIA A100 datasheet (fp32 without TF32)
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # NVIDIA H100 SXM5 datasheet
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # same compute as H100 SXM, more memory
}


def gpu_peak_flops(device: torch.device, dtype: str) -> float | None:
    """Datasheet peak FLOP/s of this GPU for dtype, or None for a GPU not in the table."""
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype] * 1e12
    return None


def measure_peak_flops(dtype: torch.dtype = torch.float32, *, device: torch.device | str = "cpu",
                       size: int | None = None, repeats: int = 3) -> float:
    """Best FLOP/s of a square matmul on this process's threads or GPU (about 0.2 s in fp32 on a CPU)."""
    device = torch.device(device)
    cpu_fp32 = device.type == "cpu" and dtype == torch.float32
    # bf16 matmuls are ~60x slower on CPUs without bf16 units: measure them on a smaller matrix.
    n = size or (1024 if cpu_fp32 else 256 if device.type == "cpu" else 8192)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm up the kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one rank for the training precision ('fp32', 'bf16' or 'fp16')."""
    if device.type == "cuda":
        peak = gpu_peak_flops(device, precision)
        if peak is not None:
            return peak
    return measure_peak_flops({"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16),
                              device=device)
