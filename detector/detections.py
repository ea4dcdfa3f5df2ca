"""`Detections`: what a detector found in one image, and its interchange formats.

- `to_dict()`: this project's JSON (`detector detect --out`): phrases, normalized and pixel boxes,
  and with masks (`detector segment`) each detection's mask as COCO RLE under "segmentation".
- `to_pipeline()` / `Detections.from_pipeline(...)`: the list of dicts of transformers'
  `pipeline("zero-shot-object-detection")`, `{"score", "label", "box": {"xmin", "ymin", "xmax",
  "ymax"}}` with boxes in pixels, best first (masks are not part of it). Boxes are written as floats (the pipeline rounds
  them to ints; ints are read too). Pixels are computed in float64 from the float32 normalized
  boxes, so `Detections -> pipeline -> Detections` gives back the same tensors bit for bit.
- `to_coco(image_id, category_ids)`: COCO results records `{"image_id", "category_id",
  "bbox": [x, y, width, height], "score"}` in pixels (and "segmentation" RLE with masks), as
  `gligen eval score` and pycocotools read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from gligen.errors import UserError, require


@dataclass
class Detections:
    """The detections in one image, best first."""

    boxes: torch.Tensor  # (K, 4) float32 normalized xyxy in [0, 1], cpu
    scores: torch.Tensor  # (K,) float32
    phrase_ids: torch.Tensor  # (K,) int64 index into `phrases`
    phrases: list[str]  # what was asked for (phrases, then exemplar labels), in the caller's order
    image_size: tuple[int, int]  # (width, height) in pixels
    masks: torch.Tensor | None = None  # (K, H, W) bool, cpu: one mask per detection (`OpenSetDetector.segment`)

    def __len__(self) -> int:
        return len(self.scores)

    def pixel_boxes(self) -> torch.Tensor:
        """(K, 4) xyxy in pixels of the original image (float64: exact for float32 boxes)."""
        w, h = self.image_size
        return self.boxes.double() * torch.tensor([w, h, w, h], dtype=torch.float64)

    @property
    def labels(self) -> list[str]:
        return [self.phrases[i] for i in self.phrase_ids.tolist()]

    def rle_masks(self) -> list[dict[str, Any]]:
        """Each detection's mask as COCO compressed RLE (`detector.rle`); none without masks."""
        from detector.rle import encode

        return [] if self.masks is None else [encode(mask.numpy()) for mask in self.masks]

    def to_dict(self) -> dict[str, Any]:
        detections = [
            {"phrase": self.phrases[p], "phrase_id": p, "score": round(s, 6),
             "box": [round(v, 6) for v in box], "pixel_box": [round(v, 2) for v in pixel]}
            for p, s, box, pixel in zip(
                self.phrase_ids.tolist(), self.scores.tolist(), self.boxes.tolist(), self.pixel_boxes().tolist()
            )
        ]
        for detection, rle in zip(detections, self.rle_masks()):
            detection["segmentation"] = rle
        return {"image_size": list(self.image_size), "phrases": list(self.phrases), "detections": detections}

    def to_pipeline(self) -> list[dict[str, Any]]:
        """transformers' zero-shot-object-detection output: one dict per detection, best first."""
        return [
            {"score": score, "label": self.phrases[p], "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box))}
            for score, p, box in zip(self.scores.tolist(), self.phrase_ids.tolist(), self.pixel_boxes().tolist())
        ]

    @classmethod
    def from_pipeline(
        cls, records: Sequence[Mapping[str, Any]], image_size: tuple[int, int], phrases: Sequence[str] | None = None
    ) -> "Detections":
        """Detections from the pipeline's list of dicts for an image of `image_size` (width, height).

        `phrases`: the labels that were asked for (their order gives the phrase ids); default:
        the labels in order of first appearance. Records are kept in their order.
        """
        names = list(phrases) if phrases is not None else list(dict.fromkeys(r["label"] for r in records))
        w, h = image_size
        boxes, scores, ids = [], [], []
        for i, record in enumerate(records):
            try:
                box = [float(record["box"][k]) for k in ("xmin", "ymin", "xmax", "ymax")]
                score, label = float(record["score"]), record["label"]
            except (KeyError, TypeError, ValueError) as error:
                raise UserError(f"detection {i}: expected score, label and box xmin/ymin/xmax/ymax ({error})") from None
            require(label in names, f"detection {i}: label {label!r} is none of the phrases {names}")
            boxes.append([box[0] / w, box[1] / h, box[2] / w, box[3] / h])  # float64, then float32 below
            scores.append(score)
            ids.append(names.index(label))
        return cls(
            torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4).float(),
            torch.tensor(scores, dtype=torch.float32),
            torch.tensor(ids, dtype=torch.long),
            names,
            (w, h),
        )

    def to_coco(self, image_id: int, category_ids: Mapping[str, int] | Sequence[int]) -> list[dict[str, Any]]:
        """COCO results records. `category_ids`: per phrase (a list by phrase id, or a dict by phrase)."""
        records = []
        for score, p, (x0, y0, x1, y1) in zip(self.scores.tolist(), self.phrase_ids.tolist(), self.pixel_boxes().tolist()):
            category = category_ids[self.phrases[p]] if isinstance(category_ids, Mapping) else category_ids[p]
            records.append({"image_id": image_id, "category_id": int(category),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
        for record, rle in zip(records, self.rle_masks()):
            record["segmentation"] = rle
        return records
