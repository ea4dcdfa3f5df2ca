"""Fine-tune a Grounding DINO detector on COCO-format data with transformers' own loss.

    detector train --images DIR --annotations instances.json --model M --out RUN --steps 2000

Each training image gets a caption made of its categories' names (`"cat . dog . person ."`):
all its positive categories plus randomly drawn negative ones, shuffled, as many as fit in
the model's 256 text tokens (as GroundingDINO is trained on O365 / COCO). transformers' loss
(`GroundingDinoForObjectDetection(..., labels=...)`) numbers the caption's phrases by the
token groups between `.` separators, so a box's `class_labels` entry is the position of its
category in that caption, and its box is normalized cxcywh.

The run writes `RUN/checkpoints/checkpoint-STEP/` every `--save-every` steps, keeping the
newest `--keep-checkpoints`, as `gligen train` does (an HF directory that
`OpenSetDetector.from_pretrained` loads, plus `training_state.safetensors` / `.json`: the
optimizer, scheduler, step and RNG states) and the final detector to `RUN/model/`; each
directory appears atomically. `--resume` continues from the newest checkpoint: the data
order is a function of (seed, step), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import GroundingDinoProcessor, get_cosine_schedule_with_warmup
from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

from detector.model import load_detector
from detector.preprocess import ImageSettings, preprocess
from detector.prompt import MAX_TEXT_TOKENS, build_caption, normalize_phrase
from gligen.commands import number, positive_int, seed
from gligen.errors import ignore_stop_signals, require
from gligen.eval.annotations import check_bbox, check_size
from gligen.files import Output, atomic_directory, open_image, read_json, write_json
from gligen.training import checkpoint

BACKBONE_LR_SCALE = 0.1  # DETR / GroundingDINO fine-tuning: pretrained image and text backbones learn 10x slower
WEIGHT_DECAY = 1e-4
MAX_GRAD_NORM = 0.1  # GroundingDINO's clip_max_norm
LONGEST_PER_SHORTEST = 1333 / 800  # --image-size scales Grounding DINO's 800 / 1333 resize together


@dataclass
class TrainConfig:
    images: str
    annotations: str
    model: str
    out: str
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    backbone_lr_scale: float = BACKBONE_LR_SCALE  # 1 for backbones trained from scratch
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    save_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    seed: int = 0
    image_size: int = 800  # shortest side; the longest is at most image_size * 1333 / 800
    workers: int = 2


# ----------------------------------------------------------------------------- data


@dataclass
class CocoImage:
    path: Path
    boxes: torch.Tensor  # (N, 4) float32, normalized cxcywh
    categories: list[int]  # (N,) index into CocoDetection.names


class CocoDetection:
    """A COCO instances file: category names and, per image with boxes, its boxes.

    Crowd annotations are skipped, and so are images without any box.
    """

    def __init__(self, images_dir: str | os.PathLike, annotations: str | os.PathLike):
        images_dir, annotations = Path(images_dir), Path(annotations)
        require(images_dir.is_dir(), f"{images_dir}: images directory not found")
        data = _read_json(annotations)
        where = str(annotations)
        for key in ("images", "annotations", "categories"):
            require(isinstance(data.get(key), list), f"{where}: missing the list '{key}'")
        category_index, self.names = {}, []
        for i, category in enumerate(data["categories"]):
            name = category.get("name") if isinstance(category, dict) else None
            require(isinstance(name, str) and bool(name.strip()), f"{where}: category {i} has no 'name'")
            # '.' and '?' are the caption's phrase separators for transformers' loss
            require(not set(name) & {".", "?"}, f"{where}: category {i} ({name!r}) contains '.' or '?'")
            require(isinstance(category.get("id"), (int, str)), f"{where}: category {i}: 'id' must be an integer")
            category_index[category.get("id")] = len(self.names)
            self.names.append(normalize_phrase(name))
        images = {}
        for i, image in enumerate(data["images"]):
            fields = {k: image.get(k) if isinstance(image, dict) else None for k in ("id", "file_name", "width", "height")}
            require(None not in fields.values(), f"{where}: image {i} needs 'id', 'file_name', 'width' and 'height'")
            require(isinstance(fields["file_name"], str), f"{where}: image {i}: 'file_name' must be a string")
            check_size(image, f"{where}: image {i}")
            require(isinstance(fields["id"], (int, str)), f"{where}: image {i}: 'id' must be an integer")
            images[fields["id"]] = fields
        boxes: dict[Any, list[tuple[list[float], int]]] = {}
        for i, ann in enumerate(data["annotations"]):
            require(isinstance(ann, dict), f"{where}: annotation {i} is not an object")
            if ann.get("iscrowd", 0):
                continue
            image_id, category_id = ann.get("image_id"), ann.get("category_id")
            require(isinstance(image_id, (int, str)) and image_id in images,
                    f"{where}: annotation {i} has an unknown image_id {image_id!r}")
            require(isinstance(category_id, (int, str)) and category_id in category_index,
                    f"{where}: annotation {i} has an unknown category_id {category_id!r}")
            bbox = check_bbox(ann.get("bbox"), f"{where}: annotation {i}")
            require(bbox[2] > 0 and bbox[3] > 0, f"{where}: annotation {i} needs 'bbox' [x, y, w, h] with w, h > 0")
            boxes.setdefault(ann["image_id"], []).append((bbox, category_index[ann["category_id"]]))
        self.items = [_coco_image(images_dir, images[i], anns) for i, anns in boxes.items()]
        require(bool(self.items), f"{where}: no image has a (non-crowd) box to train on")


def _read_json(path: Path) -> dict:
    require(path.is_file(), f"{path}: annotations file not found")
    data = read_json(path)
    require(isinstance(data, dict), f"{path}: expected a COCO instances object")
    return data


def _coco_image(images_dir: Path, image: dict, anns: list[tuple[list[float], int]]) -> CocoImage:
    path = images_dir / image["file_name"]
    require(path.is_file(), f"{path}: image file not found (image id {image['id']!r})")
    x, y, w, h = torch.tensor([bbox for bbox, _ in anns], dtype=torch.float32).unbind(-1)
    x0, y0 = (x / image["width"]).clamp(0, 1), (y / image["height"]).clamp(0, 1)
    x1, y1 = ((x + w) / image["width"]).clamp(0, 1), ((y + h) / image["height"]).clamp(0, 1)
    boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return CocoImage(path, boxes, [c for _, c in anns])


class CaptionedExamples(Dataset):
    """Example `position` of the endless training stream: an image, its caption and targets.

    Position p is image `perm_e[p % n]` of epoch e = p // n, where `perm_e` is a permutation
    seeded by (seed, e); its caption's negatives and order are seeded by (seed, p). Everything
    is a function of the position, which is what makes resuming exact.
    """

    def __init__(self, coco: CocoDetection, tokenizer, seed: int, max_tokens: int = MAX_TEXT_TOKENS):
        self.coco, self.seed, self.max_tokens = coco, seed, max_tokens
        self._epoch, self._order = -1, []
        ids = tokenizer(coco.names, add_special_tokens=False)["input_ids"]
        self.cost = [len(i) + 1 for i in ids]  # a phrase's tokens and the "." after it
        for item in coco.items:
            positives = set(item.categories)
            require(
                2 + sum(self.cost[c] for c in positives) <= max_tokens,
                f"{item.path}: its {len(positives)} category names need more than {max_tokens} text tokens",
            )

    def _permutation(self, epoch: int) -> list[int]:
        if self._epoch != epoch:  # one permutation per epoch, drawn once per worker
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.coco.items), generator=generator).tolist()
        return self._order

    def item_at(self, position: int) -> CocoImage:
        epoch, i = divmod(position, len(self.coco.items))
        return self.coco.items[self._permutation(epoch)[i]]

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.item_at(position)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * position + 1)
        chosen = self._categories(set(item.categories), generator)
        caption, _ = build_caption([self.coco.names[c] for c in chosen])
        labels = torch.tensor([chosen.index(c) for c in item.categories], dtype=torch.long)
        image = open_image(item.path)
        return {"image": image, "caption": caption, "labels": {"class_labels": labels, "boxes": item.boxes}}

    def _categories(self, positives: set[int], generator: torch.Generator) -> list[int]:
        """The positives plus as many shuffled negatives as fit in the text budget, shuffled."""
        used = 2 + sum(self.cost[c] for c in positives)
        chosen = list(positives)
        for c in torch.randperm(len(self.coco.names), generator=generator).tolist():
            if c not in positives and used + self.cost[c] <= self.max_tokens:
                chosen.append(c)
                used += self.cost[c]
        return [chosen[j] for j in torch.randperm(len(chosen), generator=generator).tolist()]


class StepPositions(Sampler[int]):
    """Stream positions of this process's examples for steps `start`..`steps - 1`.

    A step consumes `batch_size * num_processes` consecutive positions; process r takes
    its `batch_size` slice of them.
    """

    def __init__(self, start: int, steps: int, batch_size: int, rank: int = 0, num_processes: int = 1):
        self.start, self.steps, self.batch_size = start, steps, batch_size
        self.rank, self.num_processes = rank, num_processes

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.steps):
            first = (step * self.num_processes + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch_size


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep images as PIL (resized on the training device) and targets as a list."""
    return {
        "images": [e["image"] for e in examples],
        "captions": [e["caption"] for e in examples],
        "labels": [e["labels"] for e in examples],
    }


