"""`gligen eval score`: detect each image's phrases, COCO / LVIS AP against its layout, layout checks, reports.

GLIP-style evaluation (the GLIGEN paper's protocol with an open-set detector): the detector is
prompted with the phrases (category names) of each image's own layout, with a low box
threshold so the precision-recall curve is complete; its detections, in COCO results format,
are scored against the layout boxes. The same images are checked entity by entity with
`detector.verify` (instance success rate, mean IoU). Scoring the dataset's own images
(`real_images`) gives the upper bound a generator can reach with this detector.

Outputs in `out`: `detections.json` (COCO results), `ground_truth.json` (the layout boxes as a
COCO ground truth; the pair re-scores without a model), `report.json`, `report.md` and
`samples.png` (images with their layout boxes and skeletons). With a pose estimator
(`gligen.eval.pose`) the layout persons' poses are scored too, keypoint AP beside the box AP,
and `keypoints.json` / `keypoint_ground_truth.json` hold the poses and the layout keypoints.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from gligen.draw import draw_layout, make_grid
from gligen.errors import UserError
from gligen.eval.annotations import Category, EvalSet, Record, read_json
from gligen.eval.generate import image_name
from gligen.eval.metrics import box_ap, check_detections, check_ground_truth, is_lvis, keypoint_ap, layout_checks
from gligen.eval.pose import PoseEstimator, keypoint_ground_truth, keypoint_results, persons, pixel_xywh
from gligen.files import save_image, write_json, write_text

DETECTIONS_FILE = "detections.json"
GROUND_TRUTH_FILE = "ground_truth.json"
GRID_FILE = "samples.png"
KEYPOINTS_FILE = "keypoints.json"
KEYPOINT_GROUND_TRUTH_FILE = "keypoint_ground_truth.json"
MAX_LISTED_MISSING = 20  # report.md lists this many missing files; report.json lists all


@dataclass(frozen=True)
class DetectionSettings:
    """Scoring images with a detector: its thresholds, the overlap an entity needs, batch and grid sizes."""

    box_threshold: float
    text_threshold: float
    iou_threshold: float = 0.5  # an entity is placed when its best detection overlaps its box this much
    batch_size: int = 4
    num_samples: int = 16  # images in the grid

    def __post_init__(self):
        if self.batch_size < 1 or self.num_samples < 1:
            raise UserError("the batch size and the number of samples must be at least 1")


@dataclass(frozen=True)
class ScoreSettings(DetectionSettings):
    box_threshold: float = 0.05  # low: AP integrates over the whole precision-recall curve
    text_threshold: float = 0.05
    verify_threshold: float | None = None  # box threshold of the layout checks; None: the detector family's

    def __post_init__(self):
        super().__post_init__()
        if self.verify_threshold is not None and self.verify_threshold < self.box_threshold:
            raise UserError(f"the layout checks' box threshold {self.verify_threshold} is below the "
                            f"detection threshold {self.box_threshold}")


def find_images(
    records: Sequence[Record], images_dir: str | Path, real_images: bool
) -> tuple[list[tuple[Record, Path]], list[str]]:
    """(record, image path) of the images present, and the paths of those missing.

    Generated images are `image_name(image_id)` in `images_dir`; real images the dataset's `file_name`.
    """
    present, missing = [], []
    for record in records:
        path = Path(images_dir) / (record.file_name if real_images else image_name(record.image_id))
        if real_images and not record.file_name:
            missing.append(f"(no file_name for image_id {record.image_id})")
        elif path.is_file():
            present.append((record, path))
        else:
            missing.append(str(path))
    return present, missing


def images_to_score(
    records: Sequence[Record], images_dir: str | Path, real_images: bool
) -> tuple[list[tuple[Record, Path]], list[str]]:
    """`find_images`, saying on stderr how many are missing; a UserError when none is there."""
    present, missing = find_images(records, images_dir, real_images)
    if missing:
        tqdm.write(f"{len(missing)} of {len(records)} images are missing and skipped, e.g. {missing[0]}", file=sys.stderr)
    if not present:
        raise UserError(f"{images_dir}: none of the {len(records)} images of the evaluation set is there")
    return present, missing


def ground_truth(
    records: Sequence[Record], sizes: Sequence[tuple[int, int]], categories: Sequence[Category]
) -> dict[str, Any]:
    """The layout boxes as a COCO ground truth, in pixels of each scored image of (width, height) `sizes`."""
    from detector.prompt import normalize_phrase

    ids = {normalize_phrase(c.name): c.id for c in categories}
    images, annotations = [], []
    for record, (width, height) in zip(records, sizes):
        images.append({"id": record.image_id, "width": width, "height": height, "file_name": record.file_name})
        for entity in record.layout.entities:
            x0, y0, x1, y1 = entity.box
            bbox = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
            annotations.append({"id": len(annotations) + 1, "image_id": record.image_id, "iscrowd": 0,
                                "category_id": ids[normalize_phrase(entity.phrase)], "bbox": bbox, "area": bbox[2] * bbox[3]})
    cats = [{"id": c.id, "name": c.name, **({"frequency": c.frequency} if c.frequency else {})} for c in categories]
    return {"images": images, "annotations": annotations, "categories": cats}


def coco_results(image_id: int, detections: Any, category_ids: dict[str, int]) -> list[dict[str, Any]]:
    """`detector.detect.Detections` of one image -> COCO results entries (pixel xywh)."""
    results = []
    for box, score, phrase_id in zip(detections.pixel_boxes().tolist(), detections.scores.tolist(),
                                     detections.phrase_ids.tolist()):
        x0, y0, x1, y1 = box
        results.append({"image_id": image_id, "category_id": category_ids[detections.phrases[phrase_id]],
                        "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)], "score": round(score, 5)})
    return results


def above(detections: Any, threshold: float) -> Any:
    """The detections scoring over `threshold`.

    Equal to detecting at `threshold` in the first place: NMS only lets a box suppress lower
    scoring ones, and with max phrase scores a score over the box threshold is a token
    probability over any lower text threshold.
    """
    from detector.detect import Detections

    keep = detections.scores > threshold
    masks = None if detections.masks is None else detections.masks[keep]
    return Detections(detections.boxes[keep], detections.scores[keep], detections.phrase_ids[keep],
                      detections.phrases, detections.image_size, masks)


def score_images(
    detector: Any,
    eval_set: EvalSet,
    images_dir: str | Path,
    out_dir: str | Path,
    real_images: bool = False,
    settings: ScoreSettings = ScoreSettings(),
    extra_metrics: dict[str, float] | None = None,
    pose_estimator: PoseEstimator | None = None,
) -> dict[str, Any]:
    """Detect, score and write the reports of the images of `eval_set`; return the report.

    One detector pass serves both AP (all detections) and the layout checks (those over
    `settings.verify_threshold`, by default the detector family's box threshold, matched to the entities
    by `detector.verify.match_entities`). Layouts without entities (a map grounds them) are not detected;
    with no entity in the whole set `detector` may be None and the report holds `extra_metrics` alone.
    A `pose_estimator` adds the keypoint AP of the layout persons' poses.
    """
    from detector.verify import distinct_phrases, match_entities
    from gligen.files import open_image

    out_dir = Path(out_dir)
    present, missing = images_to_score(eval_set.records, images_dir, real_images)
    if detector is None:
        return _report_without_boxes(present, missing, images_dir, real_images, settings, extra_metrics or {}, out_dir)
    if settings.verify_threshold is None:  # as `detector verify` checks with this family (never below the AP threshold)
        settings = replace(settings, verify_threshold=max(detector.default_box_threshold, settings.box_threshold))
    category_ids = eval_set.category_ids()
    results, sizes, verifications, samples, poses = [], [], [], [], []
    bar = tqdm(total=len(present), desc="score", unit="image")
    for start in range(0, len(present), settings.batch_size):
        batch = present[start:start + settings.batch_size]
        images = [open_image(path) for _, path in batch]
        layouts = [record.layout for record, _ in batch]
        boxed = [i for i, layout in enumerate(layouts) if layout.entities]
        found = detector.detect([images[i] for i in boxed], [distinct_phrases(layouts[i]) for i in boxed],
                                box_threshold=settings.box_threshold, text_threshold=settings.text_threshold,
                                batch_size=settings.batch_size) if boxed else []
        for i, detections in zip(boxed, found):  # phrase ids as `match_entities` expects (distinct_phrases)
            record, layout = batch[i][0], layouts[i]
            results.extend(coco_results(record.image_id, detections, category_ids))
            verifications.append(match_entities(layout, above(detections, settings.verify_threshold),
                                                settings.iou_threshold))
        if pose_estimator is not None:
            boxes = [[pixel_xywh(e, image.size) for e in persons(record)] for (record, _), image in zip(batch, images)]
            for (record, _), found_poses in zip(batch, pose_estimator.estimate(images, boxes)):
                poses.extend(keypoint_results(record.image_id, found_poses))
        sizes.extend(image.size for image in images)
        room = max(settings.num_samples - len(samples), 0)
        samples.extend(_sample(image, layout) for image, layout in zip(images[:room], layouts[:room]))
        bar.update(len(batch))
    bar.close()

    gt = ground_truth([record for record, _ in present], sizes, eval_set.categories)
    write_json(out_dir / GROUND_TRUTH_FILE, gt)
    write_json(out_dir / DETECTIONS_FILE, results)
    save_image(out_dir / GRID_FILE, make_grid(samples))
    metrics = box_ap(gt, results)
    files = {"detections": DETECTIONS_FILE, "ground_truth": GROUND_TRUTH_FILE, "grid": GRID_FILE}
    if pose_estimator is not None:
        pose_gt = keypoint_ground_truth([record for record, _ in present], sizes)
        write_json(out_dir / KEYPOINT_GROUND_TRUTH_FILE, pose_gt)
        write_json(out_dir / KEYPOINTS_FILE, poses)
        metrics.update(keypoint_ap(pose_gt, poses) if poses else {})
        files.update(keypoints=KEYPOINTS_FILE, keypoint_ground_truth=KEYPOINT_GROUND_TRUTH_FILE)
    report = _report(
        mode="real images" if real_images else "generated images",
        images=str(images_dir),
        num_images=len(present),
        missing=missing,
        metrics={**metrics, **(extra_metrics or {})},
        lvis=is_lvis(gt),
        layout=layout_checks(verifications),
        settings=asdict(settings),
        files=files,
    )
    write_report(out_dir, report)
    return report


def _report_without_boxes(present: list, missing: list, images_dir, real_images: bool, settings: ScoreSettings,
                          metrics: dict[str, float], out_dir: str | Path) -> dict[str, Any]:
    """The report of an evaluation set without entities (map conditions): its quality metrics and a samples grid."""
    from gligen.files import open_image

    samples = [_sample(open_image(path), record.layout) for record, path in present[:settings.num_samples]]
    save_image(Path(out_dir) / GRID_FILE, make_grid(samples))
    report = _report(mode="real images" if real_images else "generated images", images=str(images_dir),
                     num_images=len(present), missing=missing, metrics=metrics, lvis=False, layout=None,
                     settings=None, files={"detections": None, "ground_truth": None, "grid": GRID_FILE})
    write_report(out_dir, report)
    return report


def score_files(annotations: str | Path, detections: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Score a COCO results file against a COCO / LVIS ground truth, no model; write the reports."""
    gt = check_ground_truth(read_json(Path(annotations)), str(annotations))
    results = check_detections(read_json(Path(detections)), gt, str(detections))
    report = _report(
        mode="detections file",
        images=None,
        num_images=len(gt["images"]),
        missing=[],
        metrics=box_ap(gt, results),
        lvis=is_lvis(gt),
        layout=None,
        settings=None,
        files={"detections": str(detections), "ground_truth": str(annotations), "grid": None},
    )
    write_report(out_dir, report)
    return report


