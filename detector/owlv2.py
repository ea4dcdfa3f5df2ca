"""OWLv2 (transformers' `Owlv2ForObjectDetection`): text queries and visual exemplars.

OWLv2 predicts one box per image patch and scores every patch against each query embedding
(the class head: cosine similarity, shifted and scaled per patch). A patch becomes at most one
detection: its best query, kept when sigmoid(logit) exceeds `box_threshold` (transformers'
`post_process_object_detection`). Boxes are predicted on the image padded to a square and are
mapped back to the image itself, then clipped.

Queries are
- phrases: the text tower's pooled, projected and normalized embedding, computed once per
  phrase list (transformers recomputes it for every image); phrases are cut at the text
  tower's 16 tokens, as the OWL tokenizer does;
- exemplars: the class embedding of the reference image's patch whose predicted box matches
  the exemplar box: among the patches whose box overlaps it at least 80% as well as the best
  one (IoU, or generalized IoU when nothing overlaps), the one least similar to the image's
  mean class embedding (the rule of OWL-ViT's image-conditioned detection). Without a box, the
  patch with the highest objectness, as `image_guided_detection` picks it. The exemplars of
  one label are averaged (unit embeddings, as OWL does for few-shot) into one query.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Owlv2ForObjectDetection

from detector.box_ops import box_iou, cxcywh_to_xyxy
from detector.detect import Found, OpenSetDetector
from detector.exemplars import Exemplar
from detector.model import loading
from detector.owl_preprocess import SquareSettings, preprocess_square


EXEMPLAR_IOU_SHARE = 0.8  # patches within 80% of the best IoU with the exemplar box are candidates


def square_settings(path_or_id: str) -> SquareSettings:
    """The checkpoint's `Owlv2ImageProcessor` settings (OWLv2's defaults if it has none)."""
    try:
        processor = AutoImageProcessor.from_pretrained(path_or_id)
    except (OSError, ValueError):
        return SquareSettings()
    return SquareSettings(
        size=int(processor.size["height"]),
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
    )


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) generalized IoU of xyxy boxes: IoU minus the share of the enclosing box neither covers."""
    iou = box_iou(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter_wh = (torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = inter_wh.prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    hull = (torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2])).prod(-1)
    return iou - (hull - union) / hull.clamp(min=torch.finfo(hull.dtype).tiny)


def exemplar_patch(box: torch.Tensor, pred_boxes: torch.Tensor, class_embeds: torch.Tensor) -> int:
    """The patch whose predicted box stands for `box` (see the module docstring).

    box: (4,) xyxy; pred_boxes: (P, 4) xyxy in the same frame; class_embeds: (P, D).
    """
    overlap = box_iou(box[None], pred_boxes)[0]
    if not (overlap > 0).any():
        overlap = generalized_box_iou(box[None], pred_boxes)[0]
    best = overlap.max()  # negative when only the generalized IoU tells boxes apart
    candidates = (overlap >= best - (1 - EXEMPLAR_IOU_SHARE) * best.abs()).nonzero()[:, 0]
    similarity = class_embeds[candidates] @ class_embeds.mean(0)
    return int(candidates[similarity.argmin()])


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.norm(x, dim=-1, keepdim=True)


