"""Grounding DINO and MM-Grounding-DINO (LLMDet checkpoints too), through transformers' model.

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
from typing import Sequence

import torch
from PIL import Image

from detector.box_ops import cxcywh_to_xyxy
from detector.detect import Found, OpenSetDetector, concat_found
from detector.preprocess import ImageSettings, preprocess
from detector.prompt import Prompt, positive_map, split_prompts


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


class GroundingDinoDetector(OpenSetDetector):
    """Grounding DINO (transformers' model) with our own batched pre- and post-processing."""

    family = "Grounding DINO"
    prompt_cache_size = 64  # phrase lists whose prompts are kept tokenized

    def __init__(self, model, tokenizer, settings: ImageSettings = ImageSettings()):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_tokens = int(getattr(model.config, "max_text_len", 256))
        self._prompts: dict[tuple, list[_EncodedPrompt]] = {}

    @classmethod
    def load(cls, path: str, config, device: torch.device, dtype: torch.dtype) -> "GroundingDinoDetector":
        from detector.model import load_detector

        return cls(*load_detector(path, device=device, dtype=dtype))

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

    def _detect(self, images, phrases, exemplars, box_threshold, text_threshold, phrase_score, batch_size) -> list[Found]:
        tasks = [(i, p) for i, ph in enumerate(phrases) for p in self.encode_phrases(ph)]
        found: list[list[Found]] = [[] for _ in images]
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start : start + batch_size]
            prompts = [p for _, p in chunk]
            out = self.forward([images[i] for i, _ in chunk], prompts)
            item, *kept = self._select(out, prompts, box_threshold, text_threshold, phrase_score)
            counts = torch.bincount(item, minlength=len(chunk)).tolist()
            for (i, _), part in zip(chunk, zip(*(x.split(counts) for x in kept))):
                found[i].append(part)
        return [concat_found(parts) for parts in found]

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
