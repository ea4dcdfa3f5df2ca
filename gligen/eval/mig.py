"""The COCO-MIG protocol of MIG-Bench (MIGC, Zhou et al., CVPR 2024): many instances, each with a colour.

Layouts (MIG-Bench's `mig_bench_prepare.py` / `mig_bench_sample.py`). From the COCO instances of
an image, boxes narrower or shorter than 1/8 of the image are dropped; an image where a person
remains is skipped; at most 6 instances are kept; each instance gets a colour drawn uniformly
from red, blue, green, yellow, black, white and brown, its phrase is "a {colour} {category}" and
the prompt "a photo of a red car and a blue dog". Level Lk holds the layouts of k instances,
k = 2..6, up to 160 each (800 in all); no prompt twice. A layout keeps the plain category and
the colour of each phrase in `meta["mig"]` (`{"a red car": {"category": "car", "color": "red"}}`).
MIGC's own `bench_file/mig_bench_anno.yaml` (`{prompt: {phrase: [[x0, y0, x1, y1], ...],
coco_id: "N"}}`, boxes normalized) is read as it is: image id `N`, phrases parsed as
"a {colour} {category}".

Scoring (MIG-Bench's `eval_mig.py`), instance by instance:
1. the detector is asked for the instance's plain category alone (one prompt per category and
   image), box and text thresholds 0.25, NMS at IoU 0.8;
2. its IoU is the largest IoU of a detection with its box: instances never compete for detections;
3. at IoU >= 0.5 its colour is checked: of its pixels (the segmenter's mask for its layout box,
   the best-scoring of three; SAM ViT-H in MIG-Bench), the fraction inside its colour's HSV
   ranges (OpenCV's 8-bit HSV, H in [0, 180], S and V in [0, 255], bounds included) must reach 0.2;
4. it succeeds when both hold; its term in the mIoU is its IoU, or 0 when the colour check
   failed (an instance under IoU 0.5 is not colour-checked and counts its IoU, as in MIG-Bench).
The instance success rate and the mIoU are taken over the instances of each level and over all
instances ("overall", MIG-Bench's "Avg": instance-weighted, not the mean of the levels).

Where this differs from MIG-Bench:
- MIG-Bench draws the images and colours with Python's unseeded `random` (and picks one of the
  image's captions, then replaces it); here a seed draws them, so a set is rebuilt exactly.
- With more than 6 instances MIG-Bench keeps the first 6 in annotation order; here the 6 largest.
- Crowd annotations, kept by MIG-Bench, are dropped unless `--keep-crowd` (as in every eval set).
- Without a segmenter the colour is checked on the pixels the detected box touches (MIG-Bench
  always segments with SAM).
- Images are scored at their own size; MIG-Bench first resizes them to 512 x 512.
- Any detector of `detector` serves (MIG-Bench: Grounding DINO Swin-T OGC); the thresholds are
  Grounding DINO's and may need changing for another family.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from gligen.draw import draw_boxes, make_grid
from gligen.errors import UserError, is_number
from gligen.eval.annotations import Category, EvalSet, Filters, Record, load_eval_set, unique
from gligen.eval.score import DetectionSettings
from gligen.files import open_image, read_text, save_image, write_json
from gligen.masks import box_pixels
from gligen.layout import Box, Entity, Layout

DEFAULT_COLOR_FRACTION = 0.2
LEVELS = (2, 3, 4, 5, 6)  # instances per layout
PER_LEVEL = 160
MIN_SIDE = 1 / 8  # of the image: narrower or shorter boxes are dropped
EXCLUDED_CATEGORIES = ("person",)
META_KEY = "mig"
PROMPT_START = "a photo of "
NMS_IOU = 0.8
INSTANCES_FILE = "instances.json"
GRID_FILE = "samples.png"
PASSED, FAILED = (60, 180, 75), (230, 25, 75)  # box colours in the samples grid


@dataclass(frozen=True)
class HsvRange:
    """Inclusive bounds on (H, S, V) in OpenCV's 8-bit HSV: H in [0, 180], S and V in [0, 255]."""

    lower: tuple[int, int, int]
    upper: tuple[int, int, int]


