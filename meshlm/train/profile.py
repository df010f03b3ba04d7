"""Profiler traces of chosen steps: `--train.profile_steps 5-7` writes one Chrome trace JSON per rank.

The trace is PyTorch's own (`torch.profiler`: every operator, and CUDA kernels on a GPU), with
meshlm's ranges named in it: each collective as "op axis" ("all_reduce dp", "all_to_all ep",
"send_recv cp"; opened by `CommMeter.begin` while `meter.profiling` is on) and each pipeline action
as "pipeline F(mb 0, chunk 0)". Open a file in https://ui.perfetto.dev or chrome://tracing; the
ranks' files side by side show who waited for whom.

Outside those steps nothing is profiled and no range objects are created.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..comm import CommMeter


def parse_steps(text: str) -> tuple[int, int] | None:
    """'5-7' -> (5, 7); '5' -> (5, 5); '' -> None. Steps count from 1. ValueError on anything else."""
    text = text.strip()
    if not text:
        return None
    first, sep, last = text.partition("-")
    if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
        raise ValueError("must be 'A-B' (steps A to B, counted from 1) or 'A'")
    a, b = int(first), int(last) if sep else int(first)
    if not 1 <= a <= b:
        raise ValueError("must be 'A-B' with 1 <= A <= B (steps counted from 1)")
    return a, b


def trace_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / "profile" / f"rank{rank:05d}.json"


class StepProfiler:
    """Starts `torch.profiler` before the first step of the range and writes the trace after the last."""

    def __init__(self, steps: str, *, meter: CommMeter, out_dir: Path, rank: int, device: torch.device):
        self.range = parse_steps(steps)
        self.meter, self.out_dir, self.rank, self.device = meter, Path(out_dir), rank, device
        self.prof: torch.profiler.profile | None = None
        self.first = 0

    def before(self, step: int) -> None:
        """Step `step` (counted from 1) is about to run."""
        if self.range is None or self.prof is not None or not self.range[0] <= step <= self.range[1]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=False)
        self.prof.__enter__()
        self.meter.profiling = True
        self.first = step

    def after(self, step: int) -> Path | None:
        """Step `step` has run: at the end of the range, stop and write the trace."""
        if self.prof is None or step < self.range[1]:
            return None
        return self._write(step)

    def close(self) -> None:
        """The run ended (or failed) inside the range: write what was traced."""
        if self.prof is not None:
            self._write(None)

    def _write(self, last: int | None) -> Path:
        self.meter.profiling = False
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        path = trace_path(self.out_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        if self.rank == 0:
            steps = f"{self.first}-{last}" if last is not None and last != self.first else str(self.first)
            print(f"meshlm: profiler trace of step{'s' if '-' in steps else ''} {steps} -> "
                  f"{path.parent}/rank*.json (open in https://ui.perfetto.dev)", flush=True)
        return path
