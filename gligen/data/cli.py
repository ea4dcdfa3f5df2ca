"""`gligen data`: make training shards (and synthetic evaluation data).

    gligen data from-coco INSTANCES.json IMAGES_DIR [--captions CAPTIONS.json] --out DIR
    gligen data from-coco --keypoints PERSON_KEYPOINTS.json IMAGES_DIR [--captions CAPTIONS.json] --out DIR
    gligen data from-grounding ANNOTATIONS.json IMAGES_DIR --out DIR
    gligen data pseudo-label SOURCE [--captions FILE] --model DETECTOR --out DIR
    gligen data shapes --n N [--size 64] [--seed S] [--format shards|coco|layouts] --out DIR

Shard commands take --condition canny|depth|normal to add each image's map (KEY.canny.png ...).

Every command resumes an interrupted run when given the same arguments again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gligen.commands import fraction, number, positive_int, seed
from gligen.errors import UserError
from gligen.files import Output


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its subcommands to a parent CLI's subparsers."""
    data = subparsers.add_parser("data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    coco = commands.add_parser("from-coco", help="COCO detection (+ captions, + person keypoints) data to shards")
    coco.add_argument("instances", nargs="?",
                      help="COCO instances JSON (e.g. instances_train2017.json); optional with --keypoints")
    coco.add_argument("images", help="directory of the images named in it")
    coco.add_argument("--captions", help="COCO captions JSON; without it captions are empty, as in GLIGEN")
    coco.add_argument("--all-captions", action="store_true",
                      help="one sample per caption (default: one per image, with its first caption)")
    coco.add_argument("--keypoints", help="COCO person keypoints JSON (person_keypoints_train2017.json): persons "
                      "carry their 17 keypoints; alone, its persons are the entities")
    coco.add_argument("--min-keypoints", type=positive_int, default=1,
                      help="persons need at least this many given keypoints to carry them (default 1)")
    _shard_options(coco)
    coco.set_defaults(func=_from_coco)

    grounding = commands.add_parser("from-grounding", help="MDETR-style grounding data (Flickr30k, GoldG) to shards")
    grounding.add_argument("annotations",
                           help="MDETR annotation JSON (images with 'caption', boxes with 'tokens_positive')")
    grounding.add_argument("images", help="directory of the images named in it")
    _shard_options(grounding)
    grounding.set_defaults(func=_from_grounding)

    pseudo = commands.add_parser("pseudo-label", help="label image-caption pairs with the detector "
                                                      "(under accelerate launch: split across processes)")
    pseudo.add_argument("source", help="a directory of images (with --captions) or webdataset shards of jpg+txt")
    pseudo.add_argument("--captions", help=".jsonl ({'image', 'caption'} per line) or .tsv (path<TAB>caption)")
    pseudo.add_argument("--model", required=True, help="detector: a local directory or a hub id")
    pseudo.add_argument("--device", help="cuda, cpu, ... (default: cuda when available; launched processes "
                                         "take one GPU each, or join over gloo with cpu)")
    pseudo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    pseudo.add_argument("--box-threshold", type=fraction, help="detection score threshold (detector default if unset)")
    pseudo.add_argument("--text-threshold", type=fraction, help="phrase token threshold (detector default if unset)")
    pseudo.add_argument("--batch-size", type=positive_int, default=8, help="images per detector call")
    pseudo.add_argument("--workers", type=number(int, 0), default=4, help="DataLoader workers decoding images (0: none)")
    _shard_options(pseudo)
    pseudo.set_defaults(func=_pseudo_label)

    shapes = commands.add_parser("shapes", help="synthetic coloured shapes with tight boxes")
    shapes.add_argument("--n", type=positive_int, required=True, help="number of images (or layouts)")
    shapes.add_argument("--size", type=positive_int, default=64, help="image side in pixels (a multiple of 8)")
    shapes.add_argument("--seed", type=seed, default=0, help="data set seed; use another one for held-out data")
    shapes.add_argument("--format", default="shards", choices=["shards", "coco", "layouts"],
                        help="shards: training shards; coco: images + instances.json + captions.json; "
                             "layouts: layouts.jsonl only")
    shapes.add_argument("--out", required=True, type=Output, help="output directory")
    shapes.add_argument("--samples-per-shard", type=positive_int, default=1000)
    _condition_options(shapes)
    shapes.set_defaults(func=_shapes)


def _shard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Output, help="output directory of shard-000000.tar ...")
    parser.add_argument("--samples-per-shard", type=positive_int, default=1000)
    parser.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"],
                        help="how images are stored in the shards")
    _condition_options(parser)


def _condition_options(parser: argparse.ArgumentParser) -> None:
    from gligen.maps import CONDITION_TYPES
    from gligen.maps.cli import add_extractor_options

    parser.add_argument("--condition", choices=CONDITION_TYPES,
                        help="add each image's map, made at write time, as KEY.<type>.png (map adapters' training)")
    add_extractor_options(parser, "--condition-model")


def _extractor(args: argparse.Namespace):
    from gligen.maps.cli import extractor

    return extractor(args.condition, args) if args.condition else None


def _from_coco(args: argparse.Namespace) -> None:
    from gligen.data.coco import write_coco_shards

    if args.instances is None and args.keypoints is None:
        raise UserError("from-coco needs an instances JSON, a --keypoints JSON, or both")
    write_coco_shards(args.instances, _directory(args.images), args.out, args.captions, args.all_captions,
                      args.samples_per_shard, args.image_format, args.keypoints, args.min_keypoints,
                      _extractor(args))


def _from_grounding(args: argparse.Namespace) -> None:
    from gligen.data.grounding import write_grounding_shards

    write_grounding_shards(args.annotations, _directory(args.images), args.out,
                           args.samples_per_shard, args.image_format, _extractor(args))


def _pseudo_label(args: argparse.Namespace) -> None:
    import functools

    import torch

    from detector import OpenSetDetector
    from detector.label import label_batch
    from gligen.data.pseudo_label import pair_shards, write_pseudo_label_shards
    from gligen.devices import parse_device
    from gligen.eval.generate import process_state

    shards = pair_shards(args.source, args.captions, args.samples_per_shard)
    state = process_state(args.device)
    device = state.device if args.device in (None, "cuda") else parse_device(args.device)
    thresholds = {k: v for k, v in (("box_threshold", args.box_threshold), ("text_threshold", args.text_threshold))
                  if v is not None}
    detector = OpenSetDetector.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype))
    options = {"source": args.source, "captions": args.captions, "model": args.model,
               "samples_per_shard": args.samples_per_shard, **thresholds}
    write_pseudo_label_shards(shards, functools.partial(label_batch, detector, **thresholds), args.out, options,
                              args.image_format, args.batch_size, args.workers, state, _extractor(args))


def _shapes(args: argparse.Namespace) -> None:
    from gligen.data import shapes

    if args.format == "shards":
        shapes.write_shards(args.out, args.n, args.size, args.seed, args.samples_per_shard, _extractor(args))
    elif args.format == "coco":
        shapes.write_coco(args.out, args.n, args.size, args.seed)
    else:
        shapes.write_layouts(args.out, args.n, args.size, args.seed)


def _directory(path: str) -> str:
    if not Path(path).is_dir():
        raise UserError(f"{path}: images directory not found")
    return path
