"""Where metrics go: `logs/metrics.jsonl` always, and the accelerate trackers named by `report_to`.

`report_to` names accelerate trackers (tensorboard, wandb, comet_ml, aim, mlflow, clearml,
dvclive, swanlab, trackio), "all" (every one installed) or "none". A tracker that is not
installed is skipped with a warning, so a run never fails for its logging. wandb runs offline
(files under `logs/`, `wandb sync` later) unless `WANDB_MODE` or `WANDB_API_KEY` is set.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from PIL import Image

from gligen.files import atomic_path
from gligen.training.config import TrainConfig

logger = logging.getLogger(__name__)

def installed_trackers(report_to: list[str]) -> list[str]:
    """The trackers of `report_to` that are installed here ("all": every installed one; "none": none)."""
    available = [str(kind) for kind in get_available_trackers()]
    wanted = available if "all" in report_to else [name for name in report_to if name != "none"]
    for name in wanted:
        if name not in available:
            logger.warning("report_to: %s is not installed; metrics go to logs/metrics.jsonl without it", name)
    return [name for name in wanted if name in available]


def start(accelerator: Accelerator, config: TrainConfig) -> None:
    """Start the trackers the accelerator was made with (see `installed_trackers`), with the config as run parameters."""
    kwargs = {}
    if "wandb" in accelerator.log_with and not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")):
        kwargs["wandb"] = {"mode": "offline", "dir": str(Path(config.output_dir) / "logs")}
    accelerator.init_trackers("gligen", config=flat(asdict(config)), init_kwargs=kwargs)


def log(accelerator: Accelerator, metrics_path: Path, step: int, metrics: dict[str, Any]) -> None:
    """One line of `metrics.jsonl` (main process) and the same metrics to every tracker.

    The line goes out in one append, so a killed run leaves whole lines (see `trim_metrics`).
    """
    if accelerator.log_with:
        accelerator.log(flat(metrics), step=step)
    if accelerator.is_main_process:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"step": step, **metrics}) + "\n").encode()
        fd = os.open(metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def trim_metrics(metrics_path: Path, step: int) -> None:
    """On resume at `step`: drop the lines logged after it (the rerun logs them again) and a cut last line."""
    if not metrics_path.is_file():
        return
    kept = []
    for line in metrics_path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write (older runs) or a foreign edit
            continue
        if line.endswith("\n") and record.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(metrics_path) as path:
        path.write_text("".join(kept))


def log_image(accelerator: Accelerator, name: str, image: Image.Image, step: int) -> None:
    """An image to the trackers that show images (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step)


def flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"optim.lr": ...} with values every tracker takes."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
