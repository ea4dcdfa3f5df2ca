"""Masks for boxes: SAM (transformers' `SamModel`, or `Sam2Model`) prompted with a detector's boxes.

    segmenter = Segmenter.from_pretrained("facebook/sam-vit-base")       # or a local directory, SAM 2 too
    masks = segmenter.segment([image], [boxes])    # boxes (K, 4) normalized xyxy -> bool (K, H, W)
    masks = box_masks(boxes, image.size)           # no segmenter: the boxes themselves as masks

Images go through the model in batches and all boxes of an image in the same forward pass
(the mask decoder reads each box on its own, so a batch gives what one image at a time gives).
SAM is asked for one mask per box (`multimask_output=False`): SAM's three-mask output is for
ambiguous prompts such as a single point, and a box is not one (the SAM paper uses the single
mask whenever a prompt has more than one point, and a box is two corner points); Grounded-SAM
prompts it the same way. `multimask_output=True` takes, per box, the one of three with the
highest predicted IoU instead. Low-resolution mask logits are scaled to each image's own size
by the processor's `post_process_masks`, as transformers does, and thresholded at 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from detector.model import first_line, load_config
from gligen.errors import UserError, require
from gligen.masks import box_pixels

# config.model_type -> (model class, processor class) in transformers
FAMILIES = {"sam": ("SamModel", "SamProcessor"), "sam2": ("Sam2Model", "Sam2Processor")}


class Segmenter:
    """A SAM model and its processor: boxes on images -> one boolean mask per box."""

    def __init__(self, model: torch.nn.Module, processor, name: str = "") -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name  # what it was loaded from (a directory or hub id), for records

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Segmenter":
        """Load a SAM (or SAM 2) checkpoint: a local directory or a hub id, in `dtype` on `device`.

        Anything else (a file, a directory without a SAM config, another model type, SAM 2 on a
        transformers without it) is a UserError naming `name_or_path`.
        """
        import transformers

        model_type = load_config(name_or_path, FAMILIES, "SAM").model_type
        model_name, processor_name = FAMILIES[model_type]
        if not hasattr(transformers, model_name):
            raise UserError(f"{name_or_path}: a {model_type} checkpoint needs transformers with {model_name} "
                            f"(installed: {transformers.__version__}); upgrade transformers")
        try:
            processor = getattr(transformers, processor_name).from_pretrained(name_or_path)  # the cheaper to fail
            model = getattr(transformers, model_name).from_pretrained(name_or_path, dtype=dtype)
        except (OSError, ValueError, ImportError) as error:
            raise UserError(f"{name_or_path}: cannot load the segmenter ({first_line(error)})") from error
        return cls(model.to(device), processor, name_or_path)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor], batch_size: int = 8,
                multimask_output: bool = False) -> list[torch.Tensor]:
        """One mask per box: `boxes[i]` (K_i, 4) normalized xyxy on `images[i]` -> bool (K_i, H_i, W_i) on the cpu.

        `batch_size` images go through the model at once; K_i may be 0 (then no forward pass for
        that image unless its batch has boxes). See the module docstring for `multimask_output`.
        """
        require(len(images) == len(boxes), f"got {len(boxes)} box tensors for {len(images)} images; give one per image")
        for i, b in enumerate(boxes):
            require(b.ndim == 2 and b.shape[-1] == 4, f"boxes of image {i}: expected shape (K, 4), got {tuple(b.shape)}")
        require(batch_size >= 1, f"batch size must be at least 1, got {batch_size}")
        masks = []
        for start in range(0, len(images), batch_size):
            masks += self._segment_batch(list(images[start:start + batch_size]), list(boxes[start:start + batch_size]),
                                         multimask_output)
        return masks

    def _segment_batch(self, images: list[Image.Image], boxes: list[torch.Tensor],
                       multimask_output: bool) -> list[torch.Tensor]:
        counts = [len(b) for b in boxes]
        if not any(counts):
            return [torch.zeros(0, image.height, image.width, dtype=torch.bool) for image in images]
        # the processor takes as many boxes for every image: pad with whole-image boxes, dropped below
        prompts = [_pixel_boxes(b, image.size).tolist() + [[0.0, 0.0, image.width, image.height]] * (max(counts) - len(b))
                   for b, image in zip(boxes, images)]
        inputs = self.processor(images=[image.convert("RGB") for image in images], input_boxes=prompts,
                                return_tensors="pt")
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                             input_boxes=inputs["input_boxes"].to(self.device),  # float32: SAM casts after normalizing
                             multimask_output=multimask_output)
        # (B, K, C, h, w) logits and (B, K, C) predicted IoUs: keep the best of the C masks per box
        best = outputs.iou_scores.argmax(-1)[..., None, None, None]
        logits = outputs.pred_masks.gather(2, best.expand(-1, -1, 1, *outputs.pred_masks.shape[-2:])).float()
        return [self._full_size(logits[i, :k], inputs, i) for i, k in enumerate(counts)]

    def _full_size(self, logits: torch.Tensor, inputs, i: int) -> torch.Tensor:
        """(K, 1, h, w) low-resolution logits of image i -> bool (K, H, W) in its own pixels, on the cpu."""
        sizes = [inputs["original_sizes"][i].tolist()]
        # SAM crops its padding away by the resized input size; SAM 2 resizes without padding, so it has none
        padding = [[inputs["reshaped_input_sizes"][i].tolist()]] if "reshaped_input_sizes" in inputs else []
        # a few boxes at a time: K full-size float masks of a large photo would take gigabytes
        return torch.cat([self.processor.post_process_masks([chunk], sizes, *padding)[0][:, 0].cpu()
                          for chunk in logits.split(16)])


def box_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, 4) normalized xyxy boxes on an image of `size` (width, height) -> bool (K, H, W), True inside each box.

    A pixel is inside when it overlaps the box by a positive area (`gligen.masks.box_pixels`), so the mask
    covers the whole box (as a region to repaint should) and a box smaller than a pixel still marks that pixel.
    """
    width, height = size
    masks = [box_pixels(box, width, height) for box in boxes.double().tolist()]
    return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.bool)


def _pixel_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, 4) normalized xyxy -> (K, 4) pixel xyxy in float64, on the cpu."""
    width, height = size
    return boxes.double().cpu() * torch.tensor([width, height, width, height], dtype=torch.float64)
