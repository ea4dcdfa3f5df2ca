"""Box and keypoint AP with faster-coco-eval (numbers equal to pycocotools'), LVIS frequency groups, layout checks.

COCO: the 12 standard statistics (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm,
ARl) of `COCOeval` with `iouType="bbox"`. LVIS (every category carries `frequency` r/c/f):
faster-coco-eval's LVIS mode, which also gives APr, APc, APf; as the LVIS API does, only the
300 best detections of each image count. A statistic with no ground truth to measure (e.g. APs without small boxes) is -1,
as in pycocotools. Keypoints: the 10 statistics of `iouType="keypoints"` (OKS with COCO's
per-keypoint sigmas), named APkp, APkp50, ... so that they stand beside the box AP in a report.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import faster_coco_eval

from gligen.errors import UserError, is_number
from gligen.eval.annotations import check_bbox, check_id, check_name, check_size, json_list, required, unique

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
LVIS_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR300", "ARs", "ARm", "ARl")
LVIS_GROUPS = ("APr", "APc", "APf")
LVIS_MAX_DETS = [1, 10, 300]
KEYPOINT_STATS = ("APkp", "APkp50", "APkp75", "APkpm", "APkpl", "ARkp", "ARkp50", "ARkp75", "ARkpm", "ARkpl")


def is_lvis(gt: dict[str, Any]) -> bool:
    """True when every category of the ground truth carries an LVIS frequency group."""
    categories = gt.get("categories", [])
    return bool(categories) and all(c.get("frequency") in ("r", "c", "f") for c in categories)


def box_ap(gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """COCO box AP of `detections` (COCO results format, pixel xywh) against the ground truth `gt`.

    Returns the 12 COCO statistics by name, plus APr, APc, APf when `gt` is LVIS.
    Neither argument is modified.
    """
    lvis = is_lvis(gt)
    if lvis:
        detections = _best_per_image(detections, LVIS_MAX_DETS[-1])
    stats = _evaluate(gt, detections, "bbox", lvis)
    metrics = dict(zip(LVIS_STATS if lvis else COCO_STATS, stats[:12]))
    if lvis:  # after the 12 come AR50, AR75, then the frequency groups
        metrics.update(zip(LVIS_GROUPS, stats[14:17]))
    return metrics


def keypoint_ap(gt: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """COCO keypoint AP (OKS) of `results` (COCO keypoint results: flat pixel `keypoints`, `score`) against `gt`
    (annotations with flat pixel `keypoints`, `num_keypoints`, `bbox` and `area`, the OKS scale)."""
    return dict(zip(KEYPOINT_STATS, _evaluate(gt, results, "keypoints")[:10]))


def _evaluate(gt: dict[str, Any], results: Sequence[dict[str, Any]], iou_type: str, lvis: bool = False) -> list[float]:
    """faster-coco-eval's statistics (`all_stats`); neither argument is modified."""
    coco_gt = faster_coco_eval.COCO(copy.deepcopy(gt))
    coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
    evaluator = faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, lvis_style=lvis,
                                                 print_function=_quiet)
    if lvis:
        evaluator.params.maxDets = list(LVIS_MAX_DETS)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [float(v) for v in evaluator.all_stats]


def check_ground_truth(gt: Any, where: str) -> dict[str, Any]:
    """Validate a COCO / LVIS ground truth field by field; a bad record raises UserError naming it and the field.

    `area` defaults to the box area and `iscrowd` to 0, as in COCO results files.
    """
    for key in ("images", "annotations", "categories"):
        json_list(gt, key, where)
    image_ids = _unique_ids(gt["images"], f"{where}: images", "image id", check_size)
    category_ids = _unique_ids(gt["categories"], f"{where}: categories", "category id", check_name)
    annotation_ids: set[int] = set()
    for i, ann in enumerate(gt["annotations"]):
        at = f"{where}: annotations[{i}]"
        annotation_id, image_id, category_id = (check_id(ann, key, at) for key in ("id", "image_id", "category_id"))
        unique(annotation_id, annotation_ids, "annotation id", at)
        annotation_ids.add(annotation_id)
        if image_id not in image_ids:
            raise UserError(f"{at}: image_id {image_id} is not in 'images'")
        if category_id not in category_ids:
            raise UserError(f"{at}: category_id {category_id} is not in 'categories'")
        bbox = check_bbox(required(ann, "bbox", at), at)
        ann.setdefault("area", bbox[2] * bbox[3])
        if not is_number(ann["area"]) or ann["area"] < 0:
            raise UserError(f"{at}: 'area' must be a non-negative number, got {ann['area']!r}")
        ann.setdefault("iscrowd", 0)
        if ann["iscrowd"] not in (0, 1):
            raise UserError(f"{at}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
    return gt


def _unique_ids(records: list, where: str, what: str, check: Any) -> set[int]:
    """The ids of `records`, each an integer seen once; `check(record, where)` validates the rest."""
    ids: set[int] = set()
    for i, record in enumerate(records):
        at = f"{where}[{i}]"
        record_id = check_id(record, "id", at)
        check(record, at)
        unique(record_id, ids, what, at)
        ids.add(record_id)
    return ids


def check_detections(detections: Any, gt: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Validate a COCO results list against `gt` field by field; a bad entry raises UserError naming it."""
    if not isinstance(detections, list):
        raise UserError(f"{where}: expected a JSON list of detections (COCO results format)")
    image_ids = {image["id"] for image in gt["images"]}
    category_ids = {category["id"] for category in gt["categories"]}
    for i, det in enumerate(detections):
        at = f"{where}: [{i}]"
        image_id, category_id = check_id(det, "image_id", at), check_id(det, "category_id", at)
        if image_id not in image_ids:
            raise UserError(f"{at}: image_id {image_id!r} is not in the ground truth")
        if category_id not in category_ids:
            raise UserError(f"{at}: category_id {category_id!r} is not in the ground truth")
        check_bbox(required(det, "bbox", at), at)
        if not is_number(required(det, "score", at)):
            raise UserError(f"{at}: 'score' must be a finite number, got {det['score']!r}")
    return detections


def layout_checks(verifications: Sequence[Any]) -> dict[str, float]:
    """Instance success rate and mean IoU of `detector.verify` results (see detector.verify.summarize)."""
    from detector.verify import summarize

    return summarize(list(verifications))


def _best_per_image(detections: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The `count` highest scoring detections of each image (COCOeval caps per image *and* category)."""
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for det in detections:
        by_image.setdefault(det["image_id"], []).append(det)
    return [det for dets in by_image.values() for det in sorted(dets, key=lambda d: -d["score"])[:count]]


def _quiet(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval prints its summary table; a report prints ours."""