def model_inputs(batch: dict[str, Any], tokenizer, settings: ImageSettings, device: torch.device) -> dict[str, Any]:
    """Collated examples -> keyword arguments of `GroundingDinoForObjectDetection.forward`.

    pixel_values (B, 3, H, W) float32, pixel_mask (B, H, W), input_ids / attention_mask /
    token_type_ids (B, T), labels: B dicts of class_labels (N,) and boxes (N, 4).
    """
    images = preprocess(batch["images"], settings, device, torch.float32)
    text = tokenizer(batch["captions"], padding="longest", return_tensors="pt").to(device)
    labels = [{k: v.to(device) for k, v in target.items()} for target in batch["labels"]]
    return {
        "pixel_values": images.pixel_values,
        "pixel_mask": images.pixel_mask,
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "token_type_ids": text["token_type_ids"],
        "labels": labels,
    }


# ----------------------------------------------------------------------------- checkpoints


State = tuple[dict[str, torch.Tensor], dict[str, Any]]  # tensors for safetensors, the rest for JSON


def save_detector(path: Path, model, processor, training_state: State | None = None) -> None:
    """Write an HF detector directory (+ training state) at `path`, atomically as a whole."""
    with atomic_directory(path, replace=True) as tmp:
        model.save_pretrained(tmp)  # safetensors
        processor.save_pretrained(tmp)
        if training_state is not None:
            tensors, meta = training_state
            save_file(tensors, tmp / "training_state.safetensors")
            write_json(tmp / "training_state.json", meta)


