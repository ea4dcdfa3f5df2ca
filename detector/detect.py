"""OpenSetDetector: one interface over the detector families.

    det = OpenSetDetector.from_pretrained("google/owlv2-base-patch16-ensemble")   # or a Grounding DINO, ...
    [found] = det.detect(image, ["a cat", "a dog"])
    [found] = det.detect(image, exemplars=[Exemplar(reference, box=(0.1, 0.2, 0.5, 0.9), label="my mug")])

`from_pretrained` reads the checkpoint's config and returns the family's class:

| model_type | class | text phrases | exemplars | names objects by itself |
| --- | --- | --- | --- | --- |
| grounding-dino, mm-grounding-dino (LLMDet too) | `GroundingDinoDetector` | yes | no | no |
| owlv2 | `Owlv2Detector` | yes | yes | no |
| florence2 | `Florence2Detector` | yes | no | yes (`<OD>`, `<DENSE_REGION_CAPTION>`) |

Every family answers `detect(images, phrases, exemplars)` with one `Detections` per image whose
`phrases` are the phrases asked for followed by the exemplar labels (exemplars sharing a label
are one query), each detection naming one of them; detections of one query go through NMS.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

from detector.box_ops import batched_nms
from detector.detections import Detections
from detector.exemplars import Exemplar, group_exemplars
from gligen.errors import UserError, is_number, require

if TYPE_CHECKING:
    from detector.segment import Segmenter

__all__ = ["Detections", "Exemplar", "OpenSetDetector"]

# config.model_type -> "module:class" of the family (imported when a checkpoint needs it)
FAMILIES = {
    "grounding-dino": "detector.grounding_dino:GroundingDinoDetector",
    "mm-grounding-dino": "detector.grounding_dino:GroundingDinoDetector",
    "owlv2": "detector.owlv2:Owlv2Detector",
    "florence2": "detector.florence2:Florence2Detector",
}

Found = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Raw detections of one image before NMS: normalized xyxy boxes (K, 4), scores (K,), query ids (K,), on the cpu."""


