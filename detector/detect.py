"""OpenSetDetector: batched phrase grounding with Grounding DINO.

Per image: the phrases become one or more prompts (see `detector.prompt`), every
(image, prompt) pair goes through one batched forward pass, and each query of the model
becomes at most one detection: the phrase with the highest phrase score, where a phrase's
score is the max (or mean) of the sigmoid of the query's logits over the phrase's tokens.
A query is kept when that score exceeds `box_threshold` and one of the phrase's tokens
exceeds `text_threshold`; detections of the same phrase then go through NMS.

With `phrase_score="max"` and no NMS, the kept detections are exactly those of
transformers' `post_process_grounded_object_detection`, except for queries whose highest
token is a special token ([CLS], [SEP], the "." separators), which name no phrase and are
dropped here; boxes are clipped to the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from detector.box_ops import batched_nms, cxcywh_to_xyxy
from detector.model import load_detector
from detector.preprocess import ImageSettings, preprocess
from detector.prompt import Prompt, positive_map, split_prompts
from gligen.errors import UserError, require


@dataclass
class Detections:
    """The detections in one image, best first."""

    boxes: torch.Tensor  # (K, 4) float32 normalized xyxy in [0, 1], cpu
    scores: torch.Tensor  # (K,) float32
    phrase_ids: torch.Tensor  # (K,) int64 index into `phrases`
    phrases: list[str]  # the phrases asked for, in the caller's order
    image_size: tuple[int, int]  # (width, height) in pixels

    def __len__(self) -> int:
        return len(self.scores)

    def pixel_boxes(self) -> torch.Tensor:
        """(K, 4) xyxy in pixels of the original image."""
        w, h = self.image_size
        return self.boxes * torch.tensor([w, h, w, h], dtype=self.boxes.dtype)

    @property
    def labels(self) -> list[str]:
        return [self.phrases[i] for i in self.phrase_ids.tolist()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "phrases": list(self.phrases),
            "detections": [
                {"phrase": self.phrases[p], "phrase_id": p, "score": round(s, 6),
                 "box": [round(v, 6) for v in box], "pixel_box": [round(v, 2) for v in pixel]}
                for p, s, box, pixel in zip(
                    self.phrase_ids.tolist(), self.scores.tolist(), self.boxes.tolist(), self.pixel_boxes().tolist()
                )
            ],
        }


@dataclass
class _EncodedPrompt:
    """A prompt tokenized once: ids for the model, token positions of each phrase for scoring."""

    prompt: Prompt
    input_ids: torch.Tensor  # (T,) int64
    phrase_tokens: torch.Tensor  # (P, L) int64 token positions, padded with 0
    phrase_token_valid: torch.Tensor  # (P, L) bool


def phrase_scores(probs: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token probabilities per phrase.

    probs: (Q, T) sigmoid of the logits; tokens, valid: (P, L) the phrases' token positions.
    Returns (Q, P): max or mean over each phrase's tokens.
    """
    gathered = probs[:, tokens] * valid  # (Q, P, L); padding slots count as 0
    if mode == "max":
        return gathered.amax(-1)
    return gathered.sum(-1) / valid.sum(-1)


