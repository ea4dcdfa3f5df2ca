"""Detector throughput per family, end to end: JPEG bytes in, detections out.

    PYTHONPATH=. python benchmarks/detect.py [--out detect.json] [--families grounding-dino,owlv2] [--tiny]

For each family behind `OpenSetDetector`, random weights in the shapes of a released
checkpoint (built in code, nothing downloaded), batch 1 and 8, float32 and bfloat16:

| family | shapes | input |
| --- | --- | --- |
| grounding-dino | grounding-dino-tiny: Swin-T, BERT-base, 900 queries | 800x1333 |
| mm-grounding-dino | MM-Grounding-DINO-T / LLMDet-T: the same shapes | 800x1333 |
| owlv2 | owlv2-base-patch16: ViT-B/16 at 960x960, 512-wide text tower | 960x960 after padding |
| florence2 | Florence-2-base: DaViT, BART-base (6+6 layers, 51289 tokens), 768x768 | 768x768 |

Columns (images per second):
- `detect`: `OpenSetDetector.detect` on decoded images (preprocessing, model, post-processing);
- `e2e`: the labelling-at-scale path: JPEG decoding in DataLoader workers (`--workers`) overlapped
  with `detect` (`gligen.data.sharded.decoded_batches`), timed from the first byte to the last box;
- `decode`: JPEG decoding alone in this thread, for scale;
- `transformers`: transformers' processor + model + post-processing on decoded images (the image
  processor a user gets by default: torchvision when installed, else PIL/scipy); not for Florence-2,
  whose processor and `generate` are ours too.
Florence-2 generates a fixed 100 tokens per image (about ten boxes with labels; 20 on the tiny config),
beam search with 3 beams as the released examples do; random weights would otherwise write until
the 1024-token limit.

Without CUDA (or with --tiny) the tiny test configs at small image sizes stand in, one timed
batch each: the script stays checkable anywhere; those figures say nothing about GPU speed.
`--real --batches 1 --iters 1` runs the released shapes on a CPU, to check that path.
`benchmarks/detect_grounding_dino.py` compares Grounding DINO with transformers in depth (fidelity, torch.compile).
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detect_grounding_dino import PHRASES, bert_tokenizer, images_per_second, random_images, random_model  # noqa: E402

from detector.detect import OpenSetDetector  # noqa: E402
from gligen.data.sharded import InputShard, Pending, decoded_batches  # noqa: E402
from gligen.files import write_json  # noqa: E402

FAMILIES = ("grounding-dino", "mm-grounding-dino", "owlv2", "florence2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- models


def grounding_dino(tiny: bool, device: torch.device, mm: bool = False):
    from transformers import GroundingDinoProcessor

    from detector.grounding_dino import GroundingDinoDetector
    from detector.preprocess import ImageSettings

    model = random_model(tiny, device, mm)
    settings = ImageSettings(96, 160) if tiny else ImageSettings()
    tokenizer = bert_tokenizer()
    size = {"shortest_edge": settings.shortest_edge, "longest_edge": settings.longest_edge}
    processor = GroundingDinoProcessor(default_image_processor("grounding_dino", size=size), tokenizer)

    def transformers_pipeline(model):
        def run(images, threshold):
            inputs = processor(images=images, text=[PHRASES] * len(images), return_tensors="pt", padding=True)
            inputs = inputs.to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model(**inputs)
            return processor.post_process_grounded_object_detection(
                out, inputs["input_ids"], threshold=threshold, text_threshold=0.25,
                target_sizes=[(im.height, im.width) for im in images])
        return run

    return GroundingDinoDetector(model, tokenizer, settings), transformers_pipeline, (80, 120) if tiny else (800, 1333)


def owlv2(tiny: bool, device: torch.device):
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor

    from detector.owl_preprocess import SquareSettings
    from detector.owlv2 import Owlv2Detector
    from tests.tiny_detector import owl_tokenizer, tiny_owlv2

    if tiny:
        model = tiny_owlv2().to(device)
    else:
        torch.manual_seed(0)
        config = Owlv2Config(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
                             vision_config=dict(image_size=960, patch_size=16), projection_dim=512)
        with device:
            model = Owlv2ForObjectDetection(config).eval()
    size = model.config.vision_config.image_size
    with tempfile.TemporaryDirectory() as files:
        tokenizer = owl_tokenizer(files)
    processor = Owlv2Processor(default_image_processor("owlv2", size={"height": size, "width": size}), tokenizer)

    def transformers_pipeline(model):
        def run(images, threshold):
            inputs = processor(text=[PHRASES] * len(images), images=images, return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model(**inputs)
            return processor.post_process_grounded_object_detection(
                out, threshold=threshold, target_sizes=[(im.height, im.width) for im in images])
        return run

    return Owlv2Detector(model, tokenizer, SquareSettings(size)), transformers_pipeline, (80, 120) if tiny else (800, 1333)


def florence2(tiny: bool, device: torch.device):
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    from detector.florence2 import Florence2Detector
    from tests.tiny_detector import florence_processor

    words = "Locate the objects with category name in image . in the".split() + " ".join(PHRASES).split()
    processor = florence_processor(words, image_size=64 if tiny else 768)
    tokenizer = processor.tokenizer
    if not tiny:  # BART's 51289-token vocabulary: the output layer is a good part of each step
        tokenizer.add_tokens([f"<word_{i}>" for i in range(51289 - len(tokenizer))])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.eos_token_id,
               forced_bos_token_id=tokenizer.bos_token_id, vocab_size=len(tokenizer))
    if tiny:
        text = dict(model_type="bart", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, **ids)
        vision = dict(depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                      window_size=2, projection_dim=32)
    else:
        text = dict(model_type="bart", d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                    max_position_embeddings=1024, **ids)
        vision = dict(projection_dim=768)
    torch.manual_seed(0)
    config = Florence2Config(vision_config=dict(drop_path_rate=0.0, **vision), text_config=text,
                             image_token_id=tokenizer.image_token_id)
    with device:
        model = Florence2ForConditionalGeneration(config).eval()
    ours = Florence2Detector(model, processor)
    ours.max_new_tokens = 20 if tiny else 100
    model.generation_config.min_new_tokens = ours.max_new_tokens  # a fixed length (see the module doc)
    return ours, None, (80, 120) if tiny else (800, 1333)


BUILDERS: dict[str, Callable] = {
    "grounding-dino": grounding_dino,
    "mm-grounding-dino": lambda tiny, device: grounding_dino(tiny, device, mm=True),
    "owlv2": owlv2,
    "florence2": florence2,
}


def default_image_processor(model_type: str, **kwargs):
    """What `AutoImageProcessor` gives a user: the torchvision backend when installed, else PIL (and scipy)."""
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.owlv2 import Owlv2ImageProcessorPil
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import GroundingDinoImageProcessor, Owlv2ImageProcessor

        return {"grounding_dino": GroundingDinoImageProcessor, "owlv2": Owlv2ImageProcessor}[model_type](**kwargs)
    return {"grounding_dino": GroundingDinoImageProcessorPil, "owlv2": Owlv2ImageProcessorPil}[model_type](**kwargs)


def with_dtype(detector: OpenSetDetector, dtype: torch.dtype) -> OpenSetDetector:
    """A copy of the detector whose model is in `dtype`."""
    other = copy.copy(detector)
    other.model = copy.deepcopy(detector.model).to(dtype)
    return other


# ----------------------------------------------------------------------------- timing


def jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    """`count` images of `size` (height, width) as JPEG, quality 95."""
    out = []
    for image in random_images([size] * count, seed=0):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def decode(data: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(d)).convert("RGB") for d in data]


def e2e_images_per_second(detector: OpenSetDetector, data: list[bytes], batch: int, workers: int,
                          threshold: float, device: torch.device) -> float:
    """JPEG bytes decoded in DataLoader workers while the detector runs on earlier batches, as labelling runs."""
    shard = InputShard(0, "benchmark", items=[Pending(str(i), f"image {i}", d) for i, d in enumerate(data)])

    def run() -> None:
        for decoded in decoded_batches(shard, batch, workers):
            detector.detect([d.image for d in decoded], PHRASES, box_threshold=threshold, batch_size=batch)

    return images_per_second(run, len(data), 1, 1, device)


def family_rows(name: str, tiny: bool, device: torch.device, batches: list[int], workers: int, iters: int | None,
                report: "Report") -> None:
    ours, transformers_pipeline, size = BUILDERS[name](tiny, device)
    largest = max(batches)
    data = jpegs(largest * (2 if tiny else 8), size)  # the e2e run: several batches, so decoding overlaps
    images = decode(data[:largest])
    threshold = 0.0 if ours.family == "Florence-2" else 0.3
    for dtype in DTYPES:
        detector = ours if dtype == "float32" else with_dtype(ours, DTYPES[dtype])
        theirs = transformers_pipeline(detector.model) if transformers_pipeline else None
        for batch in batches:
            n = iters or (1 if tiny else 20 if batch == 1 else 6)
            row = {"family": name, "dtype": dtype, "batch": batch, "iters": n}
            row["detect_img_s"] = attempt(lambda: images_per_second(
                lambda: detector.detect(images[:batch], PHRASES, box_threshold=threshold, batch_size=batch),
                batch, n, 1, device))
            row["e2e_img_s"] = attempt(lambda: e2e_images_per_second(detector, data, batch, workers, threshold, device))
            row["decode_img_s"] = images_per_second(lambda: decode(data[:batch]), batch, n, 0, device)
            if theirs is not None:
                row["transformers_img_s"] = attempt(lambda: images_per_second(
                    lambda: theirs(images[:batch], threshold), batch, n, 1, device))
            report.row(row)


def attempt(function: Callable[[], float]) -> float | str:
    """`function()`, or the error's first line: in a one-shot GPU run one failure must not lose the rest."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


