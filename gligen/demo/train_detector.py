"""Train the demo's detector from scratch on synthetic shapes and measure its AP50 on held-out images.

    python -m gligen.demo.train_detector --out DIR [--n-train N] [--steps S] [--minutes M] [--batch-size B] ...

1. data: `gligen data shapes --format coco` for training (seed 0) and held-out (seed 1) images;
2. the initial detector (`gligen.demo.detector_model`, random weights);
3. `detector train` on the training images (its Python entry point), backbones at the full
   learning rate since nothing is pretrained; with `--minutes`, a short calibration run first
   measures the step time and the run takes as many steps as fit in the budget (at most --steps);
4. the final weights saved in fp16 (the bundled format); their default box and text threshold
   set to the one whose detections on other shapes images (seed 2) have the best F1 (this small
   detector's scores run lower than Grounding DINO's, whose defaults 0.35 / 0.25 would miss
   many of its right boxes); then scored like `gligen eval score --real-images`: each held-out
   image's phrases detected, COCO AP against its boxes.

Everything is written under DIR. As `gligen.demo.train_base`, `--resume` continues the run in DIR from its
newest checkpoint (or starts it: the same command serves both), reusing the data; without it a DIR that
holds a run is refused:

    data/train/, data/heldout/   COCO images + instances.json
    initial/                     the detector before training
    run/                         `detector train`'s checkpoints and model/ (fp32)
    plan.json                    the training settings (steps included), so a resumed run keeps them
    model/                       the trained detector in fp16: what `gligen/demo/models/detector/` bundles
    eval/                        the evaluation reports (report.json, report.md, samples.png, ...)
    metrics.json                 AP50 and the rest, steps, sizes, timings, hardware
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import GroundingDinoProcessor

from detector.box_ops import box_iou
from detector.detect import OpenSetDetector
from detector.model import load_detector
from detector.train import TrainConfig, save_detector, train
from gligen.data.shapes import render, sample_scene, write_coco
from gligen.demo.detector_model import save_initial_detector
from gligen.errors import UserError, require, run_cli
from gligen.eval.annotations import load_eval_set
from gligen.eval.score import ScoreSettings, score_images
from gligen.files import read_json, write_json
from gligen.training import checkpoint

CALIBRATION_STEPS = 30  # (at most a quarter of --steps) a --minutes budget times the steps after the first third
EVAL_RESERVE_S = 30.0  # what a --minutes budget keeps for saving and scoring
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35)  # the default thresholds calibration chooses from
CALIBRATION_SEED = 2  # the shapes scenes of calibration: neither training's (0) nor the held-out ones (1)


def make_data(out: Path, n: int, seed: int, size: int) -> Path:
    """COCO shapes data under `out` (images/, instances.json), regenerated unless it holds exactly `n` images."""
    instances = out / "instances.json"
    if not (instances.is_file() and len(json.loads(instances.read_text())["images"]) == n):
        shutil.rmtree(out, ignore_errors=True)
        write_coco(str(out), n, size, seed)
    return out


def measure_step(config: TrainConfig, steps: int = CALIBRATION_STEPS) -> tuple[float, float]:
    """(seconds per training step, seconds of start-up) of `config`, from a short run in `config.out`.

    Steps of the first third are left out of the step time (warm-up: allocator, kernels, workers).
    """
    times: list[float] = []
    start = time.perf_counter()
    train(replace(config, steps=steps, save_every=steps), on_step=lambda step, loss: times.append(time.perf_counter()))
    skip = steps // 3
    per_step = (times[-1] - times[skip]) / (steps - 1 - skip)
    return per_step, times[0] - start - per_step


def plan_steps(args: argparse.Namespace, config: TrainConfig, started: float, scratch: Path) -> int:
    """--steps, or with --minutes as many steps (at most --steps) as fit in what is left of the budget."""
    if args.minutes is None:
        return args.steps
    per_step, startup = measure_step(replace(config, out=str(scratch)), max(3, min(CALIBRATION_STEPS, args.steps // 4)))
    shutil.rmtree(scratch, ignore_errors=True)
    left = started + 60 * args.minutes - time.perf_counter() - startup - EVAL_RESERVE_S
    steps = min(args.steps, int(left / per_step))
    print(f"calibration: {per_step:.3f} s/step; {steps} steps fit in the {args.minutes} minute budget")
    require(steps >= 1, f"--minutes {args.minutes}: no time is left to train after the data and the calibration")
    return steps


def save_fp16(run_model: Path, out: Path) -> None:
    """The trained detector `run_model` re-saved in fp16 at `out` (half the size; loads as fp32 too)."""
    model, _, _ = load_detector(str(run_model), dtype=torch.float16)
    save_detector(out, model, GroundingDinoProcessor.from_pretrained(run_model))


def detection_f1(layouts, detections, threshold: float) -> float:
    """F1 of the detections scoring at least `threshold`: one is right when it overlaps a not yet matched true box
    of its phrase at IoU >= 0.5 (best scores matched first)."""
    right = detected = 0
    for layout, found in zip(layouts, detections):
        kept = (found.scores >= threshold).nonzero()[:, 0].tolist()  # best first
        detected += len(kept)
        if not kept:
            continue
        ious = box_iou(found.boxes[kept], torch.tensor(layout.boxes, dtype=torch.float32))
        free = set(range(len(layout.entities)))
        for row, k in enumerate(kept):
            phrase = found.phrases[int(found.phrase_ids[k])]
            hit = next((e for e in sorted(free) if layout.phrases[e] == phrase and ious[row, e] >= 0.5), None)
            if hit is not None:
                free.discard(hit)
                right += 1
    total = detected + sum(len(layout.entities) for layout in layouts)
    return 2 * right / total if total else 0.0


def calibrate_thresholds(model_dir: Path, n: int, size: int, device: str) -> tuple[float, float]:
    """Set the detector's default box and text threshold (its config.json's `box_threshold`, `text_threshold`, which
    `OpenSetDetector.from_pretrained` reads) to the one of `THRESHOLDS` with the best detection F1 on `n` shapes
    scenes of `CALIBRATION_SEED`; returns (threshold, F1)."""
    detector = OpenSetDetector.from_pretrained(str(model_dir), device=device)
    scenes = [render(sample_scene(CALIBRATION_SEED, i), size=size) for i in range(n)]
    layouts = [layout for _, layout in scenes]
    lowest = min(THRESHOLDS)
    found = detector.detect([image for image, _ in scenes], [layout.phrases for layout in layouts],
                            box_threshold=lowest, text_threshold=lowest, batch_size=32)
    f1 = {threshold: detection_f1(layouts, found, threshold) for threshold in THRESHOLDS}
    best = max(THRESHOLDS, key=f1.__getitem__)
    config = read_json(model_dir / "config.json")
    write_json(model_dir / "config.json", {**config, "box_threshold": best, "text_threshold": best})
    return best, f1[best]


def evaluate(model_dir: Path, heldout: Path, out: Path, device: str, size: int) -> dict:
    """`gligen eval score --real-images` of the held-out images: the detector's report (metrics, layout checks)."""
    detector = OpenSetDetector.from_pretrained(str(model_dir), device=device)
    eval_set = load_eval_set(heldout / "instances.json", size=size)
    return score_images(detector, eval_set, heldout / "images", out, real_images=True,
                        settings=ScoreSettings(batch_size=32))


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    require(args.n_train > 0 and args.n_eval > 0, "--n-train and --n-eval must be positive")
    require(args.minutes is None or args.minutes > 0, f"--minutes must be positive, got {args.minutes}")
    out = Path(args.out)
    plan = out / "plan.json"
    if plan.is_file() and not args.resume:
        raise UserError(f"{out} holds a previous run; pass --resume to continue it or use an empty --out")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_data = make_data(out / "data" / "train", args.n_train, seed=0, size=args.shapes_size)
    heldout = make_data(out / "data" / "heldout", args.n_eval, seed=1, size=args.shapes_size)
    if not (out / "initial" / "config.json").is_file():
        save_initial_detector(out / "initial", seed=args.seed, image_size=args.image_size)
    data_s = time.perf_counter() - started

    config = TrainConfig(
        images=str(train_data / "images"), annotations=str(train_data / "instances.json"),
        model=str(out / "initial"), out=str(out / "run"), batch_size=args.batch_size, lr=args.lr,
        backbone_lr_scale=1.0, mixed_precision=args.mixed_precision or ("bf16" if device == "cuda" else "no"),
        save_every=args.save_every, seed=args.seed, image_size=args.image_size, workers=args.workers,
    )
    if args.resume and plan.is_file():
        config = TrainConfig(**json.loads(plan.read_text()))
    else:
        config = replace(config, steps=plan_steps(args, config, started, out / "calibration"))
        write_json(plan, asdict(config))
    train_started = time.perf_counter()
    losses = train(replace(config, resume=args.resume and checkpoint.latest(Path(config.out)) is not None))
    train_s = time.perf_counter() - train_started

    eval_started = time.perf_counter()
    save_fp16(out / "run" / "model", out / "model")
    threshold, f1 = calibrate_thresholds(out / "model", args.n_eval, args.shapes_size, device)
    report = evaluate(out / "model", heldout, out / "eval", device, args.shapes_size)
    eval_s = time.perf_counter() - eval_started

    model = out / "model"
    metrics = {
        **report["metrics"],
        "instance_success_rate": report["layout"]["instance_success_rate"],
        "mean_iou": report["layout"]["mean_iou"],
        "threshold": threshold,  # the default box and text threshold, calibrated (the success rate is at it)
        "calibration_f1": f1,
        "eval_images": report["num_images"],
        "train_images": args.n_train,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "image_size": config.image_size,
        "mixed_precision": config.mixed_precision,
        "final_loss": losses[-1] if losses else None,
        "parameters": sum(p.numel() for p in load_detector(str(model))[0].parameters()),
        "model_mb": round(directory_mb(model), 2),
        "seconds": {"data": round(data_s, 1), "train": round(train_s, 1), "eval": round(eval_s, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "hardware": hardware(device),
        "command": args.command,
    }
    write_json(out / "metrics.json", metrics)
    print(f"AP50 {metrics['AP50']:.3f} on {metrics['eval_images']} held-out images; "
          f"{config.steps} steps in {train_s / 60:.1f} min; metrics in {out / 'metrics.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gligen.demo.train_detector", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (data/, run/, model/, metrics.json, ...)")
    parser.add_argument("--n-train", type=int, default=10000, help="training images")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out images scored at the end")
    parser.add_argument("--steps", type=int, default=4000, help="training steps (the most, with --minutes)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-time budget of the whole job: as many steps as fit (at most --steps), measured first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate (warmup, cosine decay)")
    parser.add_argument("--shapes-size", type=int, default=64, help="side of the shapes images, as the base model draws them")
    parser.add_argument("--image-size", type=int, default=128, help="the shapes images are upsampled to this")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: bf16 on a GPU, no on the CPU")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image loading processes")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint (or start it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    parser.set_defaults(command=f"{parser.prog} {shlex.join(argv)}")  # recorded in metrics.json
    sys.exit(run_cli(parser, argv))


if __name__ == "__main__":
    main()