# MIG-Bench's colours, in its order (the order colours are drawn from), and their HSV ranges.
COLORS: dict[str, tuple[HsvRange, ...]] = {
    "red": (HsvRange((0, 43, 35), (6, 255, 255)), HsvRange((156, 43, 35), (180, 255, 255))),  # hue wraps around
    "blue": (HsvRange((78, 43, 35), (124, 255, 255)),),
    "green": (HsvRange((35, 43, 35), (77, 255, 255)),),
    "yellow": (HsvRange((20, 43, 35), (34, 255, 255)),),
    "black": (HsvRange((0, 0, 0), (180, 255, 35)),),
    "white": (HsvRange((0, 0, 221), (180, 43, 255)),),
    "brown": (HsvRange((6, 43, 35), (25, 255, 255)),),
}


# --- the colour check --------------------------------------------------------------------------------------------


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) uint8 HSV, exactly as OpenCV's `cvtColor(COLOR_RGB2HSV)` on 8-bit images.

    OpenCV's fixed-point arithmetic (12 fractional bits, its rounded reciprocal tables), so that
    the ranges of `COLORS` select the pixels they select in MIG-Bench.
    """
    shift, half = 12, 1 << 11
    values = np.arange(256)
    with np.errstate(divide="ignore"):
        s_table = np.where(values > 0, np.rint((255 << shift) / values), 0).astype(np.int64)
        h_table = np.where(values > 0, np.rint((180 << shift) / (6 * values)), 0).astype(np.int64)
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * s_table[v] + half) >> shift
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * h_table[diff] + half) >> shift
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def color_pixels(rgb: np.ndarray, color: str) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) bool: the pixels inside one of `color`'s HSV ranges."""
    hsv = rgb_to_hsv(rgb)
    inside = np.zeros(hsv.shape[:-1], dtype=bool)
    for bounds in COLORS[color]:
        inside |= np.all((hsv >= bounds.lower) & (hsv <= bounds.upper), axis=-1)
    return inside


def color_fraction(rgb: np.ndarray, mask: np.ndarray, color: str) -> float:
    """Of the pixels of `mask` ((H, W) bool) in `rgb` ((H, W, 3) uint8), the fraction that is `color`; 0 for an empty mask."""
    pixels = rgb[mask]
    return float(color_pixels(pixels, color).sum() / len(pixels)) if len(pixels) else 0.0


def color_check(rgb: np.ndarray, mask: np.ndarray, color: str, threshold: float = DEFAULT_COLOR_FRACTION
                ) -> tuple[float, bool]:
    """MIG-Bench's attribute check: (`color_fraction`, whether it reaches `threshold`); an empty mask fails."""
    fraction = color_fraction(rgb, mask, color)
    return fraction, bool(mask.any()) and fraction >= threshold


# --- layouts -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One MIG instance: a COCO category in a colour, at a normalized xyxy box."""

    category: str
    color: str
    box: Box

    @property
    def phrase(self) -> str:
        return f"a {self.color} {self.category}"


@dataclass(frozen=True)
class Sampling:
    """How MIG layouts are drawn from COCO: up to `per_level` layouts per level, images and colours drawn with `seed`."""

    per_level: int = PER_LEVEL
    seed: int = 0


def mig_layout(instances: Sequence[Instance], size: int = 512, meta: dict[str, Any] | None = None) -> Layout:
    """The layout of `instances`: MIG-Bench's prompt, one entity per instance, the categories and colours in meta."""
    attributes = {i.phrase: {"category": i.category, "color": i.color} for i in instances}
    prompt = PROMPT_START + " and ".join(i.phrase for i in instances)
    entities = tuple(Entity(i.phrase, i.box) for i in instances)
    return Layout(prompt, entities, width=size, height=size, meta={**(meta or {}), META_KEY: attributes})