class Report:
    """Rows printed as they come; the JSON rewritten after each one, so a run cut short keeps its figures."""

    COLUMNS = ("family", "dtype", "batch", "detect_img_s", "e2e_img_s", "decode_img_s", "transformers_img_s")

    def __init__(self, path: str | None, header: dict):
        self.path, self.data = path, {**header, "results": []}
        print("  ".join(f"{c:>18}" for c in self.COLUMNS), flush=True)

    def row(self, row: dict) -> None:
        self.data["results"].append(row)
        cells = (f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "-"))[:18] for c in self.COLUMNS)
        print("  ".join(f"{c:>18}" for c in cells), flush=True)
        if self.path:
            write_json(self.path, self.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file for the figures (rewritten after every row)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and short runs (the default without CUDA)")
    parser.add_argument("--real", action="store_true", help="the released shapes even without CUDA (a check, slow)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, help="DataLoader workers decoding JPEGs in the e2e column "
                                                    "(default: 8 on CUDA, 0 on the CPU)")
    parser.add_argument("--iters", type=int, help="timed batches per setting (default: 20 at batch 1, 6 at batch 8)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny or (device.type != "cuda" and not args.real)
    batches = [int(b) for b in args.batches.split(",")]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "configs": "tiny test configs" if tiny else "released shapes, random weights",
              "phrases": PHRASES, "workers": workers}
    report = Report(args.out, header)
    for name in families:
        try:
            family_rows(name, tiny, device, batches, workers, args.iters, report)
        except Exception:  # noqa: BLE001 - a family that fails to build must not lose the others
            traceback.print_exc()
            report.row({"family": name, "error": traceback.format_exc().splitlines()[-1][:200]})


if __name__ == "__main__":
    main()
