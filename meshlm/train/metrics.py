"""Where per-step metrics go: metrics.jsonl, TensorBoard (when installed) and a progress bar.

Only rank 0 writes; the trainer has already reduced the figures over the ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class MetricsLog:
    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, progress: bool, tensorboard: bool):
        self.out_dir = out_dir
        self.file = open(out_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self.tb = None
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar is not None:
            if "loss" in record:
                post = {"loss": f"{record['loss']:.3f}", "tok/s": fmt_count(record["tokens_per_s"]),
                        "mfu": f"{100 * record['mfu']:.1f}%"}
                self.bar.set_postfix(post, refresh=False)
                self.bar.update(1)
            if "val_loss" in record:
                self.bar.write(f"step {record['step']}: val_loss {record['val_loss']:.4f}")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
