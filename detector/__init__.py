"""The built-in open-set detector: phrases (and visual exemplars) to boxes, through transformers' models."""

from __future__ import annotations

import importlib

from detector.box_ops import box_iou
from detector.prompt import Prompt, build_caption, positive_map, split_prompts

__all__ = ["Detections", "Exemplar", "OpenSetDetector", "Prompt", "box_iou", "build_caption", "positive_map",
           "split_prompts"]


def __getattr__(name: str):
    """`Detections`, `Exemplar` and `OpenSetDetector` load torch: import them on first use, not with the package."""
    if name in ("Detections", "Exemplar", "OpenSetDetector"):
        return getattr(importlib.import_module("detector.detect"), name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