class Owlv2Detector(OpenSetDetector):
    """OWLv2 with our own batched preprocessing on the device, cached text queries and exemplar queries."""

    family = "OWLv2"
    takes_exemplars = True
    default_box_threshold = 0.1  # transformers' post-processing default for OWL
    text_cache_size = 64

    def __init__(self, model: Owlv2ForObjectDetection, tokenizer, settings: SquareSettings = SquareSettings()):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self._texts: dict[tuple, torch.Tensor] = {}

    @classmethod
    def load(cls, path: str, config, device: torch.device, dtype: torch.dtype) -> "Owlv2Detector":
        with loading(path):
            model = Owlv2ForObjectDetection.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model.to(device).eval(), tokenizer, square_settings(path))

    # -- queries ------------------------------------------------------------------------------

    def text_queries(self, phrases: Sequence[str]) -> torch.Tensor:
        """(P, D) unit text embeddings of the phrases, cached per phrase list."""
        key = (tuple(phrases), self.device, self.dtype)
        if key not in self._texts:
            if len(self._texts) >= self.text_cache_size:
                del self._texts[next(iter(self._texts))]
            tokens = self.tokenizer(list(phrases), padding="max_length", truncation=True, max_length=self.max_tokens,
                                    return_tensors="pt").to(self.device)
            pooled = self.model.owlv2.get_text_features(**tokens).pooler_output
            self._texts[key] = unit(pooled)
        return self._texts[key]

    def image_features(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features (B, P, D) and the feature map (B, h, w, D) of a batch of images."""
        pixel_values = preprocess_square(images, self.settings, self.device, self.dtype)
        feature_map = self.model.image_embedder(pixel_values=pixel_values)[0]
        return feature_map.flatten(1, 2), feature_map

    def exemplar_queries(self, exemplars: Sequence[Exemplar], batch_size: int) -> dict[int, torch.Tensor]:
        """Unit query embedding (D,) of each exemplar, by `id(exemplar)`."""
        distinct = list({id(e): e for e in exemplars}.values())
        out = {}
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            feats, feature_map = self.image_features([e.image for e in chunk])
            class_embeds = self.model.class_predictor(feats)[1]
            boxes = cxcywh_to_xyxy(self.model.box_predictor(feats, feature_map).float())
            objectness = self.model.objectness_predictor(feats)
            for k, exemplar in enumerate(chunk):
                if exemplar.box is None:
                    patch = int(objectness[k].argmax())
                else:
                    w, h = exemplar.image.size
                    side = max(w, h)  # the box in the frame of the padded square
                    box = torch.tensor(exemplar.box, device=boxes.device) * torch.tensor(
                        [w, h, w, h], device=boxes.device) / side
                    patch = exemplar_patch(box, boxes[k], class_embeds[k].float())
                out[id(exemplar)] = unit(class_embeds[k, patch].float())
        return out

    # -- detection ----------------------------------------------------------------------------

    def _detect(self, images, phrases, exemplars, box_threshold, text_threshold, phrase_score, batch_size) -> list[Found]:
        examples = self.exemplar_queries([e for groups in exemplars for _, group in groups for e in group], batch_size)
        queries = []
        for ph, groups in zip(phrases, exemplars):
            parts = [self.text_queries(ph)] if ph else []
            parts += [unit(torch.stack([examples[id(e)] for e in group]).mean(0))[None].to(self.dtype)
                      for _, group in groups]
            queries.append(torch.cat(parts))
        found = []
        for start in range(0, len(images), batch_size):
            chunk = list(range(start, min(start + batch_size, len(images))))
            found += self._detect_batch([images[i] for i in chunk], [queries[i] for i in chunk], box_threshold)
        return found

    def _detect_batch(self, images: list[Image.Image], queries: list[torch.Tensor], box_threshold: float) -> list[Found]:
        """One forward for a batch; queries[i]: (Q_i, D) unit embeddings for image i."""
        feats, feature_map = self.image_features(images)
        width = max(len(q) for q in queries)
        padded = feats.new_zeros(len(images), width, queries[0].shape[-1])
        mask = torch.zeros(len(images), width, dtype=torch.bool, device=self.device)
        for i, q in enumerate(queries):
            padded[i, : len(q)], mask[i, : len(q)] = q, True
        logits = self.model.class_predictor(feats, padded, mask)[0]  # (B, P, Q) float32, padding at finfo.min
        boxes = cxcywh_to_xyxy(self.model.box_predictor(feats, feature_map).float())
        score, best = logits.float().sigmoid().max(-1)
        keep = score > box_threshold
        item, patch = keep.nonzero(as_tuple=True)
        sizes = torch.tensor([im.size for im in images], dtype=torch.float32, device=boxes.device)  # (B, 2) w, h
        scale = sizes.amax(-1, keepdim=True) / sizes  # square frame -> image frame
        kept = (boxes[item, patch] * scale[item].repeat(1, 2)).clamp(0, 1)
        counts = torch.bincount(item, minlength=len(images)).tolist()
        parts = zip(kept.cpu().split(counts), score[item, patch].cpu().split(counts), best[item, patch].cpu().split(counts))
        return list(parts)
