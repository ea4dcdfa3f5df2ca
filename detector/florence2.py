"""Florence-2 (transformers' `Florence2ForConditionalGeneration`): a detector that names what it sees.

Florence-2 answers task prompts by generating text in which boxes are location tokens
(`<loc_0>` ... `<loc_999>`, the image split in 1000 bins per side). Its processor builds the
prompt and parses the answer; the model generates with beam search (3 beams, no sampling, at
most 1024 new tokens: the settings of the released examples). Here
- `name_objects(images)`: `<OD>` (category names) or `<DENSE_REGION_CAPTION>` (short
  descriptions): detections with the names it chose, for caption-free layouts;
- `detect(images, phrases)`: `<OPEN_VOCABULARY_DETECTION>` once per (image, phrase).
Generated boxes carry no confidence: every detection scores 1, and thresholds do not apply.
Images are prepared by the checkpoint's own image processor, on the CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import AutoProcessor, Florence2ForConditionalGeneration

from detector.detect import Found, OpenSetDetector, concat_found
from detector.detections import Detections
from detector.model import loading
from gligen.errors import require

TASKS = {"od": "<OD>", "dense": "<DENSE_REGION_CAPTION>"}
PHRASE_TASK = "<OPEN_VOCABULARY_DETECTION>"


class Florence2Detector(OpenSetDetector):
    """Florence-2 generation wrapped as a detector: one batched `generate` per batch of (image, prompt) pairs."""

    family = "Florence-2"
    names_objects = True
    default_box_threshold = 0.0  # boxes come without scores
    num_beams = 3
    max_new_tokens = 1024

    def __init__(self, model: Florence2ForConditionalGeneration, processor):
        self.model = model
        self.processor = processor

    @classmethod
    def load(cls, path: str, config, device: torch.device, dtype: torch.dtype) -> "Florence2Detector":
        with loading(path):
            model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
            processor = AutoProcessor.from_pretrained(path)
        return cls(model.to(device).eval(), processor)

    @torch.inference_mode()
    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], task: str) -> list[dict]:
        """Florence-2's parsed answers (`post_process_generation`) to prompt i about image i."""
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        positions = self.model.config.text_config.max_position_embeddings
        ids = self.model.generate(**inputs, max_new_tokens=min(self.max_new_tokens, positions - 2),
                                  num_beams=self.num_beams, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=False)
        return [self.processor.post_process_generation(text, task=task, image_size=image.size)[task]
                for text, image in zip(texts, images)]

    def _found(self, answer: dict, labels: list[str], size: tuple[int, int], query: int | None) -> Found:
        """Boxes of one parsed answer; query ids are `query`, or each label's index in `labels` (grown as met)."""
        boxes = answer.get("bboxes", [])
        names = answer.get("labels", answer.get("bboxes_labels", []))
        ids = []
        for name in names:
            if query is None and name not in labels:
                labels.append(name)
            ids.append(query if query is not None else labels.index(name))
        w, h = size
        found = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / torch.tensor([w, h, w, h])
        return found.clamp(0, 1), torch.ones(len(ids)), torch.tensor(ids, dtype=torch.long)

    def _detect(self, images, phrases, exemplars, box_threshold, text_threshold, phrase_score, batch_size) -> list[Found]:
        tasks = [(i, k) for i, ph in enumerate(phrases) for k in range(len(ph))]
        parts: list[list[Found]] = [[] for _ in images]
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start : start + batch_size]
            answers = self.generate([images[i] for i, _ in chunk],
                                    [PHRASE_TASK + phrases[i][k] for i, k in chunk], PHRASE_TASK)
            for (i, k), answer in zip(chunk, answers):
                parts[i].append(self._found(answer, [], images[i].size, k))
        return [concat_found(p) for p in parts]

    def name_objects(self, images: Sequence[Image.Image], task: str = "od", batch_size: int = 8) -> list[Detections]:
        """What Florence-2 finds and names in each image, in the order it wrote them (`task`: od or dense)."""
        require(task in TASKS, f"task must be one of {sorted(TASKS)}, not {task!r}")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            for image, answer in zip(chunk, self.generate(chunk, [TASKS[task]] * len(chunk), TASKS[task])):
                labels: list[str] = []
                boxes, scores, ids = self._found(answer, labels, image.size, None)
                out.append(Detections(boxes, scores, ids, labels, image.size))
        return out
