"""Pose fidelity of generated images: estimate each layout person's pose in its box, keypoint AP against the layout.

As COCO's keypoint evaluation with ground-truth boxes (top-down): a pose estimator
(transformers' `VitPoseForPoseEstimation`, local weights the user gives) looks at each box of
a layout entity that has keypoints, and its 17 predicted points are scored against the
entity's keypoints by OKS (`metrics.keypoint_ap`). The OKS scale of a person is its box area
in pixels (COCO uses the segment's area, which a layout does not have). A prediction's score is
the mean confidence of its points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from gligen.errors import UserError
from gligen.eval.annotations import Record
from gligen.layout import Entity
from gligen.pose import KEYPOINT_NAMES, NUM_KEYPOINTS, SKELETON

PERSON = 1  # the category id of the keypoint ground truth


def persons(record: Record) -> list[Entity]:
    """The entities of a record's layout whose pose is scored: those with at least one given keypoint."""
    return [e for e in record.layout.entities if e.keypoints is not None and any(v for _, _, v in e.keypoints)]


def pixel_xywh(entity: Entity, size: tuple[int, int]) -> list[float]:
    """An entity's box as COCO's [x, y, width, height] in pixels of an image of (width, height) `size`."""
    width, height = size
    x0, y0, x1, y1 = entity.box
    return [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]


@dataclass
class PoseEstimator:
    """A top-down pose estimator: images and person boxes in, 17 (x, y, score) per box out (pixels)."""

    model: Any  # transformers VitPoseForPoseEstimation
    processor: Any  # its image processor

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                        ) -> PoseEstimator:
        """A VitPose directory (`config.json`, weights, `preprocessor_config.json`), or a hub id."""
        try:
            from transformers import AutoImageProcessor, VitPoseForPoseEstimation
        except ImportError:
            raise UserError("--pose-model needs transformers >= 4.48 (VitPoseForPoseEstimation)") from None
        try:
            model = VitPoseForPoseEstimation.from_pretrained(path, dtype=dtype).to(device).eval()
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise UserError(f"--pose-model {path}: cannot load a VitPose model ({str(error).splitlines()[0]})") from None
        if model.config.num_labels != NUM_KEYPOINTS:
            raise UserError(f"--pose-model {path}: predicts {model.config.num_labels} keypoints, not COCO's {NUM_KEYPOINTS}")
        return cls(model, processor)

    @torch.no_grad()
    def estimate(self, images: Sequence[Image.Image], boxes: Sequence[Sequence[list[float]]]) -> list[list[torch.Tensor]]:
        """Per image, per box (pixel xywh): a (17, 3) tensor of x, y in pixels and the point's score."""
        if not any(boxes):
            return [[] for _ in images]
        used = [(image, image_boxes) for image, image_boxes in zip(images, boxes) if image_boxes]
        inputs = self.processor([image for image, _ in used], boxes=[list(b) for _, b in used], return_tensors="pt")
        pixels = inputs.pixel_values.to(self.model.device, self.model.dtype)
        kwargs = {}
        if getattr(self.model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose+: the COCO expert
            kwargs["dataset_index"] = torch.zeros(len(pixels), dtype=torch.long, device=self.model.device)
        outputs = self.model(pixel_values=pixels, **kwargs)
        outputs.heatmaps = outputs.heatmaps.float()
        found = iter(self.processor.post_process_pose_estimation(outputs, boxes=[list(b) for _, b in used]))
        results = []
        for image_boxes in boxes:
            poses = next(found) if image_boxes else []
            results.append([torch.cat([p["keypoints"].float(), p["scores"].float()[:, None]], dim=1) for p in poses])
        return results


def keypoint_ground_truth(records: Sequence[Record], sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The layout persons as a COCO person-keypoints ground truth, in pixels of each scored image's (width, height)."""
    images, annotations = [], []
    for record, size in zip(records, sizes):
        width, height = size
        images.append({"id": record.image_id, "width": width, "height": height, "file_name": record.file_name})
        for entity in persons(record):
            bbox = pixel_xywh(entity, size)
            flat = [value for x, y, v in entity.keypoints for value in (x * width, y * height, v)]
            annotations.append({"id": len(annotations) + 1, "image_id": record.image_id, "category_id": PERSON,
                                "iscrowd": 0, "keypoints": flat, "num_keypoints": sum(v > 0 for _, _, v in entity.keypoints),
                                "bbox": bbox, "area": bbox[2] * bbox[3]})
    category = {"id": PERSON, "name": "person", "keypoints": list(KEYPOINT_NAMES),
                "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}
    return {"images": images, "annotations": annotations, "categories": [category]}


def keypoint_results(image_id: int, poses: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Predicted poses ((17, 3): x, y, score) of one image as COCO keypoint results."""
    results = []
    for pose in poses:
        flat = [round(float(value), 3) for x, y, score in pose.tolist() for value in (x, y, score)]
        results.append({"image_id": image_id, "category_id": PERSON, "keypoints": flat,
                        "score": round(float(pose[:, 2].mean()), 5)})
    return results