def instances_of(layout: Layout, where: str) -> list[Instance]:
    """The MIG instances of a layout (its entities with the category and colour its meta gives each phrase)."""
    attributes = layout.meta.get(META_KEY)
    hint = "make MIG layouts with `gligen eval generate --mig`"
    if not isinstance(attributes, dict):
        raise UserError(f"{where}: no '{META_KEY}' categories and colours in the layout; {hint}")
    instances = []
    for i, entity in enumerate(layout.entities):
        given = attributes.get(entity.phrase)
        if not (isinstance(given, dict) and isinstance(given.get("category"), str) and given["category"].strip()):
            raise UserError(f"{where}: entity {i} ({entity.phrase!r}) has no category in '{META_KEY}'; {hint}")
        if given.get("color") not in COLORS:
            raise UserError(f"{where}: entity {i} ({entity.phrase!r}) has colour {given.get('color')!r}; "
                            f"MIG colours are {', '.join(COLORS)}")
        instances.append(Instance(given["category"], given["color"], entity.box))
    if len(instances) not in LEVELS:
        raise UserError(f"{where}: {len(instances)} instances; MIG levels hold {LEVELS[0]} to {LEVELS[-1]}")
    return instances


def build_mig_records(records: Sequence[Record], sampling: Sampling = Sampling()) -> list[Record]:
    """MIG layouts drawn from COCO evaluation records (whose phrases are category names), as MIG-Bench draws them.

    Images are taken in an order shuffled with the seed; each that still fits in its level (and
    whose prompt is new) gets a colour per instance from the same random stream. Deterministic
    for a seed and a set of records.
    """
    rng = random.Random(sampling.seed)
    order = list(records)
    rng.shuffle(order)
    counts = dict.fromkeys(LEVELS, 0)
    prompts: set[str] = set()
    chosen = []
    for record in order:
        kept = [e for e in record.layout.entities if e.box[2] - e.box[0] >= MIN_SIDE and e.box[3] - e.box[1] >= MIN_SIDE]
        if any(e.phrase in EXCLUDED_CATEGORIES for e in kept):
            continue
        with warnings.catch_warnings():  # trimming to 6 is the protocol, not news
            warnings.simplefilter("ignore")
            kept = list(replace(record.layout, entities=tuple(kept)).keep_largest(LEVELS[-1]).entities)
        if len(kept) not in counts or counts[len(kept)] >= sampling.per_level:
            continue
        instances = [Instance(e.phrase, rng.choice(list(COLORS)), e.box) for e in kept]
        layout = mig_layout(instances, record.layout.width, record.layout.meta)
        if layout.prompt in prompts:
            continue
        prompts.add(layout.prompt)
        counts[len(kept)] += 1
        chosen.append(Record(layout, record.image_id, record.file_name))
        if all(n >= sampling.per_level for n in counts.values()):
            break
    return chosen


def parse_phrase(phrase: str, where: str) -> tuple[str, str]:
    """ "a red car" -> ("red", "car"): MIG-Bench's "a {colour} {category}" phrases."""
    words = phrase.split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    if len(words) < 2 or words[0] not in COLORS:
        raise UserError(f"{where}: phrase {phrase!r} is not 'a <colour> <category>' with a colour of {', '.join(COLORS)}")
    return words[0], " ".join(words[1:])


