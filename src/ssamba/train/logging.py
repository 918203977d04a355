"""Run logs: RUN/metrics.jsonl (always; one JSON object per logged step) and TensorBoard scalars (optional)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["MetricsLog"]


class MetricsLog:
    """Append-only JSON lines; on resume, entries after the checkpoint's step are dropped (they belong to the
    interrupted run and will be logged again)."""

    def __init__(self, run: Path, tensorboard: bool, resume_step: int | None = None):
        self.path = run / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if entry.get("step", 0) <= resume_step:
                    kept.append(line)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run / "tb"))
            except ImportError:
                print("TensorBoard logging off: `tensorboard` is not installed (pip install 'ssamba[tensorboard]')")

    def log(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
        if self.writer is not None:
            split = entry.get("split", "train")
            for key, value in entry.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, entry["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
