"""Verification: does an image show its layout's entities where the layout put them?

Per entity, the detector looks for its phrase; the entity is matched to the detection of
that phrase that overlaps its box most, and passes when that IoU reaches `iou_threshold`.
Entities with the same phrase ("a cat", "a cat") never share a detection: pairs are
assigned greedily by decreasing IoU (then score). An entity left without a detection has
IoU 0 and fails. Over a set of images these give the COCO-MIG measures: the instance
success rate (passing entities / entities) and the mean IoU over entities.

    detector verify generated.png --layout layout.json --out verification.json --overlay overlays/
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from detector.box_ops import box_iou
from detector.detect import Detections, OpenSetDetector
from detector.prompt import normalize_phrase
from gligen.draw import PALETTE, draw_boxes
from gligen.errors import UserError, require
from gligen.files import open_image
from gligen.layout import Box, Layout, load_layouts


@dataclass
class EntityCheck:
    """One entity of the layout against the detections of its phrase (boxes normalized xyxy)."""

    phrase: str
    box: Box
    detected_box: Box | None  # the matched detection, None when the phrase was not found
    score: float  # detection score of the matched detection (0 when none)
    iou: float
    success: bool

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["box"] = [round(v, 6) for v in self.box]
        out["detected_box"] = None if self.detected_box is None else [round(v, 6) for v in self.detected_box]
        out["score"], out["iou"] = round(self.score, 6), round(self.iou, 6)
        return out


@dataclass
class Verification:
    """All entities of one image's layout; rates are 0 for a layout without entities."""

    entities: list[EntityCheck]

    @property
    def success_rate(self) -> float:
        return sum(e.success for e in self.entities) / len(self.entities) if self.entities else 0.0

    @property
    def mean_iou(self) -> float:
        return sum(e.iou for e in self.entities) / len(self.entities) if self.entities else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "success_rate": self.success_rate,
            "mean_iou": self.mean_iou,
            "entities": [e.to_dict() for e in self.entities],
        }


def greedy_match(iou: torch.Tensor, scores: torch.Tensor) -> list[int | None]:
    """One-to-one matching, best pairs first (highest IoU, then highest score).

    iou: (E, K) between E entities and K detections, scores: (K,). Returns, per entity, the
    index of its detection, or None when the detections ran out.
    """
    pairs = sorted(
        ((iou[e, k].item(), scores[k].item(), e, k) for e in range(iou.shape[0]) for k in range(iou.shape[1])),
        reverse=True,
    )
    match: list[int | None] = [None] * iou.shape[0]
    taken = set()
    for _, _, e, k in pairs:
        if match[e] is None and k not in taken:
            match[e] = k
            taken.add(k)
    return match


def match_entities(layout: Layout, detections: Detections, iou_threshold: float = 0.5) -> Verification:
    """Check `layout`'s entities against `detections`, whose phrase ids index `distinct_phrases(layout)`."""
    phrase_ids = _phrase_ids(layout)
    checks: list[EntityCheck | None] = [None] * len(layout.entities)
    for pid in set(phrase_ids):
        entities = [i for i, p in enumerate(phrase_ids) if p == pid]
        candidates = (detections.phrase_ids == pid).nonzero()[:, 0].tolist()
        boxes = torch.tensor([layout.entities[i].box for i in entities])
        iou = box_iou(boxes, detections.boxes[candidates])
        for row, (i, k) in enumerate(zip(entities, greedy_match(iou, detections.scores[candidates]))):
            entity = layout.entities[i]
            if k is None:
                checks[i] = EntityCheck(entity.phrase, entity.box, None, 0.0, 0.0, False)
                continue
            value = float(iou[row, k])
            detected = candidates[k]
            checks[i] = EntityCheck(
                entity.phrase, entity.box, tuple(detections.boxes[detected].tolist()),
                float(detections.scores[detected]), value, value >= iou_threshold,
            )
    return Verification(checks)


def distinct_phrases(layout: Layout) -> list[str]:
    """The phrases the detector is asked for: each normalized phrase once, in order."""
    return list(dict.fromkeys(normalize_phrase(p) for p in layout.phrases))


