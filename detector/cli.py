"""`detector` command line: detect phrases in images, convert official checkpoints.

    detector detect IMAGE... --phrases "a cat" "a dog" [--model M] [--out result.json] [--overlay DIR]
    detector detect IMAGE... --exemplar REF.jpg:x0,y0,x1,y1 [--exemplar ...] --model OWLV2
    detector detect DIR_OR_SHARDS --phrases ... --out DIR     (accelerate launch: split across processes)
    detector segment IMAGE... --phrases "a cat" --out DIR [--segmenter facebook/sam-vit-base]
    detector convert groundingdino_swint_ogc.pth --out grounding-dino-tiny/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from gligen.commands import Command, fraction, number, positive_int, run_commands
from gligen.devices import DTYPES, parse_device, parse_dtype
from gligen.draw import PALETTE, draw_boxes, draw_masks
from gligen.errors import require
from gligen.files import Output, OutputFile, save_image, write_json

DEFAULT_MODEL = "IDEA-Research/grounding-dino-tiny"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype: shared by every subcommand that runs the detector."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="detector directory or hub id: Grounding DINO, MM-Grounding-DINO, OWLv2 or Florence-2")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))


class OutputFileOrDirectory(OutputFile):
    """`detector detect --out`: a JSON file for image files, a directory for a directory or shards of images."""

    @property
    def is_dir(self) -> bool:  # an existing directory is checked as one (a labelling run resumes into it)
        return Path(self).is_dir()


def add_output_args(parser: argparse.ArgumentParser, what: str, out_type: type = OutputFile) -> None:
    """--out (a JSON file) and --overlay (a directory of PNGs): shared by detect, verify and label."""
    parser.add_argument("--out", type=out_type, help=f"write {what} as JSON here (default: print it)")
    parser.add_argument("--overlay", type=Output, help="write one PNG per image with the boxes into this directory")


def add_threshold_args(parser: argparse.ArgumentParser) -> None:
    """--box-threshold, --text-threshold: the detector family's defaults unless given."""
    parser.add_argument("--box-threshold", type=fraction,
                        help="detection score threshold (default: the family's, 0.35 Grounding DINO, 0.1 OWLv2)")
    parser.add_argument("--text-threshold", type=fraction, help="phrase token threshold, Grounding DINO (default 0.25)")


