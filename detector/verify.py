"""Verification: does an image show its layout's entities where the layout put them?

Per entity, the detector looks for its phrase; the entity is matched to the detection of
that phrase that overlaps its box most, and passes when that IoU reaches `iou_threshold`.
Entities with the same phrase ("a cat", "a cat") never share a detection: pairs are
assigned greedily by decreasing IoU (then score). An entity left without a detection has
IoU 0 and fails. Over a set of images these give the COCO-MIG measures: the instance
success rate (passing entities / entities) and the mean IoU over entities.

An entity with a reference image (text-image-box layouts) is also looked for by that image,
as a visual exemplar (its most object-like region), when the detector takes exemplars
(OWLv2): its check records that detection too (`exemplar`: box, score, IoU, success), beside
the phrase's, which alone decides `success`; the summary adds their exemplar success rate and
mean IoU. A detector that takes no exemplars checks their phrases only (`detector verify`
says so on stderr).

    detector verify generated.png --layout layout.json --out verification.json --overlay overlays/
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from detector.box_ops import box_iou
from detector.detect import Detections, OpenSetDetector
from detector.exemplars import Exemplar
from detector.prompt import normalize_phrase
from gligen.draw import PALETTE, draw_boxes
from gligen.errors import UserError, require
from gligen.files import open_image
from gligen.layout import Box, Layout, load_layouts


@dataclass
class Match:
    """The detection matched to a layout box (boxes normalized xyxy); no detection: box None, score and IoU 0."""

    detected_box: Box | None
    score: float
    iou: float
    success: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "detected_box": None if self.detected_box is None else [round(v, 6) for v in self.detected_box],
            "score": round(self.score, 6), "iou": round(self.iou, 6), "success": self.success,
        }


@dataclass
class EntityCheck:
    """One entity of the layout against the detections of its phrase (and of its reference image)."""

    phrase: str
    box: Box
    detected_box: Box | None  # the matched detection, None when the phrase was not found
    score: float  # detection score of the matched detection (0 when none)
    iou: float
    success: bool
    exemplar: Match | None = None  # the reference image's detection, when it was looked for

    def to_dict(self) -> dict[str, Any]:
        out = {"phrase": self.phrase, "box": [round(v, 6) for v in self.box],
               **Match(self.detected_box, self.score, self.iou, self.success).to_dict()}
        if self.exemplar is not None:
            out["exemplar"] = self.exemplar.to_dict()
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


def match_entities(
    layout: Layout, detections: Detections, iou_threshold: float = 0.5, exemplar_ids: dict[int, int] | None = None
) -> Verification:
    """Check `layout`'s entities against `detections`, whose phrase ids index `distinct_phrases(layout)`.

    `exemplar_ids`: entity index -> the phrase id of its reference image's exemplar query.
    """
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
    for i, query in (exemplar_ids or {}).items():
        checks[i].exemplar = _best_match(layout.entities[i].box, detections, query, iou_threshold)
    return Verification(checks)


def _best_match(box: Box, detections: Detections, query: int, iou_threshold: float) -> Match:
    """The detection of `query` overlapping `box` most (then scoring highest)."""
    candidates = (detections.phrase_ids == query).nonzero()[:, 0].tolist()
    [k] = greedy_match(box_iou(torch.tensor([box]), detections.boxes[candidates]), detections.scores[candidates])
    if k is None:
        return Match(None, 0.0, 0.0, False)
    value = float(box_iou(torch.tensor([box]), detections.boxes[candidates[k] : candidates[k] + 1])[0, 0])
    detected = candidates[k]
    return Match(tuple(detections.boxes[detected].tolist()), float(detections.scores[detected]), value,
                 value >= iou_threshold)


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
    box_threshold: float | None = None,
    text_threshold: float | None = None,
) -> Verification:
    """Check one image against its layout. See the module docstring for the matching rule."""
    return verify_batch(detector, [image], [layout], iou_threshold, box_threshold, text_threshold)[0]


def verify_batch(
    detector: OpenSetDetector,
    images: Sequence[Image.Image],
    layouts: Sequence[Layout],
    iou_threshold: float = 0.5,
    box_threshold: float | None = None,
    text_threshold: float | None = None,
) -> list[Verification]:
    """Check image i against layout i, all images in one batched detector call.

    Thresholds default to the detector family's. Reference images are read here; one that
    cannot be read is a `UserError` naming it.
    """
    require(len(images) == len(layouts), f"verify: {len(images)} images but {len(layouts)} layouts")
    results = [Verification([]) for _ in layouts]  # a layout without entities has nothing to find
    todo = [i for i, layout in enumerate(layouts) if layout.entities]
    if todo:
        exemplars = [reference_exemplars(layouts[i]) if detector.takes_exemplars else {} for i in todo]
        detections = detector.detect(
            [images[i] for i in todo], [distinct_phrases(layouts[i]) for i in todo],
            [list(e.values()) for e in exemplars], box_threshold=box_threshold, text_threshold=text_threshold,
        )
        for i, found, refs in zip(todo, detections, exemplars):
            first = len(distinct_phrases(layouts[i]))  # exemplar queries follow the phrases
            results[i] = match_entities(layouts[i], found, iou_threshold,
                                        {entity: first + k for k, entity in enumerate(refs)})
    return results


def reference_exemplars(layout: Layout) -> dict[int, Exemplar]:
    """entity index -> its reference image as an exemplar (one query per entity), for entities that have one."""
    images: dict[str, Image.Image] = {}
    out = {}
    for i, entity in enumerate(layout.entities):
        if entity.image:
            if entity.image not in images:
                images[entity.image] = open_image(entity.image)
            out[i] = Exemplar(images[entity.image], None, f"entity {i} reference image", entity.image)
    return out


def summarize(verifications: Sequence[Verification]) -> dict[str, Any]:
    """COCO-MIG measures over a set: instance success rate and mean IoU over all entities,
    plus the image success rate (images whose entities all pass)."""
    checks = [e for v in verifications for e in v.entities]
    count = len(checks)
    summary = {
        "instance_success_rate": sum(e.success for e in checks) / count if count else 0.0,
        "mean_iou": sum(e.iou for e in checks) / count if count else 0.0,
        "image_success_rate": (
            sum(all(e.success for e in v.entities) for v in verifications) / len(verifications) if verifications else 0.0
        ),
        "num_entities": count,
        "num_images": len(verifications),
    }
    exemplars = [e.exemplar for e in checks if e.exemplar is not None]
    if exemplars:  # entities checked by their reference image too
        summary["exemplar_success_rate"] = sum(m.success for m in exemplars) / len(exemplars)
        summary["exemplar_mean_iou"] = sum(m.iou for m in exemplars) / len(exemplars)
        summary["num_exemplar_entities"] = len(exemplars)
    return summary


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
        if check.exemplar is not None and check.exemplar.detected_box is not None:
            boxes.append(check.exemplar.detected_box)
            labels.append(f"{check.phrase} (image): IoU {check.exemplar.iou:.2f}")
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
    detector = load_from_args(args)
    results = verify_batch(detector, images, layouts, args.iou_threshold, args.box_threshold, args.text_threshold)
    unchecked = 0 if detector.takes_exemplars else sum(bool(e.image) for layout in layouts for e in layout.entities)
    if unchecked:
        print(f"note: {unchecked} entities have reference images, which {args.model} cannot look for "
              "(an OWLv2 detector can); only their phrases were checked", file=sys.stderr)
    report = {
        "model": args.model,
        "iou_threshold": args.iou_threshold,
        "summary": summarize(results),
        "images": [{"image": path, **result.to_dict()} for path, result in zip(args.images, results)],
    }
    write_outputs(report, args.out, args.overlay, args.images, map(overlay, images, results))