def read_mig_bench(path: str | Path, size: int = 512) -> list[Record]:
    """MIGC's `mig_bench_anno.yaml`: prompt -> {phrase: [normalized xyxy boxes], coco_id: id} -> MIG records."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as error:
        raise UserError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected MIGC's annotation file, a mapping of prompts to their phrases' boxes")
    records, image_ids = [], set()
    for prompt, phrases in data.items():
        where = f"{path}: {str(prompt)[:60]!r}"
        if not isinstance(phrases, dict) or "coco_id" not in phrases:
            raise UserError(f"{where}: expected a mapping of phrases to boxes with a 'coco_id'")
        try:
            image_id = int(phrases["coco_id"])
        except (TypeError, ValueError):
            raise UserError(f"{where}: 'coco_id' must be an integer, got {phrases['coco_id']!r}") from None
        unique(image_id, image_ids, "coco_id", where)  # it names the image file
        image_ids.add(image_id)
        instances = []
        for phrase, boxes in phrases.items():
            if phrase == "coco_id":
                continue
            color, category = parse_phrase(str(phrase), where)
            if not isinstance(boxes, list):
                raise UserError(f"{where}: {phrase!r} must list boxes [x0, y0, x1, y1], got {boxes!r}")
            for box in boxes:
                instances.append(Instance(category, color, _clipped(box, f"{where}: {phrase!r}")))
        layout = mig_layout(instances, size)
        records.append(Record(replace(layout, prompt=str(prompt)), image_id, ""))
    return records


def _clipped(box: Any, where: str) -> Box:
    """A normalized box of MIGC's file, clipped to the image (its x0 + w can reach 1.0000000000000002)."""
    if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
        raise UserError(f"{where}: a box must be 4 numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"{where}: box {box!r} covers no area of the image")
    return (x0, y0, x1, y1)


def load_mig_set(
    path: str | Path,
    filters: Filters = Filters(),
    size: int = 512,
    limit: int | None = None,
    sampling: Sampling | None = Sampling(),
) -> EvalSet:
    """MIG layouts: MIGC's `.yaml`, a layouts `.jsonl` of MIG layouts, or, with `sampling`, drawn from a COCO instances `.json`.

    `filters` apply to the COCO boxes and to a `.jsonl`; MIGC's file is taken as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    if path.suffix in (".yaml", ".yml"):
        records = read_mig_bench(path, size)
    elif path.suffix == ".jsonl":
        records = load_eval_set(path, None, filters).records
    elif sampling is None:
        raise UserError(f"{path}: score the layouts.jsonl that `gligen eval generate --mig` wrote, or MIGC's .yaml")
    else:
        records = build_mig_records(load_eval_set(path, None, filters, size).records, sampling)
        if not records:
            raise UserError(f"{path}: no image has {LEVELS[0]} to {LEVELS[-1]} instances of at least {MIN_SIDE:g} "
                            f"of its sides and no {' or '.join(EXCLUDED_CATEGORIES)}")
    records = records[:limit] if limit is not None else records
    categories = {}
    for record in records:
        for instance in instances_of(record.layout, f"{path}: image_id {record.image_id}"):
            categories.setdefault(instance.category, Category(len(categories) + 1, instance.category))
    return EvalSet(records, list(categories.values()))


# --- scoring -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigSettings(DetectionSettings):
    box_threshold: float = 0.25  # MIG-Bench's Grounding DINO thresholds
    text_threshold: float = 0.25
    color_fraction: float = DEFAULT_COLOR_FRACTION


@dataclass
class InstanceCheck:
    """One instance scored: its best detection's IoU and, when that passes, its colour fraction."""

    image_id: int
    level: int  # the number of instances of its layout
    instance: Instance
    detected_box: Box | None  # the detection overlapping its box most; None when its category was not found
    iou: float
    color_fraction: float | None  # None: not checked (IoU under the threshold)
    success: bool

    @property
    def counted_iou(self) -> float:
        """Its term in the mIoU: the IoU, or 0 when the colour check failed."""
        return 0.0 if self.color_fraction is not None and not self.success else self.iou

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id, "level": self.level, "phrase": self.instance.phrase,
            "category": self.instance.category, "color": self.instance.color,
            "box": [round(v, 6) for v in self.instance.box],
            "detected_box": None if self.detected_box is None else [round(v, 6) for v in self.detected_box],
            "iou": round(self.iou, 6),
            "color_fraction": None if self.color_fraction is None else round(self.color_fraction, 6),
            "success": self.success, "counted_iou": round(self.counted_iou, 6),
        }