def load_from_args(args: argparse.Namespace):
    """The `OpenSetDetector` that --model/--device/--dtype name."""
    from detector.detect import OpenSetDetector

    return OpenSetDetector.from_pretrained(args.model, device=parse_device(args.device), dtype=parse_dtype(args.dtype))


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """One output name per image: its stem, made unique by its position when stems repeat."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]


def _overlay_names(paths: Sequence[str]) -> list[str]:
    """One overlay PNG name per image."""
    return [f"{stem}.png" for stem in _unique_stems(paths)]


def write_outputs(report: dict, out: str | None, overlay_dir: str | None, paths: Sequence[str], pictures) -> None:
    """Write the JSON report to `out` (or print it); with `overlay_dir`, one PNG per image path.

    `pictures` is an iterable of overlay images, one per path, drawn only when needed.
    """
    if out:
        write_json(out, report)
    else:
        print(json.dumps(report, indent=2))
    if overlay_dir:
        for name, picture in zip(_overlay_names(paths), pictures):
            save_image(Path(overlay_dir) / name, picture)


def run_detect(args: argparse.Namespace) -> None:
    from detector.detect_many import is_collection
    from detector.exemplars import parse_exemplar
    from gligen.files import open_image

    require(args.phrases is None or len(args.phrases) > 0, "--phrases is empty: give at least one phrase to detect")
    require(bool(args.phrases or args.exemplar), "give --phrases, --exemplar or both: nothing to detect")
    exemplars = [parse_exemplar(spec) for spec in args.exemplar]
    if is_collection(args.images):
        return run_detect_collection(args, exemplars)
    images = [open_image(path) for path in args.images]
    detector = load_from_args(args)
    results = detector.detect(
        images, args.phrases, exemplars, box_threshold=args.box_threshold, text_threshold=args.text_threshold,
        phrase_score=args.phrase_score, nms_iou=args.nms_iou, batch_size=args.batch_size,
    )
    report = {"model": args.model, "images": [{"image": p, **r.to_dict()} for p, r in zip(args.images, results)]}
    pictures = (
        draw_boxes(image, result.boxes.tolist(), [f"{lab} {sc:.2f}" for lab, sc in zip(result.labels, result.scores.tolist())])
        for image, result in zip(images, results)
    )
    write_outputs(report, args.out, args.overlay, args.images, pictures)


def run_detect_collection(args: argparse.Namespace, exemplars) -> None:
    """`detector detect DIR|SHARDS --out DIR`: one JSONL per input shard, across launched processes."""
    from detector.detect import OpenSetDetector
    from detector.detect_many import collection_shards, detect_shards
    from gligen.eval.generate import process_state

    require(bool(args.out), f"{args.images[0]}: a directory or shards need --out DIR for the detections")
    require(not args.overlay, "--overlay takes image files, not a directory or shards")
    shards = collection_shards(args.images[0], args.images_per_shard)
    state = process_state(args.device)
    device = state.device if args.device in (None, "cuda") else parse_device(args.device)
    detector = OpenSetDetector.from_pretrained(args.model, device=device, dtype=parse_dtype(args.dtype))
    options = {"source": args.images[0], "model": args.model, "phrases": args.phrases, "exemplars": args.exemplar,
               "box_threshold": args.box_threshold, "text_threshold": args.text_threshold,
               "phrase_score": args.phrase_score, "nms_iou": args.nms_iou, "images_per_shard": args.images_per_shard}
    detect_shards(detector, shards, args.out, options, args.phrases, exemplars, args.batch_size, args.workers, state,
                  box_threshold=args.box_threshold, text_threshold=args.text_threshold,
                  phrase_score=args.phrase_score, nms_iou=args.nms_iou)


def register_detect(subparsers) -> None:
    p = subparsers.add_parser("detect")
    p.add_argument("images", nargs="+", help="image files, or one directory of images or webdataset shards "
                                             "(with --out DIR; under accelerate launch, split across processes)")
    p.add_argument("--phrases", nargs="*", help="phrases to detect (each one argument)")
    p.add_argument("--exemplar", action="append", default=[], metavar="[LABEL=]REF.jpg[:x0,y0,x1,y1]",
                   help="find what this box of a reference image shows (pixels, or normalized in [0, 1]; "
                        "no box: the reference's most object-like region); repeat it, exemplars of one label "
                        "are averaged into one query (OWLv2)")
    add_model_args(p)
    add_output_args(p, "the detections (a directory for a directory or shards)", OutputFileOrDirectory)
    add_threshold_args(p)
    p.add_argument("--phrase-score", choices=["max", "mean"], default="max")
    p.add_argument("--nms-iou", type=number(float, high=1), default=0.5,
                   help="per-phrase NMS IoU; a negative value turns NMS off")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--images-per-shard", type=positive_int, default=1000,
                   help="a directory of images: files per output shard")
    p.add_argument("--workers", type=number(int, 0), default=4,
                   help="a directory or shards: DataLoader workers decoding images")
    p.set_defaults(func=_detect_command)


def _detect_command(args: argparse.Namespace) -> None:
    if args.nms_iou is not None and args.nms_iou < 0:
        args.nms_iou = None
    run_detect(args)


def run_segment(args: argparse.Namespace) -> None:
    """`detector segment`: per image NAME.json (detections, RLE masks), NAME.K.png (mask K), NAME.overlay.png."""
    from tqdm import tqdm

    from detector.segment import Segmenter
    from gligen.errors import progress
    from gligen.files import open_image

    for k, phrase in enumerate(args.phrases):  # before anything loads
        require(bool(phrase.strip()), f"--phrases: phrase {k} is empty")
    images = [open_image(path) for path in args.images]
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    segmenter = Segmenter.from_pretrained(args.segmenter, device, dtype) if args.segmenter else None
    detector = load_from_args(args)
    if segmenter is None:
        print("note: no --segmenter: the masks are the detected boxes (SAM masks: e.g. --segmenter "
              "facebook/sam-vit-base)", file=sys.stderr)
    names = _unique_stems(args.images)
    done = 0
    with progress(lambda: f"{done} of {len(images)} images written to {args.out}"), \
            tqdm(total=len(images), desc="segmenting", unit="image") as bar:
        for start in range(0, len(images), args.batch_size):
            batch = images[start:start + args.batch_size]
            results = detector.segment(batch, args.phrases, segmenter, box_threshold=args.box_threshold,
                                       text_threshold=args.text_threshold, batch_size=args.batch_size)
            for i, (image, result) in enumerate(zip(batch, results), start):
                record = {"image": args.images[i], "model": args.model, "segmenter": args.segmenter or "boxes"}
                write_segmentation(Path(args.out), names[i], image, result, record)
                done += 1
                bar.update()


def write_segmentation(directory: Path, name: str, image, result, record: dict) -> None:
    """NAME.K.png (255 inside detection K's mask), NAME.overlay.png, then NAME.json (`record` + detections).

    The JSON of an earlier run goes first and the new one is written last, so that a JSON only
    exists beside its complete set of pictures; mask PNGs of an earlier run with more detections
    are removed.
    """
    from PIL import Image

    (directory / f"{name}.json").unlink(missing_ok=True)
    masks = result.masks.numpy()
    for k, mask in enumerate(masks):
        save_image(directory / f"{name}.{k}.png", Image.fromarray(mask.astype("uint8") * 255))
    stale = len(masks)
    while (directory / f"{name}.{stale}.png").is_file():
        (directory / f"{name}.{stale}.png").unlink()
        stale += 1
    colors = [PALETTE[p % len(PALETTE)] for p in result.phrase_ids.tolist()]
    labels = [f"{label} {score:.2f}" for label, score in zip(result.labels, result.scores.tolist())]
    save_image(directory / f"{name}.overlay.png",
               draw_boxes(draw_masks(image, masks, colors), result.boxes.tolist(), labels, colors=colors))
    report = {**record, **result.to_dict()}
    for k, detection in enumerate(report["detections"]):
        detection["mask_file"] = f"{name}.{k}.png"
    write_json(directory / f"{name}.json", report)


def register_segment(subparsers) -> None:
    p = subparsers.add_parser("segment")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--phrases", nargs="+", required=True, help="phrases to segment (each one argument)")
    p.add_argument("--out", required=True, type=Output,
                   help="directory for NAME.json, NAME.K.png (one mask per detection) and NAME.overlay.png")
    p.add_argument("--segmenter", help="SAM or SAM 2 directory or hub id, e.g. facebook/sam-vit-base "
                                       "(default: none, the detected boxes are the masks)")
    add_model_args(p)
    add_threshold_args(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.set_defaults(func=run_segment)


def run_convert(args: argparse.Namespace) -> None:
    from detector.model import convert_official

    out = convert_official(args.src, args.out, config=args.config, tokenizer=args.tokenizer,
                           trust_pickle=args.trust_pickle)
    print(f"wrote {out}")


def register_convert(subparsers) -> None:
    p = subparsers.add_parser("convert")
    p.add_argument("src", help="official checkpoint, e.g. groundingdino_swint_ogc.pth")
    p.add_argument("--out", required=True, type=Output, help="new directory for the HF checkpoint")
    p.add_argument("--config", help="config.json or HF directory (default: the matching official release)")
    p.add_argument("--tokenizer", default="bert-base-uncased", help="BERT tokenizer directory or hub id")
    p.add_argument("--trust-pickle", action="store_true", help="let the checkpoint's pickle run code: only for "
                   "files that cannot be read otherwise, and only if you trust them")
    p.set_defaults(func=run_convert)


COMMANDS = [
    Command("detect", "detect phrases in images; JSON out, optional overlays", "detector.cli:register_detect"),
    Command("segment", "detect phrases and mask them (SAM); masks as PNG and COCO RLE", "detector.cli:register_segment"),
    Command("verify", "check images against their layouts (IoU per entity)", "detector.verify:register"),
    Command("label", "layout of an image from its caption's noun phrases", "detector.label:register"),
    Command("train", "fine-tune a detector on COCO-format data", "detector.train:register"),
    Command("convert", "official GroundingDINO .pth -> HF checkpoint directory", "detector.cli:register_convert"),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_commands("detector", "Open-set detection (Grounding DINO, OWLv2, Florence-2).", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