def _phrase_ids(layout: Layout) -> list[int]:
    distinct = distinct_phrases(layout)
    return [distinct.index(normalize_phrase(p)) for p in layout.phrases]


def verify(
    detector: OpenSetDetector,
    image: Image.Image,
    layout: Layout,
    iou_threshold: float = 0.5,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
) -> Verification:
    """Check one image against its layout. See the module docstring for the matching rule."""
    return verify_batch(detector, [image], [layout], iou_threshold, box_threshold, text_threshold)[0]


def verify_batch(
    detector: OpenSetDetector,
    images: Sequence[Image.Image],
    layouts: Sequence[Layout],
    iou_threshold: float = 0.5,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
) -> list[Verification]:
    """Check image i against layout i, all images in one batched detector call."""
    require(len(images) == len(layouts), f"verify: {len(images)} images but {len(layouts)} layouts")
    results = [Verification([]) for _ in layouts]  # a layout without entities has nothing to find
    todo = [i for i, layout in enumerate(layouts) if layout.entities]
    if todo:
        detections = detector.detect(
            [images[i] for i in todo], [distinct_phrases(layouts[i]) for i in todo],
            box_threshold=box_threshold, text_threshold=text_threshold,
        )
        for i, found in zip(todo, detections):
            results[i] = match_entities(layouts[i], found, iou_threshold)
    return results


def summarize(verifications: Sequence[Verification]) -> dict[str, Any]:
    """COCO-MIG measures over a set: instance success rate and mean IoU over all entities,
    plus the image success rate (images whose entities all pass)."""
    checks = [e for v in verifications for e in v.entities]
    count = len(checks)
    return {
        "instance_success_rate": sum(e.success for e in checks) / count if count else 0.0,
        "mean_iou": sum(e.iou for e in checks) / count if count else 0.0,
        "image_success_rate": (
            sum(all(e.success for e in v.entities) for v in verifications) / len(verifications) if verifications else 0.0
        ),
        "num_entities": count,
        "num_images": len(verifications),
    }


def overlay(image: Image.Image, verification: Verification) -> Image.Image:
    """The image with each entity's layout box and its matched detection in the entity's colour."""
    boxes, labels, colors = [], [], []
    for i, check in enumerate(verification.entities):
        color = PALETTE[i % len(PALETTE)]
        boxes.append(check.box)
        labels.append(check.phrase)
        colors.append(color)
        if check.detected_box is not None:
            boxes.append(check.detected_box)
            labels.append(f"{check.phrase}: IoU {check.iou:.2f} {'pass' if check.success else 'fail'}")
            colors.append(color)
    return draw_boxes(image, boxes, labels, colors=colors)


# ----------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `detector verify` to the `detector` command."""
    from detector.cli import add_model_args, add_output_args, add_threshold_args  # here: detector.cli imports this module
    from gligen.commands import number

    parser = subparsers.add_parser("verify")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--layout", required=True, help="layout .json/.jsonl: one layout for all images, or one per image")
    add_model_args(parser)
    add_output_args(parser, "the verification")
    parser.add_argument("--iou-threshold", type=number(float, 0, 1, low_open=True), default=0.5,
                        help="IoU for an entity to pass")
    add_threshold_args(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from detector.cli import load_from_args, write_outputs

    layouts = load_layouts(args.layout)
    if len(layouts) == 1:
        layouts = layouts * len(args.images)
    if len(layouts) != len(args.images):
        raise UserError(
            f"{args.layout}: holds {len(layouts)} layouts for {len(args.images)} images; give one or one per image"
        )
    images = [open_image(path) for path in args.images]
    results = verify_batch(
        load_from_args(args), images, layouts, args.iou_threshold, args.box_threshold, args.text_threshold
    )
    report = {
        "model": args.model,
        "iou_threshold": args.iou_threshold,
        "summary": summarize(results),
        "images": [{"image": path, **result.to_dict()} for path, result in zip(args.images, results)],
    }
    write_outputs(report, args.out, args.overlay, args.images, map(overlay, images, results))
