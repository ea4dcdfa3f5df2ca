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
from gligen.errors import require


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
    """A prompt tokenized once, on the model's device: ids for the model, phrase token positions for scoring."""

    prompt: Prompt
    input_ids: torch.Tensor  # (T,) int64
    attention_mask: torch.Tensor  # (T,) int64, all ones
    phrase_tokens: torch.Tensor  # (P, L) int64 token positions, padded with 0
    phrase_token_valid: torch.Tensor  # (P, L) bool
    phrase_ids: torch.Tensor  # (P,) int64 index of each phrase in the caller's list


def pad_stack(tensors: Sequence[torch.Tensor], value) -> torch.Tensor:
    """Stack tensors of one rank into (N, *largest shape), padding each at the end with `value`."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    out = tensors[0].new_full((len(tensors), *shape), value)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, n) for n in t.shape))] = t
    return out


def phrase_scores(probs: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token probabilities per phrase, for a batch of (image, prompt) pairs.

    probs: (B, Q, T) sigmoid of the logits; tokens, valid: (B, P, L) the phrases' token positions.
    Returns (B, Q, P): max or mean over each phrase's tokens (0 for a phrase with no valid token).
    """
    (b, p, length), queries = tokens.shape, probs.shape[1]
    index = tokens.reshape(b, 1, p * length).expand(b, queries, p * length)
    gathered = probs.gather(2, index).view(b, queries, p, length) * valid[:, None]  # padding slots count as 0
    if mode == "max":
        return gathered.amax(-1)
    return gathered.sum(-1) / valid.sum(-1).clamp(min=1)[:, None]


class OpenSetDetector:
    """Grounding DINO (transformers' model) with our own batched pre- and post-processing."""

    prompt_cache_size = 64  # phrase lists whose prompts are kept tokenized

    def __init__(self, model, tokenizer, settings: ImageSettings = ImageSettings()):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_tokens = int(getattr(model.config, "max_text_len", 256))
        self._prompts: dict[tuple, list[_EncodedPrompt]] = {}

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
        """Prompts for `phrases` with their token ids and phrase token positions on the model's device.

        Cached per phrase list: a loop over many images with the same phrases tokenizes them once.
        """
        key = (tuple(phrases), self.max_tokens, self.device)
        if key not in self._prompts:
            if len(self._prompts) >= self.prompt_cache_size:
                del self._prompts[next(iter(self._prompts))]  # the oldest entry
            prompts = split_prompts(phrases, self.tokenizer, self.max_tokens)
            self._prompts[key] = [self._encode(prompt, key[2]) for prompt in prompts]
        return self._prompts[key]

    def _encode(self, prompt: Prompt, device: torch.device) -> _EncodedPrompt:
        tokens = self.tokenizer(prompt.caption, return_offsets_mapping=True, return_tensors="pt")
        masks = positive_map(tokens["offset_mapping"][0], prompt.spans)  # (P, T)
        length = int(masks.sum(-1).max())
        # a stable sort puts each phrase's token positions first, in order
        order = (~masks).to(torch.uint8).argsort(dim=-1, stable=True)[:, :length]
        valid = masks.gather(1, order)
        return _EncodedPrompt(
            prompt=prompt,
            input_ids=tokens["input_ids"][0].to(device),
            attention_mask=tokens["attention_mask"][0].to(device),
            phrase_tokens=torch.where(valid, order, 0).to(device),
            phrase_token_valid=valid.to(device),
            phrase_ids=torch.tensor(prompt.phrase_ids, dtype=torch.long, device=device),
        )

    def _text_batch(self, prompts: list[_EncodedPrompt]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask and token_type_ids (B, T) on the model's device."""
        ids = pad_stack([p.input_ids for p in prompts], self.tokenizer.pad_token_id)
        mask = pad_stack([p.attention_mask for p in prompts], 0)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    @torch.inference_mode()
    def forward(self, images: list[Image.Image], prompts: list[_EncodedPrompt]):
        """One batched forward of image i with prompt i; returns transformers' output (logits, pred_boxes)."""
        distinct = {id(im): im for im in images}  # an image asked with several prompts is resized once
        batch = preprocess(list(distinct.values()), self.settings, self.device, self.dtype)
        pixel_values, pixel_mask = batch.pixel_values, batch.pixel_mask
        if len(distinct) < len(images):
            slot = {key: k for k, key in enumerate(distinct)}
            order = torch.tensor([slot[id(im)] for im in images], device=self.device)
            pixel_values, pixel_mask = pixel_values[order], pixel_mask[order]
        return self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, **self._text_batch(prompts))

    @torch.inference_mode()
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
        tasks = [(i, p) for i, ph in enumerate(per_image) for p in self.encode_phrases(ph)]
        found: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in images]
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start : start + batch_size]
            prompts = [p for _, p in chunk]
            out = self.forward([images[i] for i, _ in chunk], prompts)
            item, *kept = self._select(out, prompts, box_threshold, text_threshold, phrase_score)
            counts = torch.bincount(item, minlength=len(chunk)).tolist()
            for (i, _), part in zip(chunk, zip(*(x.split(counts) for x in kept))):
                found[i].append(part)
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
    def _select(out, prompts: list[_EncodedPrompt], box_threshold, text_threshold, mode) -> tuple[torch.Tensor, ...]:
        """Each query's best phrase of its prompt, thresholded, for a whole batch at once.

        out: the model's output for B (image, prompt) pairs (logits (B, Q, 256), pred_boxes (B, Q, 4)).
        Returns, on the cpu, for the K kept queries: batch index (K,), normalized xyxy boxes (K, 4),
        scores (K,) and phrase ids (K,) into the caller's list; one host sync for the batch.
        """
        probs = out.logits.float().sigmoid()
        boxes = cxcywh_to_xyxy(out.pred_boxes.float()).clamp(0, 1)
        tokens = pad_stack([p.phrase_tokens for p in prompts], 0)
        valid = pad_stack([p.phrase_token_valid for p in prompts], False)
        phrase_ids = pad_stack([p.phrase_ids for p in prompts], -1)  # (B, P); -1 pads shorter prompts
        token_max = phrase_scores(probs, tokens, valid, "max")  # (B, Q, P)
        scores = token_max if mode == "max" else phrase_scores(probs, tokens, valid, mode)
        scores = scores.masked_fill((phrase_ids < 0)[:, None], float("-inf"))  # padding is never the best phrase
        score, best = scores.max(-1)  # (B, Q)
        keep = (score > box_threshold) & (token_max.gather(2, best[..., None])[..., 0] > text_threshold)
        item, query = keep.nonzero(as_tuple=True)
        ids = phrase_ids.gather(1, best)
        return item.cpu(), boxes[item, query].cpu(), score[item, query].cpu(), ids[item, query].cpu()

    @staticmethod
    def _merge(parts, phrases: list[str], size: tuple[int, int], nms_iou: float | None) -> Detections:
        """Detections of all prompts of one image, per-phrase NMS, best first."""
        boxes, scores, ids = (torch.cat(x) for x in zip(*parts))
        if nms_iou is not None:
            keep = batched_nms(boxes, scores, ids, nms_iou)
        else:
            keep = scores.argsort(descending=True, stable=True)
        return Detections(boxes[keep], scores[keep], ids[keep], list(phrases), size)
