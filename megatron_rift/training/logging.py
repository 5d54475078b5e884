"""Step metrics out of the trainer: ``metrics.jsonl``, TensorBoard, Weights & Biases and the rank-0
progress line (loss, lr, tokens/s, ETA). Only global rank 0 writes; other ranks get a no-op.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from megatron_rift.training.config import LoggingConfig


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def truncate_jsonl_after(path: str, last_step: int) -> None:
    """Drop records with ``step > last_step`` (a resumed run rewrites them); atomic rewrite."""
    if not os.path.isfile(path):
        return
    kept = [
        line
        for line in Path(path).read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    tmp = f"{path}.tmp"
    Path(tmp).write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class MetricsLogger:
    """Writes one record per step to every configured sink (rank 0 only)."""

    def __init__(
        self,
        settings: LoggingConfig,
        train_iters: int,
        start_iteration: int,
        enabled: bool,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.train_iters = train_iters
        self.log_interval = max(1, settings.log_interval)
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        self._ema_step_time = None
        if not enabled:
            return
        if settings.log_file:
            Path(settings.log_file).parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl_after(settings.log_file, start_iteration)
            self._jsonl = open(settings.log_file, "a", buffering=1)
        if settings.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=settings.tensorboard_dir)
        if settings.wandb_project:
            import wandb

            self._wandb = wandb.init(
                project=settings.wandb_project,
                name=settings.wandb_exp_name,
                config=run_config or {},
                resume="allow",
            )

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        scalars = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(f"train/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        self._progress(record)

    def _progress(self, record: dict) -> None:
        step_time = record["step_time_s"]
        self._ema_step_time = (
            step_time
            if self._ema_step_time is None
            else 0.9 * self._ema_step_time + 0.1 * step_time
        )
        step = record["step"]
        if step % self.log_interval and step != self.train_iters:
            return
        eta = (self.train_iters - step) * self._ema_step_time
        print(
            f"[{time.strftime('%H:%M:%S')}] step {step}/{self.train_iters} | "
            f"loss {record.get('loss', float('nan')):.6g} | lr {record['lr']:.3g} | "
            f"grad norm {record['grad_norm']:.4g} | {record['tokens_per_s']:.0f} tokens/s | "
            + (f"moe aux loss {record['moe_aux_loss']:.4g} | " if "moe_aux_loss" in record else "")
            + f"ETA {format_duration(eta)}",
            file=sys.stdout,
            flush=True,
        )

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
