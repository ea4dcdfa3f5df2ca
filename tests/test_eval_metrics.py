"""Box AP of gligen.eval.metrics (faster-coco-eval) against pycocotools on synthetic sets."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gligen.errors import UserError
from gligen.eval.metrics import COCO_STATS, LVIS_GROUPS, LVIS_MAX_DETS, box_ap, check_detections, check_ground_truth

SIZES = {"small": (8, 30), "medium": (34, 90), "large": (100, 300)}  # box sides in pixels, per COCO area range


def synthetic_set(seed: int, num_images: int = 24, num_categories: int = 5, crowd: bool = True, frequencies=None):
    """A ground truth with every size range (and crowd regions), and jittered / missed / spurious detections."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c + 1, "name": f"thing {c}"} for c in range(num_categories)]
    if frequencies:
        for category, frequency in zip(categories, frequencies):
            category["frequency"] = frequency
    images, gts, dts = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = 640, 480
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(1, 8)):
            lo, hi = SIZES[rng.choice(list(SIZES))]
            w, h = rng.uniform(lo, hi, size=2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            is_crowd = int(crowd and rng.random() < 0.12)
            category = int(rng.integers(1, num_categories + 1))
            gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": category,
                        "bbox": [x, y, w, h], "area": w * h * rng.uniform(0.6, 1.0), "iscrowd": is_crowd})
            for _ in range(rng.integers(0, 3)):  # 0 = missed, 2 = a duplicate
                jitter = rng.normal(0, 0.12, size=4) * [w, h, w, h]
                dts.append({"image_id": image_id, "category_id": category, "score": float(rng.random()),
                            "bbox": [float(x + jitter[0]), float(y + jitter[1]),
                                     float(max(w + jitter[2], 1)), float(max(h + jitter[3], 1))]})
        present = sorted({g["category_id"] for g in gts if g["image_id"] == image_id})
        for _ in range(rng.integers(0, 4)):  # false positives, on categories the image has
            w, h = rng.uniform(8, 200, size=2)
            dts.append({"image_id": image_id, "category_id": int(rng.choice(present)), "score": float(rng.random()),
                        "bbox": [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)),
                                 float(w), float(h)]})
    return {"images": images, "annotations": gts, "categories": categories}, dts


def pycocotools_eval(gt, dts, max_dets=None) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dts)), "bbox")
        if max_dets:
            evaluator.params.maxDets = max_dets
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_stats_equal_pycocotools(seed):
    gt, dts = synthetic_set(seed)
    areas = [a["bbox"][2] * a["bbox"][3] for a in gt["annotations"]]
    assert min(areas) < 32**2 and max(areas) > 96**2 and any(32**2 < a < 96**2 for a in areas)
    assert any(a["iscrowd"] for a in gt["annotations"])
    gt_before, dts_before = copy.deepcopy(gt), copy.deepcopy(dts)

    ours = box_ap(gt, dts)
    reference = pycocotools_eval(gt, dts).stats

    assert list(ours) == list(COCO_STATS)
    np.testing.assert_allclose([ours[k] for k in COCO_STATS], reference, atol=1e-6, rtol=0)
    assert 0.05 < ours["AP"] < 0.95  # a set where matching decides the number, not an all-or-nothing one
    assert gt == gt_before and dts == dts_before


def test_crowd_regions_absorb_detections():
    """A detection on a crowd region is neither a hit nor a false positive; on nothing it is a false positive."""
    gt = {"images": [{"id": 1, "width": 200, "height": 200}], "categories": [{"id": 1, "name": "person"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 90, 90], "area": 8100, "iscrowd": 1}]}
    hit = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.5}
    on_crowd = {"image_id": 1, "category_id": 1, "bbox": [120, 120, 40, 40], "score": 0.9}
    elsewhere = {"image_id": 1, "category_id": 1, "bbox": [0, 120, 40, 40], "score": 0.9}
    assert box_ap(gt, [hit, on_crowd])["AP"] == pytest.approx(1.0)
    assert box_ap(gt, [hit, elsewhere])["AP"] == pytest.approx(0.5, abs=0.01)
    assert box_ap(gt, [])["AP"] == 0.0


def test_lvis_frequency_groups_match_per_category_ap():
    frequencies = ["r", "c", "f", "f", "r", "c", "f"]
    gt, dts = synthetic_set(3, num_images=30, num_categories=len(frequencies), crowd=False, frequencies=frequencies)

    ours = box_ap(gt, dts)

    # Independent: pycocotools' per-category AP (precision over IoU x recall at 300 dets, all areas),
    # averaged inside each frequency group.
    reference = pycocotools_eval(gt, dts, max_dets=LVIS_MAX_DETS)
    precision = reference.eval["precision"][:, :, :, 0, -1]
    per_category = {cat_id: precision[:, :, k][precision[:, :, k] > -1].mean()
                    for k, cat_id in enumerate(reference.params.catIds)}
    for group, frequency in zip(LVIS_GROUPS, "rcf"):
        ids = [c["id"] for c in gt["categories"] if c["frequency"] == frequency]
        assert ours[group] == pytest.approx(np.mean([per_category[i] for i in ids]), abs=1e-6)
    assert len({round(ours[g], 4) for g in LVIS_GROUPS}) == 3
    recall = reference.eval["recall"][:, :, 0, -1]
    assert ours["AP"] == pytest.approx(precision[precision > -1].mean(), abs=1e-6)
    assert ours["AR300"] == pytest.approx(recall[recall > -1].mean(), abs=1e-6)


def test_bad_ground_truth_and_detections_name_the_record():
    gt, dts = synthetic_set(0, num_images=3)
    broken = copy.deepcopy(gt)
    del broken["annotations"][2]["bbox"]
    with pytest.raises(UserError, match=r"^gt.json: annotations\[2\]: missing 'bbox'$"):
        check_ground_truth(broken, "gt.json")
    check_ground_truth(gt, "gt.json")
    bad = copy.deepcopy(dts)
    del bad[1]["score"]
    with pytest.raises(UserError, match=r"^dt.json: \[1\]: missing 'score'$"):
        check_detections(bad, gt, "dt.json")
    bad = copy.deepcopy(dts)
    bad[0]["image_id"] = 999
    with pytest.raises(UserError, match=r"^dt.json: \[0\]: image_id 999 is not in the ground truth$"):
        check_detections(bad, gt, "dt.json")


def test_lvis_counts_the_300_best_detections_of_an_image():
    """As the LVIS API: 300 detections per image over all categories, so a 301st true positive is not counted."""
    gt = {"images": [{"id": 1, "width": 1000, "height": 1000}],
          "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "f"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [500, 500, 100, 100], "area": 1e4}]
          + [{"id": 2 + i, "image_id": 1, "category_id": 1, "bbox": [i * 3, 0, 2, 2], "area": 4} for i in range(300)]}
    dts = [{"image_id": 1, "category_id": 1, "bbox": [i * 3, 0, 2, 2], "score": 0.9} for i in range(300)]
    hit_b = {"image_id": 1, "category_id": 2, "bbox": [500, 500, 100, 100], "score": 0.5}
    assert box_ap(gt, dts)["APf"] == pytest.approx(0.5)
    assert box_ap(gt, dts + [hit_b])["APf"] == pytest.approx(0.5)  # the 301st detection is dropped
    assert box_ap(gt, dts[1:] + [hit_b])["APf"] > 0.99