class OpenSetDetector:
    """Phrases (and, where the family can, visual exemplars) to boxes. Subclasses are the families."""

    family = "base"
    takes_exemplars = False  # can it find what a box on a reference image shows?
    names_objects = False  # can it name what it sees without being told (a captioning detector)?
    default_box_threshold = 0.35
    default_text_threshold = 0.25

    model: torch.nn.Module

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "OpenSetDetector":
        """Load a checkpoint directory or hub id of any family (`"demo"`: the bundled demo detector)."""
        from detector.model import load_config
        from gligen.demo import resolve_model

        path = resolve_model(path_or_id, "detector")
        config = load_config(path, FAMILIES)
        module, name = FAMILIES[config.model_type].split(":")
        family = getattr(importlib.import_module(module), name)
        detector = family.load(path, config, torch.device(device), dtype)
        for name in ("box_threshold", "text_threshold"):  # a checkpoint may name its own (the demo detector's)
            value = getattr(config, name, None)
            if value is not None:
                require(is_number(value) and 0 <= value <= 1,
                        f"{path}: config.json's '{name}' must be a number in [0, 1], got {value!r}")
                setattr(detector, f"default_{name}", float(value))
        return detector

    @classmethod
    def load(cls, path: str, config, device: torch.device, dtype: torch.dtype) -> "OpenSetDetector":
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def detect(
        self,
        images: Image.Image | Sequence[Image.Image],
        phrases: Sequence[str] | Sequence[Sequence[str]] | None = None,
        exemplars: Sequence[Exemplar] | Sequence[Sequence[Exemplar]] | None = None,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        phrase_score: str = "max",
        nms_iou: float | None = 0.5,
        batch_size: int = 8,
    ) -> list[Detections]:
        """Detect the phrases and exemplars in every image; one `Detections` per image.

        `phrases` / `exemplars`: one list for all images, or one list per image (lists may differ).
        Thresholds default to the checkpoint's (`box_threshold`, `text_threshold` in its config.json), else
        the family's (`default_box_threshold`, `default_text_threshold`);
        `phrase_score` ("max" or "mean" over a phrase's tokens) and `text_threshold` concern
        Grounding DINO only. `nms_iou=None` turns per-query NMS off.
        """
        require(phrase_score in ("max", "mean"), f"phrase_score must be 'max' or 'mean', not {phrase_score!r}")
        require(batch_size >= 1, f"batch size must be at least 1, got {batch_size}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        per_image = _per_image(phrases, len(images), "phrase", lambda p: isinstance(p, str))
        groups = [group_exemplars(e) for e in _per_image(exemplars, len(images), "exemplar",
                                                          lambda e: isinstance(e, Exemplar))]
        if any(groups) and not self.takes_exemplars:
            raise UserError(f"{self.family} takes text phrases only, no exemplars; "
                            "exemplars need an OWLv2 checkpoint (e.g. google/owlv2-base-patch16-ensemble)")
        for i, (ph, gr) in enumerate(zip(per_image, groups)):
            require(ph or gr, "nothing to detect: give at least one phrase or exemplar"
                    + (f" for image {i}" if len(images) > 1 else ""))
            for k, phrase in enumerate(ph):
                require(bool(phrase.strip()), f"phrase {k} is empty")
        box_threshold = self.default_box_threshold if box_threshold is None else box_threshold
        text_threshold = self.default_text_threshold if text_threshold is None else text_threshold
        found = self._detect(images, per_image, groups, box_threshold, text_threshold, phrase_score, batch_size)
        return [
            _merge(f, ph + [label for label, _ in gr], image.size, nms_iou)
            for f, ph, gr, image in zip(found, per_image, groups, images)
        ]

    def segment(
        self,
        images: Image.Image | Sequence[Image.Image],
        phrases: Sequence[str] | Sequence[Sequence[str]],
        segmenter: Segmenter | None = None,
        **detect_kwargs,
    ) -> list[Detections]:
        """Detect the phrases (`detect` and its keyword arguments), then mask every detection.

        Masks come from `segmenter` (SAM prompted with the boxes, in batches of `batch_size`
        images) or, without one, are the boxes themselves (`box_masks`); each `Detections`
        carries them as `masks`, bool (K, H, W) in the image's pixels.
        """
        from detector.segment import box_masks

        images = [images] if isinstance(images, Image.Image) else list(images)
        found = self.detect(images, phrases, **detect_kwargs)
        if segmenter is None:
            masks = [box_masks(d.boxes, d.image_size) for d in found]
        else:
            masks = segmenter.segment(images, [d.boxes for d in found], batch_size=detect_kwargs.get("batch_size", 8))
        return [dataclasses.replace(d, masks=m) for d, m in zip(found, masks)]

    def _detect(
        self,
        images: list[Image.Image],
        phrases: list[list[str]],
        exemplars: list[list[tuple[str, list[Exemplar]]]],
        box_threshold: float,
        text_threshold: float,
        phrase_score: str,
        batch_size: int,
    ) -> list[Found]:
        """Per image, raw detections; query ids index the image's phrases, then its exemplar groups."""
        raise NotImplementedError


def _per_image(items, count: int, what: str, is_item) -> list[list]:
    """One list for all images, or one list per image -> one (possibly empty) list per image."""
    if items is None:
        return [[] for _ in range(count)]
    items = list(items)
    if all(is_item(x) for x in items):
        return [items] * count
    require(len(items) == count,
            f"got {len(items)} {what} lists for {count} images; give one list per image or one for all")
    return [list(x) for x in items]


def _merge(found: Found, names: list[str], size: tuple[int, int], nms_iou: float | None) -> Detections:
    """Raw detections of one image -> `Detections`: per-query NMS, best first."""
    boxes, scores, ids = found
    if nms_iou is not None:
        keep = batched_nms(boxes, scores, ids, nms_iou)
    else:
        keep = scores.argsort(descending=True, stable=True)
    return Detections(boxes[keep], scores[keep], ids[keep], names, size)


def concat_found(parts: Sequence[Found]) -> Found:
    """Raw detections of one image gathered from several forward passes."""
    if not parts:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    boxes, scores, ids = (torch.cat(x) for x in zip(*parts))
    return boxes, scores, ids