def _report(**fields: Any) -> dict[str, Any]:
    """The report's fields, always all of them (null where a mode has none)."""
    missing = fields.pop("missing")
    return {**fields, "num_missing": len(missing), "missing_images": missing}


def write_report(out_dir: str | Path, report: dict[str, Any],
                 render: Callable[[dict[str, Any]], str] | None = None) -> None:
    """`report.json` and its human-readable twin `report.md` (`render`, by default the AP report's: metrics in percent,
    as papers print them)."""
    write_json(Path(out_dir) / "report.json", report)
    write_text(Path(out_dir) / "report.md", (render or render_markdown)(report))


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Layout-to-image evaluation",
        "",
        f"- mode: {report['mode']}",
        f"- images scored: {report['num_images']}, missing: {report['num_missing']}",
        f"- LVIS frequency groups: {'yes' if report['lvis'] else 'no'}",
        "",
        "## Metrics (AP and AR in percent; n/a: no ground truth in that size range)",
        "",
        "| " + " | ".join(report["metrics"]) + " |",
        "|" + "---|" * len(report["metrics"]),
        "| " + " | ".join(_percent(name, v) for name, v in report["metrics"].items()) + " |",
    ]
    if report["layout"] is not None:
        layout = report["layout"]
        lines += [
            "",
            f"## Layout checks (an entity passes at IoU >= {report['settings']['iou_threshold']})",
            "",
            "| instance success rate | mean IoU | entities | images |",
            "|---|---|---|---|",
            f"| {100 * layout['instance_success_rate']:.1f} | {layout['mean_iou']:.3f} "
            f"| {layout['num_entities']} | {layout['num_images']} |",
        ]
    if report["settings"] is not None:
        lines += ["", "## Settings", "", *(f"- {k}: {v}" for k, v in report["settings"].items())]
    lines += missing_section(report)
    if report["files"]["grid"]:
        lines += ["", "## Samples (layout boxes drawn)", "", f"![samples]({report['files']['grid']})"]
    return "\n".join(lines) + "\n"


def missing_section(report: dict[str, Any]) -> list[str]:
    """The markdown lines listing a report's missing images (none when none is missing)."""
    if not report["missing_images"]:
        return []
    lines = ["", f"## Missing images ({report['num_missing']})", ""]
    lines += [f"- {path}" for path in report["missing_images"][:MAX_LISTED_MISSING]]
    if report["num_missing"] > MAX_LISTED_MISSING:
        lines.append(f"- ... and {report['num_missing'] - MAX_LISTED_MISSING} more (see report.json)")
    return lines


def _percent(name: str, value: float) -> str:
    """AP / AR in percent; -1 (nothing to measure) as n/a; other metrics (FID, CLIP score) as they are."""
    if not name.startswith(("AP", "AR")):
        return f"{value:.2f}"
    return "n/a" if value < 0 else f"{100 * value:.1f}"


def thumbnail(image: Image.Image, size: int = 256) -> Image.Image:
    """A copy of `image` fitting in `size` x `size`, for the samples grid."""
    small = image.copy()
    small.thumbnail((size, size))
    return small


def _sample(image: Image.Image, layout: Any) -> Image.Image:
    """A thumbnail of `image` with the layout's boxes and phrases drawn."""
    return draw_layout(thumbnail(image), layout)
