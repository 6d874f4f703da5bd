"""Rank 0's training logs: per-step CSV, TensorBoard and the DVC plot files."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

log = logging.getLogger("avat3r.training")


class TrainLogger:
    """Rank 0's per-step CSV (``train_log.csv``), TensorBoard (``tensorboard/``) and the DVC plot
    files (``plots/train.csv``, ``plots/val.csv``). On resume, rows after the resumed step (from a
    run killed between checkpoints) are dropped, so each step appears once."""

    TRAIN_FIELDS = ["step", "epoch", "loss", "l1", "ssim", "lpips", "lr", "grad_norm", "data_s", "forward_s",
                    "render_s", "backward_s", "step_s", "samples_per_s", "skipped_total"]
    #: psnr_inputs_code / psnr_inputs_expression / psnr_neutral_code: the same validation views rendered
    #: with the input frames' mean code / that code with the target's head pose / a neutral code
    #: (:mod:`avat3r_core.animation.sensitivity`); psnr above psnr_inputs_expression is what the
    #: expression earns, psnr_inputs_expression above psnr_inputs what the code's head pose does
    VAL_FIELDS = ["step", "psnr", "ssim", "baseline_psnr", "baseline_ssim", "psnr_inputs_code", "psnr_inputs_expression",
                  "psnr_neutral_code"]

    def __init__(self, out_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        (self.out_dir / "plots").mkdir(parents=True, exist_ok=True)
        self.files = {"train": self.out_dir / "train_log.csv", "val": self.out_dir / "plots" / "val.csv"}
        self.fields = {"train": self.TRAIN_FIELDS, "val": self.VAL_FIELDS}
        for kind, path in self.files.items():
            self._truncate(path, self.fields[kind], resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError as exc:  # pragma: no cover - tensorboard is a dependency
                log.warning("TensorBoard unavailable (%s); CSV only", exc)

    @staticmethod
    def _truncate(path: Path, fields: list[str], resume_step: int) -> None:
        rows = []
        if path.exists() and resume_step > 0:
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def _append(self, kind: str, row: dict) -> None:
        with self.files[kind].open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields[kind], extrasaction="ignore").writerow(row)

    def train(self, row: dict) -> None:
        self._append("train", row)
        if self.writer is not None:
            step = row["step"]
            for key in self.TRAIN_FIELDS[2:]:
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def val(self, row: dict) -> None:
        self._append("val", row)
        if self.writer is not None:
            for key in self.VAL_FIELDS[1:]:
                if isinstance(row.get(key), (int, float)):
                    self.writer.add_scalar(f"val/{key}", row[key], row["step"])

    def finish(self) -> None:
        # plots/train.csv: the loss curve for DVC (step, loss terms, lr)
        with self.files["train"].open(newline="") as f:
            rows = list(csv.DictReader(f))
        keep = ["step", "loss", "l1", "ssim", "lr", "samples_per_s"]
        with (self.out_dir / "plots" / "train.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        if self.writer is not None:
            self.writer.close()
