"""Maps made from any image, in the encodings `gligen.maps` reads (`pip install gligen[conditions]`).

- canny: OpenCV's Canny edge detector (`low`, `high` hysteresis thresholds) -> white edges on black.
- depth: a transformers depth model (`DPTForDepthEstimation`, `DepthAnythingForDepthEstimation`, ... : a local
  directory or hub id) -> its relative inverse depth (near bright) scaled to 0 .. 255.
- normal: a transformers depth model's output turned into surface normals (the gradient of the inverse depth,
  as ControlNet's normal maps were made from MiDaS) -> RGB = (n + 1) / 2 * 255.
- hed: ControlNet 1.1's HED network (`gligen.maps.hed`; `ControlNetHED.pth`, default from lllyasviel/Annotators)
  -> white soft edges on black.
- sem: a transformers ADE20K semantic segmenter (e.g. a SegFormer fine-tuned on ADE20K) -> ADE20K label PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from gligen.errors import UserError

EXTRACTABLE = ("canny", "hed", "depth", "normal", "sem")


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of `image` as a one-channel map: 255 on edges, 0 elsewhere."""
    cv2 = _cv2()
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(cv2.Canny(grey, low, high), "L")


def normals_from_depth(depth: np.ndarray, relief: float = 1.0) -> Image.Image:
    """Surface normals of an inverse-depth map (near bright, any scale) as RGB = (n + 1) / 2 * 255.

    The depth, scaled to [0, 1], is a height field whose full range is `relief` times the image's width;
    n = normalize(-dh/dx, dh/dy, 1) with x to the right, y up and z towards the viewer.
    """
    depth = depth.astype(np.float64)
    span = depth.max() - depth.min()
    height = (depth - depth.min()) / span * relief * depth.shape[1] if span > 0 else np.zeros_like(depth)
    d_rows, d_cols = np.gradient(height)
    normal = np.stack([-d_cols, d_rows, np.ones_like(height)], axis=-1)  # rows grow downwards: dh/dy = -dh/drow
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return Image.fromarray(np.round((normal + 1) / 2 * 255).astype(np.uint8), "RGB")


@dataclass
class DenseModel:
    """A transformers model predicting a map per pixel, and its image processor (see the subclasses)."""

    model: Any
    processor: Any
    device: str = "cpu"
    auto_class = ""  # the transformers Auto class that loads such a model
    what = ""

    @classmethod
    def from_pretrained(cls, name: str, device: str = "cpu") -> DenseModel:
        import transformers

        try:
            model = getattr(transformers, cls.auto_class).from_pretrained(name).to(device).eval()
            processor = transformers.AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise UserError(f"{name}: cannot load a transformers {cls.what} ({str(error).splitlines()[0]})") from None
        return cls(model, processor, device)

    def predict(self, image: Image.Image, output: str, mode: str):
        """The model's `output` (B, C, h, w) or (B, h, w) for the image, resized to the image: (C, H, W)."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.no_grad():
            predicted = getattr(self.model(**inputs), output).float()
        predicted = predicted[:, None] if predicted.ndim == 3 else predicted
        return torch.nn.functional.interpolate(predicted, (image.height, image.width), mode=mode)[0]


class DepthModel(DenseModel):
    """A transformers depth estimator (DPT, Depth Anything, ...)."""

    auto_class, what = "AutoModelForDepthEstimation", "depth model"

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Relative inverse depth (near large) at the image's size, (H, W) float."""
        return self.predict(image, "predicted_depth", "bicubic")[0].cpu().numpy()


def depth_image(depth: np.ndarray) -> Image.Image:
    """Inverse depth (near large) as an 8-bit map, near bright, scaled to 0 .. 255."""
    span = depth.max() - depth.min()
    scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L")


@dataclass
class Extractor:
    """image -> the `kind` map of it (see the module docstring). `model`: a depth model for depth and normal."""

    kind: str
    model: str | None = None
    low: int = 100
    high: int = 200
    device: str = "cpu"

    def __post_init__(self):
        if self.kind not in EXTRACTABLE:
            raise UserError(f"--condition must be one of {', '.join(EXTRACTABLE)}, got {self.kind!r}")
        if self.kind == "canny":
            _cv2()
            if not 0 <= self.low <= self.high:
                raise UserError(f"canny thresholds must satisfy 0 <= low <= high, got low {self.low}, high {self.high}")
        elif self.kind == "hed":
            from gligen.maps.hed import DEFAULT_REPO, HedNetwork

            self._hed = HedNetwork.from_pretrained(self.model or DEFAULT_REPO).to(self.device)
        elif self.model is None:
            needs = "an ADE20K semantic segmenter (e.g. a SegFormer fine-tuned on ADE20K)" if self.kind == "sem" else \
                "a depth model (e.g. Intel/dpt-hybrid-midas)"
            raise UserError(f"{self.kind} maps need {needs}: give its transformers directory or hub id "
                            "(--condition-model; `gligen condition`: --model)")
        elif self.kind == "sem":
            self._segmenter = SemanticSegmenter.from_pretrained(self.model, self.device)
        else:
            self._depth = DepthModel.from_pretrained(self.model, self.device)

    def options(self) -> dict[str, Any]:
        """What decides the maps (a data writer's resume check)."""
        return {"condition": self.kind, "condition_model": self.model, "canny_low": self.low, "canny_high": self.high}

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.kind == "canny":
            return canny(image, self.low, self.high)
        if self.kind == "hed":
            return self._hed.edge_map(image)
        if self.kind == "sem":
            return self._segmenter(image)
        depth = self._depth(image)
        return depth_image(depth) if self.kind == "depth" else normals_from_depth(depth)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("canny maps need OpenCV: pip install 'gligen[conditions]' (opencv-python-headless)") from None
    return cv2


class SemanticSegmenter(DenseModel):
    """A transformers semantic segmenter trained on ADE20K's 150 classes (e.g. a SegFormer) -> label maps as
    ADE20K's PNGs hold them: its class i becomes label i + 1, 0 being 'other' (the `reduce_labels` convention)."""

    auto_class, what = "AutoModelForSemanticSegmentation", "segmenter"

    def __call__(self, image: Image.Image) -> Image.Image:
        labels = self.predict(image, "logits", "bilinear").argmax(0) + 1
        return Image.fromarray(labels.clamp(max=255).byte().cpu().numpy(), "L")