def check_instances(
    image_id: int,
    rgb: np.ndarray,
    instances: Sequence[Instance],
    detected: dict[str, torch.Tensor],
    masks: dict[int, np.ndarray] | None,
    settings: MigSettings = MigSettings(),
) -> list[InstanceCheck]:
    """Score the instances of one image.

    rgb: (H, W, 3) uint8. `detected`: category -> (K, 4) normalized xyxy boxes of the detections
    of that category. `masks`: instance index -> (H, W) bool, its pixels from a segmenter (needed
    for the instances whose IoU passes); None: the pixels the detected box touches.
    """
    from detector.box_ops import box_iou

    checks = []
    for i, instance in enumerate(instances):
        boxes = detected.get(instance.category, torch.zeros(0, 4))
        if len(boxes) == 0:
            checks.append(InstanceCheck(image_id, len(instances), instance, None, 0.0, None, False))
            continue
        ious = box_iou(torch.tensor([instance.box]), boxes)[0]
        best = int(ious.argmax())
        iou, detected_box = float(ious[best]), tuple(boxes[best].tolist())
        fraction, passed = None, False
        if iou >= settings.iou_threshold:
            mask = masks[i] if masks is not None else box_pixels(detected_box, rgb.shape[1], rgb.shape[0])
            fraction, passed = color_check(rgb, mask, instance.color, settings.color_fraction)
        checks.append(InstanceCheck(image_id, len(instances), instance, detected_box, iou, fraction, passed))
    return checks


def summarize(checks: Sequence[InstanceCheck]) -> dict[str, dict[str, Any]]:
    """Per level "L2".."L6" and "overall": layouts, instances, instance success rate and mIoU (None where no layout)."""

    def summary(group: Sequence[InstanceCheck]) -> dict[str, Any]:
        n = len(group)
        return {
            "layouts": len({c.image_id for c in group}),
            "instances": n,
            "instance_success_rate": sum(c.success for c in group) / n if n else None,
            "miou": sum(c.counted_iou for c in group) / n if n else None,
        }

    out = {f"L{level}": summary([c for c in checks if c.level == level]) for level in LEVELS}
    out["overall"] = summary(checks)
    return out