def training_state(step: int, optimizer, scheduler, scaler=None) -> State:
    """Optimizer tensors and RNG states as tensors; step, scheduler, fp16 loss scale and the rest as JSON."""
    optim = optimizer.state_dict()
    tensors = {f"optimizer.{pid}.{k}": v.contiguous() for pid, s in optim["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"step": step, "param_groups": optim["param_groups"], "scheduler": scheduler.state_dict()}
    if scaler is not None:
        meta["grad_scaler"] = scaler.state_dict()
    return tensors, meta


def load_training_state(path: Path, optimizer, scheduler, scaler=None) -> int:
    """Restore what `training_state` saved in checkpoint `path`; return its step."""
    tensors = load_file(path / "training_state.safetensors")
    meta = json.loads((path / "training_state.json").read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(meta["grad_scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    return int(meta["step"])


# ----------------------------------------------------------------------------- training


def parameter_groups(model, lr: float, backbone_lr_scale: float = BACKBONE_LR_SCALE) -> list[dict[str, Any]]:
    """Two AdamW groups: the image / text backbones at lr * backbone_lr_scale, the rest at lr."""
    backbone_ids = {id(p) for m in (model.model.backbone, model.model.text_backbone) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in backbone_ids], "lr": lr},
        {"params": [p for p in params if id(p) in backbone_ids], "lr": lr * backbone_lr_scale},
    ]


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune; return the loss of each step run (from the resumed step on).

    `on_step(step, loss)` is called after each optimizer step (e.g. to time the steps).
    """
    require(config.steps > 0, f"--steps must be positive, got {config.steps}")
    require(config.batch_size > 0, f"--batch-size must be positive, got {config.batch_size}")
    require(config.backbone_lr_scale >= 0, f"--backbone-lr-scale must not be negative, got {config.backbone_lr_scale}")
    require(config.save_every > 0, f"--save-every must be positive, got {config.save_every}")
    # the coarsest feature map is 1/64 of the image; at 1 x 1 its GroupNorm fails on single images
    require(config.image_size >= 128, f"--image-size must be at least 128, got {config.image_size}")
    out = Path(config.out)
    resume_from = checkpoint.latest(out) if config.resume else None
    require(not config.resume or resume_from is not None, f"--resume: no checkpoints/checkpoint-* directory in {out}")

    coco = CocoDetection(config.images, config.annotations)  # bad data fails before the model loads

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    torch.manual_seed(config.seed)
    model, tokenizer, source = load_detector(str(resume_from or config.model))
    model.train()
    settings = training_settings(source, config.image_size)
    processor = processor_for(tokenizer, settings)
    examples = CaptionedExamples(coco, tokenizer, config.seed, model.config.max_text_len)

    optimizer = torch.optim.AdamW(parameter_groups(model, config.lr, config.backbone_lr_scale), weight_decay=WEIGHT_DECAY)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.steps // 20, config.steps)
    start = load_training_state(resume_from, optimizer, scheduler, accelerator.scaler) if resume_from else 0
    # the scheduler is not prepared: accelerate would step it once per process per step
    model, optimizer = accelerator.prepare(model, optimizer)

    positions = StepPositions(start, config.steps, config.batch_size, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(
        examples, batch_size=config.batch_size, sampler=positions, collate_fn=collate,
        num_workers=config.workers, generator=torch.Generator(),  # leave the global RNG to the model
        worker_init_fn=ignore_stop_signals,
    )
    bar = tqdm(total=config.steps, initial=start, desc="train", disable=not accelerator.is_main_process)
    losses = []
    for step, batch in enumerate(loader, start + 1):
        loss = model(**model_inputs(batch, tokenizer, settings, accelerator.device)).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        require(math.isfinite(losses[-1]), f"step {step}: the loss is {losses[-1]}; lower --lr or use --mixed-precision no")
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if on_step is not None:
            on_step(step, losses[-1])
        if step % config.save_every == 0 or step == config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = training_state(step, optimizer, scheduler, accelerator.scaler)
                save_detector(checkpoint.checkpoint_dir(out, step), accelerator.unwrap_model(model), processor, state)
                checkpoint.prune(out, config.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_detector(out / "model", accelerator.unwrap_model(model), processor)
    return losses


def training_settings(source: ImageSettings, image_size: int) -> ImageSettings:
    """The checkpoint's normalization with Grounding DINO's resize scaled to `image_size`."""
    return replace(source, shortest_edge=image_size, longest_edge=round(image_size * LONGEST_PER_SHORTEST))


def processor_for(tokenizer, settings: ImageSettings) -> GroundingDinoProcessor:
    """The processor saved with checkpoints: the tokenizer and the resize the model was tuned at."""
    size = {"shortest_edge": settings.shortest_edge, "longest_edge": settings.longest_edge}
    images = GroundingDinoImageProcessorPil(size=size, image_mean=list(settings.mean), image_std=list(settings.std))
    return GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `detector train` to the `detector` command."""
    parser = subparsers.add_parser("train")
    parser.add_argument("--images", required=True, help="directory of the images")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (images, annotations, categories)")
    parser.add_argument("--model", required=True, help="detector to start from: HF directory or hub id")
    parser.add_argument("--out", required=True, type=Output, help="run directory: checkpoints/checkpoint-STEP/ and model/")
    parser.add_argument("--steps", type=positive_int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size,
                        help="images per step and process")
    parser.add_argument("--lr", type=number(float, 0, low_open=True), default=TrainConfig.lr, help="AdamW learning rate")
    parser.add_argument(
        "--backbone-lr-scale", type=number(float, 0), default=TrainConfig.backbone_lr_scale,
        help="the image and text backbones learn at lr times this (1 for backbones trained from scratch)",
    )
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=TrainConfig.mixed_precision)
    parser.add_argument("--save-every", type=positive_int, default=TrainConfig.save_every,
                        help="checkpoint every N steps")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=TrainConfig.keep_checkpoints,
                        help="keep the newest N checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--seed", type=seed, default=TrainConfig.seed)
    parser.add_argument(
        "--image-size", type=positive_int, default=TrainConfig.image_size,
        help="shortest image side (longest at most size * 1333 / 800); smaller for small data sets",
    )
    parser.add_argument("--workers", type=number(int, 0), default=TrainConfig.workers, help="image loading processes")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    fields = TrainConfig.__dataclass_fields__
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