class OpenSetDetector:
    """Grounding DINO (transformers' model) with our own batched pre- and post-processing."""

    def __init__(self, model, tokenizer, settings: ImageSettings = ImageSettings()):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_tokens = int(getattr(model.config, "max_text_len", 256))

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "OpenSetDetector":
        """Load an HF Grounding DINO (or MM-Grounding-DINO) directory or hub id."""
        return cls(*load_detector(path_or_id, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode_phrases(self, phrases: Sequence[str]) -> list[_EncodedPrompt]:
        """Prompts for `phrases` with their token ids and phrase token positions."""
        encoded = []
        for prompt in split_prompts(phrases, self.tokenizer, self.max_tokens):
            tokens = self.tokenizer(prompt.caption, return_offsets_mapping=True, return_tensors="pt")
            masks = positive_map(tokens["offset_mapping"][0], prompt.spans)
            length = int(masks.sum(-1).max())
            positions = torch.zeros(len(masks), length, dtype=torch.long)
            valid = torch.zeros(len(masks), length, dtype=torch.bool)
            for p, mask in enumerate(masks):
                where = mask.nonzero()[:, 0]
                positions[p, : len(where)] = where
                valid[p, : len(where)] = True
            encoded.append(_EncodedPrompt(prompt, tokens["input_ids"][0], positions, valid))
        return encoded

    def _text_batch(self, prompts: list[_EncodedPrompt]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask and token_type_ids (B, T) on the model's device."""
        length = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p.input_ids)] = p.input_ids
            mask[i, : len(p.input_ids)] = 1
        device = self.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "token_type_ids": torch.zeros_like(ids, device=device)}

    @torch.inference_mode()
    def forward(self, images: list[Image.Image], prompts: list[_EncodedPrompt]):
        """One batched forward of image i with prompt i; returns transformers' output (logits, pred_boxes)."""
        distinct = {id(im): im for im in images}  # an image asked with several prompts is resized once
        batch = preprocess(list(distinct.values()), self.settings, self.device, self.dtype)
        slot = {key: k for k, key in enumerate(distinct)}
        order = torch.tensor([slot[id(im)] for im in images], device=self.device)
        return self.model(
            pixel_values=batch.pixel_values[order], pixel_mask=batch.pixel_mask[order], **self._text_batch(prompts)
        )

    def detect(
        self,
        images: Image.Image | Sequence[Image.Image],
        phrases: Sequence[str] | Sequence[Sequence[str]],
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        phrase_score: str = "max",
        nms_iou: float | None = 0.5,
        batch_size: int = 8,
    ) -> list[Detections]:
        """Detect the phrases in every image; one `Detections` per image.

        `phrases`: one list for all images, or one list per image (lists may differ).
        `nms_iou=None` turns per-phrase NMS off.
        """
        require(phrase_score in ("max", "mean"), f"phrase_score must be 'max' or 'mean', not {phrase_score!r}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        per_image = self._phrases_per_image(phrases, len(images))
        encoded = {key: self.encode_phrases(key) for key in dict.fromkeys(tuple(ph) for ph in per_image)}
        tasks = [(i, p) for i, ph in enumerate(per_image) for p in encoded[tuple(ph)]]
        found: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in images]
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start : start + batch_size]
            out = self.forward([images[i] for i, _ in chunk], [p for _, p in chunk])
            probs = out.logits.float().sigmoid()
            boxes = cxcywh_to_xyxy(out.pred_boxes.float()).clamp(0, 1)
            for b, (i, prompt) in enumerate(chunk):
                found[i].append(self._select(probs[b], boxes[b], prompt, box_threshold, text_threshold, phrase_score))
        return [self._merge(parts, per_image[i], images[i].size, nms_iou) for i, parts in enumerate(found)]

    @staticmethod
    def _phrases_per_image(phrases, count: int) -> list[list[str]]:
        require(len(phrases) > 0, "the phrase list is empty: give at least one phrase to detect")
        if all(isinstance(p, str) for p in phrases):
            return [list(phrases)] * count
        require(
            len(phrases) == count,
            f"got {len(phrases)} phrase lists for {count} images; give one list per image or one for all",
        )
        for i, ph in enumerate(phrases):
            require(len(ph) > 0, f"the phrase list of image {i} is empty")
        return [list(ph) for ph in phrases]

    @staticmethod
    def _select(probs, boxes, prompt: _EncodedPrompt, box_threshold, text_threshold, mode):
        """Each query's best phrase of one prompt, thresholded. probs: (Q, 256), boxes: (Q, 4)."""
        tokens, valid = prompt.phrase_tokens.to(probs.device), prompt.phrase_token_valid.to(probs.device)
        token_max = phrase_scores(probs, tokens, valid, "max")  # (Q, P)
        scores = token_max if mode == "max" else phrase_scores(probs, tokens, valid, mode)
        score, best = scores.max(-1)
        keep = (score > box_threshold) & (token_max.gather(1, best[:, None])[:, 0] > text_threshold)
        ids = torch.tensor(prompt.prompt.phrase_ids, device=probs.device)[best]
        return boxes[keep].cpu(), score[keep].cpu(), ids[keep].cpu()

    @staticmethod
    def _merge(parts, phrases: list[str], size: tuple[int, int], nms_iou: float | None) -> Detections:
        """Detections of all prompts of one image, per-phrase NMS, best first."""
        boxes, scores, ids = (torch.cat(x) for x in zip(*parts))
        if nms_iou is not None:
            keep = batched_nms(boxes, scores, ids, nms_iou)
        else:
            keep = scores.argsort(descending=True, stable=True)
        return Detections(boxes[keep], scores[keep], ids[keep], list(phrases), size)


def open_image(path) -> Image.Image:
    """Open an image file fully (decoded now, so a corrupt file fails here); a `UserError` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: cannot read the image ({error.__class__.__name__}: {error})") from error
