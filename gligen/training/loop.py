"""The training loop: batches -> updates, with logs, checkpoints and validation on their schedules.

Ctrl-C and SIGTERM stop the run at the end of the update under way: a checkpoint is saved
there when the last one took at most `QUICK_SAVE_SECONDS` (else the run resumes from the
last one), then KeyboardInterrupt or `gligen.errors.Terminated` is raised (exit 130 / 143
under `run_cli`). A second signal stops at once. Under several processes one process's
signal stops them all at the same update.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from gligen.devices import parse_dtype
from gligen.errors import Terminated, UserError, ignore_stop_signals
from gligen.training import checkpoint, trackers, validation
from gligen.training.dataset import ShardDataset

if TYPE_CHECKING:
    from gligen.training.trainer import Trainer

QUICK_SAVE_SECONDS = 10.0


class TrainingStopped(UserError):
    """The run cannot go on (too many non-finite losses in a row)."""


@dataclass
class Window:
    """What happened since the last log line."""

    loss: float = 0.0
    good: int = 0
    bad: int = 0
    grad_norm: float = 0.0
    images: int = 0
    start: float = field(default_factory=time.perf_counter)

    def mean_loss(self, accumulation_steps: int) -> float:
        return self.loss / (self.good * accumulation_steps)

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        return {
            "loss": self.mean_loss(trainer.config.gradient_accumulation_steps),
            "lr": trainer.lr_scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm / self.good,
            "images_per_s": self.images / elapsed,
            "steps_per_s": (self.good + self.bad) / elapsed,
            **skipped_samples(trainer),
            "bad_steps": self.bad,
        }


class StopRequests:
    """Within `with`: SIGINT / SIGTERM only set `signum`; a second one raises at once (KeyboardInterrupt / Terminated)."""

    def __init__(self):
        self.signum = 0
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(trainer: Trainer) -> Path:
    """Train to `max_steps` (resuming from the latest checkpoint) and export the adapter -> its directory."""
    config, accelerator = trainer.config, trainer.accelerator
    if checkpoint.resume(trainer) is not None and accelerator.is_main_process:
        trackers.trim_metrics(trainer.metrics_path, trainer.step)
    trackers.start(accelerator, config)
    dataset = ShardDataset(
        config.data, config.batch_size, config.seed, accelerator.process_index, accelerator.num_processes,
        trainer.positions, with_references=trainer.adapter.config.feature_type == "text-image-box",
        condition=trainer.adapter.condition_type,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=config.data.num_workers,
                                         worker_init_fn=ignore_stop_signals)
    bar = tqdm(total=config.max_steps, initial=trainer.step, desc="training", unit="step",
               disable=not accelerator.is_local_main_process)
    window, skip_update, read, stopping = Window(), False, {}, 0
    with StopRequests() as stop:
        for batch in loader:
            if trainer.step >= config.max_steps:
                break
            read[batch.reader] = batch.position
            with accelerator.accumulate(trainer.model):
                loss = trainer.loss(batch)
                flags = torch.stack([torch.isfinite(loss.detach()).float(), loss.new_tensor(float(stop.signum))])
                flags = accelerator.gather(flags.reshape(1, 2)).reshape(-1, 2)
                stopping = stopping or int(flags[:, 1].max())
                if bool(flags[:, 0].all()):
                    accelerator.backward(loss)
                    window.loss += loss.item()
                else:
                    skip_update = True
                window.images += len(batch.captions) * accelerator.num_processes
                if accelerator.sync_gradients:
                    trainer.positions.update(read)  # the data an update consumed is consumed with it
                    if skip_update:
                        bad_step(trainer, loss.item(), bar)
                        window.bad += 1
                    else:
                        update(trainer, window)
                        bar.update(1)
                        bar.set_postfix(loss=f"{window.mean_loss(config.gradient_accumulation_steps):.4f}", refresh=False)
                        if trainer.step % config.log_every == 0:
                            log(trainer, window.metrics(trainer))
                            window = Window()
                        after_update(trainer)
                    trainer.optimizer.zero_grad(set_to_none=True)
                    skip_update = False
                    if stopping:
                        break
    bar.close()
    if stopping and trainer.step < config.max_steps:
        stop_now(trainer, stopping)
    if trainer.step and not checkpoint.checkpoint_dir(trainer.output_dir, trainer.step).is_dir():
        checkpoint.save(trainer)
    report_skipped(trainer)
    out = trainer.output_dir / "adapter"
    adapter = checkpoint.inference_adapter(trainer)
    if adapter is not None:
        adapter.to(parse_dtype(config.adapter_dtype)).save_pretrained(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def update(trainer: Trainer, window: Window) -> None:
    """Clip, step the optimizer, the lr schedule and the EMA: one update of the adapter."""
    norm = trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.config.optim.max_grad_norm)
    if norm is None:  # DeepSpeed clips inside its step, which accelerate's backward has taken
        norm = trainer.model.get_global_grad_norm()
    window.grad_norm += float(norm) if norm is not None else float("nan")
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    if trainer.ema:
        trainer.ema.step(trainer.trainable)
    trainer.step += 1
    trainer.bad_in_a_row = 0
    window.good += 1


def bad_step(trainer: Trainer, value: float, bar: tqdm) -> None:
    """A non-finite loss: no update; too many in a row stop the run."""
    trainer.bad_in_a_row += 1
    limit = trainer.config.max_bad_steps_in_a_row
    if trainer.accelerator.is_main_process:
        bar.write(f"step {trainer.step + 1}: loss is {value}; skipping the update "
                  f"({trainer.bad_in_a_row} in a row, stop at {limit})")
    if trainer.bad_in_a_row >= limit:
        raise TrainingStopped(
            f"{limit} non-finite losses in a row at step {trainer.step + 1} (max_bad_steps_in_a_row); "
            f"stopping. Lower optim.lr or try mixed_precision=bf16, then resume from the last checkpoint"
        )


def after_update(trainer: Trainer) -> None:
    """Checkpoints and validation on their schedules."""
    config, step = trainer.config, trainer.step
    if step % config.checkpoint_every == 0:
        checkpoint.save(trainer)
    if config.validation.every and step % config.validation.every == 0:
        if trainer.gain_batch is not None:
            log(trainer, trainer.grounding_gain())
        if trainer.validation_layouts:
            path = validation.validation_grid(trainer)
            if path is not None:
                log(trainer, {"validation_grid": str(path)})


def log(trainer: Trainer, metrics: dict) -> None:
    trackers.log(trainer.accelerator, trainer.metrics_path, trainer.step, metrics)


def skipped_samples(trainer: Trainer) -> dict[str, Any]:
    """Corrupt samples skipped so far by all readers of all processes: their number, and by reason."""
    mine: dict[str, int] = {}
    for position in trainer.positions.values():
        for reason, n in position.skipped_by_reason.items():
            mine[reason] = mine.get(reason, 0) + n
    by_reason: dict[str, int] = {}
    for theirs in gather_object([mine]):
        for reason, n in theirs.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    return {"skipped_samples": sum(by_reason.values()), "skipped_by_reason": dict(sorted(by_reason.items()))}


def report_skipped(trainer: Trainer) -> None:
    """The end-of-run count of lost data, on stderr when anything was lost (metrics.jsonl has it at every log)."""
    skipped = skipped_samples(trainer)
    if skipped["skipped_samples"] and trainer.accelerator.is_main_process:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped["skipped_by_reason"].items())
        print(f"training: skipped {skipped['skipped_samples']} corrupt samples ({reasons}); "
              f"see the warnings above and {trainer.metrics_path}", file=sys.stderr)


def stop_now(trainer: Trainer, signum: int) -> None:
    """Save a checkpoint at this update if that is quick, then raise what the signal means."""
    quick = trainer.last_save_seconds is None or trainer.last_save_seconds <= QUICK_SAVE_SECONDS
    if trainer.step and quick and not checkpoint.checkpoint_dir(trainer.output_dir, trainer.step).is_dir():
        checkpoint.save(trainer)
    trainer.accelerator.end_training()  # the trackers write what they hold
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