def score_mig(
    detector: Any,
    eval_set: EvalSet,
    images_dir: str | Path,
    out_dir: str | Path,
    real_images: bool = False,
    settings: MigSettings = MigSettings(),
    segmenter: Any = None,
    extra_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Score the images of a MIG evaluation set; write `report.json`, `report.md`, `instances.json` and `samples.png`.

    `detector`: an `OpenSetDetector`; `segmenter`: a `detector.segment.Segmenter` (None: the detected boxes' pixels).
    """
    from gligen.eval.score import images_to_score, thumbnail, write_report

    out_dir = Path(out_dir)
    present, missing = images_to_score(eval_set.records, images_dir, real_images)
    checks: list[InstanceCheck] = []
    samples = []
    bar = tqdm(total=len(present), desc="score MIG", unit="image")
    for start in range(0, len(present), settings.batch_size):
        batch = present[start:start + settings.batch_size]
        images = [open_image(path) for _, path in batch]
        instances = [instances_of(record.layout, f"image_id {record.image_id}") for record, _ in batch]
        detected = _detect_categories(detector, images, instances, settings)
        masks = _segment(segmenter, images, instances) if segmenter is not None else [None] * len(batch)
        for (record, _), image, found, image_instances, image_masks in zip(batch, images, detected, instances, masks):
            image_checks = check_instances(record.image_id, np.asarray(image.convert("RGB")), image_instances, found,
                                           image_masks, settings)
            checks.extend(image_checks)
            if len(samples) < settings.num_samples:
                samples.append(_sample(thumbnail(image), image_checks))
        bar.update(len(batch))
    bar.close()

    write_json(out_dir / INSTANCES_FILE, [c.to_dict() for c in checks])
    save_image(out_dir / GRID_FILE, make_grid(samples))
    report = {
        "protocol": "mig",
        "mode": "real images" if real_images else "generated images",
        "images": str(images_dir),
        "num_images": len(present),
        "num_missing": len(missing),
        "missing_images": missing,
        "mig": summarize(checks),
        "metrics": extra_metrics or {},
        "segmenter": segmenter.name if segmenter is not None else None,
        "settings": asdict(settings),
        "files": {"instances": INSTANCES_FILE, "grid": GRID_FILE},
    }
    write_report(out_dir, report, render_markdown)
    return report


def _detect_categories(
    detector: Any, images: list[Image.Image], instances: list[list[Instance]], settings: MigSettings
) -> list[dict[str, torch.Tensor]]:
    """Per image, category -> the boxes of its detections, each category asked for alone (as MIG-Bench prompts)."""
    queries = [(i, category) for i, image_instances in enumerate(instances)
               for category in dict.fromkeys(inst.category for inst in image_instances)]
    found = detector.detect([images[i] for i, _ in queries], [[category] for _, category in queries],
                            box_threshold=settings.box_threshold, text_threshold=settings.text_threshold,
                            nms_iou=NMS_IOU, batch_size=settings.batch_size)
    detected: list[dict[str, torch.Tensor]] = [{} for _ in images]
    for (i, category), detections in zip(queries, found):
        detected[i][category] = detections.boxes
    return detected


def _segment(segmenter: Any, images: list[Image.Image], instances: list[list[Instance]]) -> list[dict[int, np.ndarray]]:
    """Per image, instance index -> the segmenter's mask for the instance's layout box.

    As MIG-Bench prompts SAM: with the layout box, three candidate masks, the best-scoring kept.
    """
    boxes = [torch.tensor([inst.box for inst in image_instances], dtype=torch.float32).reshape(-1, 4)
             for image_instances in instances]
    masks = segmenter.segment(images, boxes, multimask_output=True)
    return [{k: mask.cpu().numpy().astype(bool) for k, mask in enumerate(image_masks)} for image_masks in masks]


def _sample(image: Image.Image, checks: Sequence[InstanceCheck]) -> Image.Image:
    """A thumbnail with each instance's box, green when it succeeded, red when not, labelled with its phrase and IoU."""
    labels = [f"{c.instance.phrase} {c.iou:.2f}" for c in checks]
    return draw_boxes(image, [c.instance.box for c in checks], labels,
                      colors=[PASSED if c.success else FAILED for c in checks])


def render_markdown(report: dict[str, Any]) -> str:
    """The MIG report as MIG-Bench's table: instance success rate (percent) and mIoU per level and overall."""
    from gligen.eval.score import missing_section

    settings = report["settings"]
    lines = [
        "# COCO-MIG evaluation",
        "",
        f"- mode: {report['mode']}",
        f"- images scored: {report['num_images']}, missing: {report['num_missing']}",
        f"- instance pixels: {report['segmenter'] or 'the detected box (no segmenter)'}",
        "",
        f"## Instance success (IoU >= {settings['iou_threshold']} and at least "
        f"{100 * settings['color_fraction']:g}% of its pixels of its colour)",
        "",
        "| level | layouts | instances | instance success rate | mIoU |",
        "|---|---|---|---|---|",
    ]
    for level, row in report["mig"].items():
        if row["instances"]:
            lines.append(f"| {level} | {row['layouts']} | {row['instances']} "
                         f"| {100 * row['instance_success_rate']:.1f} | {row['miou']:.3f} |")
        else:
            lines.append(f"| {level} | 0 | 0 | no layouts | no layouts |")
    if report["metrics"]:
        lines += ["", "## Image quality", "", *(f"- {name}: {value:.2f}" for name, value in report["metrics"].items())]
    lines += ["", "## Settings", "", *(f"- {k}: {v}" for k, v in settings.items())]
    lines += missing_section(report)
    lines += ["", "## Samples (green: instance succeeded, red: failed)", "", f"![samples]({report['files']['grid']})",
              f"\nEvery instance: [{report['files']['instances']}]({report['files']['instances']})"]
    return "\n".join(lines) + "\n"
