"""The built-in open-set detector: phrases to boxes with Grounding DINO (transformers' model)."""

from detector.box_ops import box_iou
from detector.detect import Detections, OpenSetDetector
from detector.prompt import Prompt, build_caption, positive_map, split_prompts

__all__ = ["Detections", "OpenSetDetector", "Prompt", "box_iou", "build_caption", "positive_map", "split_prompts"]
