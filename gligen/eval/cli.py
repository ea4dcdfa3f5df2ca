"""`gligen eval generate|score`: the GLIGEN paper's layout-to-image evaluation from the command line.

Layout filters of the literature (LostGAN, LAMA): `--min-area 0.02 --min-objects 3 --max-objects 8`.

    gligen eval generate --annotations instances_val2017.json --captions captions_val2017.json \\
        --model runwayml/stable-diffusion-v1-5 --adapter my_adapter --out run/
    gligen eval score --annotations run/layouts.jsonl --out run/score            # generated images
    gligen eval score --annotations run/layouts.jsonl --pose-model vitpose/ --out run/score  # + keypoint AP
    gligen eval score --annotations instances_val2017.json --images val2017 --real-images --out real/
    gligen eval score --annotations gt.json --detections dt.json --out scores/   # no model

COCO-MIG (MIG-Bench: 2-6 instances per layout, each in a colour; `gligen.eval.mig`):

    gligen eval generate --mig --annotations instances_val2014.json --model ... --out mig/   # or MIGC's .yaml
    gligen eval score --protocol mig --annotations mig/layouts.jsonl --segmenter facebook/sam-vit-huge --out mig/score

`accelerate launch -m gligen.cli eval generate ...` splits generation over processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detector.cli import DEFAULT_MODEL as DEFAULT_DETECTOR
from gligen.bundled import native_size
from gligen.commands import fraction, number, positive_int, seed
from gligen.devices import DTYPES, parse_dtype, suit_threads
from gligen.errors import UserError
from gligen.eval.annotations import EvalSet, Filters, load_eval_set
from gligen.files import Output
from gligen.layout import MAX_ENTITIES, MAX_SIDE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` with its subcommands `generate` and `score` to a `gligen` parser."""
    parser = subparsers.add_parser("eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="eval_command", metavar="COMMAND")

    generate = commands.add_parser("generate", help="one image per layout of an evaluation set (resumable)")
    _add_eval_set_arguments(generate)
    generate.add_argument("--model", required=True, help="diffusers SD or GLIGEN pipeline: directory or hub id")
    generate.add_argument("--adapter", help="grounding adapter directory (when --model is a plain SD pipeline)")
    generate.add_argument("--scheduler", help="ddim, euler_a, dpmpp, ... or a diffusers class (default: the model's)")
    generate.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    generate.add_argument("--guidance", type=number(float, 0), default=7.5,
                          help="classifier-free guidance scale (default 7.5)")
    schedule = generate.add_mutually_exclusive_group()
    schedule.add_argument("--beta", type=fraction, help="grounding for the first beta of the steps: beta,0,1-beta")
    schedule.add_argument("--schedule", help="scheduled sampling a,b,c (default: the model's; 0.3,0,0.7 for boxes)")
    generate.add_argument("--seed", type=seed, default=0, help="base seed; each image's seed comes from it and its id")
    generate.add_argument("--batch-size", type=positive_int, default=1)
    generate.add_argument("--size", type=number(int, 8, MAX_SIDE), default=None,
                          help="generated image width and height (default: the model's own, e.g. 64 for demo; "
                               "512 when it cannot be read)")
    _add_device_arguments(generate, cuda_dtype="fp16")
    mig = generate.add_argument_group("COCO-MIG layouts (gligen.eval.mig)")
    mig.add_argument("--mig", action="store_true",
                     help="MIG-Bench layouts: drawn from a COCO instances .json (2-6 instances, a colour each), "
                          "or read from MIGC's mig_bench_anno.yaml")
    mig.add_argument("--per-level", type=positive_int, default=160, help="layouts per level L2..L6 (default 160)")
    mig.add_argument("--mig-seed", type=seed, default=0, help="seed of the images and colours drawn (default 0)")
    generate.add_argument("--out", required=True, type=Output, help="folder for the images and layouts.jsonl")
    generate.set_defaults(func=_generate)

    score = commands.add_parser("score", help="detect the layout phrases, COCO/LVIS AP, success rate, reports")
    _add_eval_set_arguments(score)
    score.add_argument("--images", help="folder of the images to score (default: the folder of a layouts .jsonl)")
    score.add_argument("--real-images", action="store_true",
                       help="score the dataset's own images (each record's file_name under --images)")
    score.add_argument("--detections", help="COCO results JSON to score against --annotations, without a model")
    score.add_argument("--detector", default=DEFAULT_DETECTOR,
                       help=f"Grounding DINO directory or hub id (default {DEFAULT_DETECTOR})")
    score.add_argument("--protocol", choices=["ap", "mig"], default="ap",
                       help="ap: COCO/LVIS AP and layout checks (default); mig: COCO-MIG instance success rate and "
                            "mIoU per level L2..L6 (layouts of `eval generate --mig`)")
    score.add_argument("--box-threshold", type=fraction, default=None,
                       help="detections kept (default 0.05 for AP: low, for the whole precision-recall curve; "
                            "0.25 under --protocol mig, as MIG-Bench)")
    score.add_argument("--text-threshold", type=fraction, default=None, help="default 0.05; 0.25 under --protocol mig")
    score.add_argument("--color-fraction", type=fraction, default=None,
                       help="--protocol mig: the share of an instance's pixels that must be of its colour (default 0.2)")
    score.add_argument("--verify-threshold", type=fraction, default=None,
                       help="box threshold of the layout checks (default: the detector family's, as detector verify)")
    score.add_argument("--iou-threshold", type=number(float, 0, 1, low_open=True), default=0.5,
                       help="IoU for an entity to count as placed")
    score.add_argument("--batch-size", type=positive_int, default=4)
    score.add_argument("--samples", type=positive_int, default=16, help="images in the samples grid")
    score.add_argument("--fid-reference", help="folder of real images: adds FID (needs torch-fidelity)")
    score.add_argument("--inception-weights", help="torch-fidelity Inception weights file, for FID")
    score.add_argument("--clip-model", help="CLIP model directory: adds CLIP score")
    score.add_argument("--pose-model", help="VitPose directory (transformers VitPoseForPoseEstimation): adds the "
                       "keypoint AP of the layout persons' poses")
    score.add_argument("--condition-fidelity", action="store_true",
                       help="layouts with a 'condition' map: the same map made from each image, compared with it "
                            "(canny, hed: edge F1, depth: scale-invariant RMSE, normal: mean angle, sem: mIoU; the "
                            "map's network from --condition-model)")
    score.add_argument("--segmenter", help="--protocol mig: a transformers SAM (directory or hub id) for the "
                       "instances' pixels (default: the detected box)")
    from gligen.maps.cli import add_extractor_options

    add_extractor_options(score, "--condition-model")
    _add_device_arguments(score, cuda_dtype="fp32")  # AP: full precision; the detector is cheap
    score.add_argument("--out", required=True, type=Output, help="folder for the reports")
    score.set_defaults(func=_score)


def _add_eval_set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True,
                        help="COCO / LVIS instances .json, or a layouts .jsonl (e.g. the one `generate` writes)")
    parser.add_argument("--captions", help="COCO captions .json: each image's first caption is its prompt")
    parser.add_argument("--min-objects", type=positive_int, default=1,
                        help="skip images with fewer boxes, after filtering (default 1)")
    parser.add_argument("--max-objects", type=positive_int, help="skip images with more boxes (after filtering)")
    parser.add_argument("--min-area", type=number(float, 0, 1, high_open=True), default=0.0,
                        help="drop boxes under this fraction of the image")
    parser.add_argument("--keep-crowd", action="store_true", help="keep COCO crowd annotations as entities")
    parser.add_argument("--max-entities", type=positive_int, default=MAX_ENTITIES, help="keep the largest N boxes")
    parser.add_argument("--limit", type=positive_int, help="only the first N images")


def _add_device_arguments(parser: argparse.ArgumentParser, cuda_dtype: str) -> None:
    parser.add_argument("--device", help="torch device (default: this process's accelerate device)")
    parser.add_argument("--dtype", choices=list(DTYPES), help=f"default: {cuda_dtype} on CUDA, else fp32")
    parser.set_defaults(cuda_dtype=cuda_dtype)


def _eval_set(args: argparse.Namespace, size: int = 512) -> EvalSet:
    if args.max_objects is not None and args.max_objects < args.min_objects:
        raise UserError(f"filters: --max-objects {args.max_objects} is below --min-objects {args.min_objects}")
    filters = Filters(args.min_objects, args.max_objects, args.min_area, not args.keep_crowd, args.max_entities)
    return load_eval_set(args.annotations, args.captions, filters, size, args.limit)


def _mig_set(args: argparse.Namespace, size: int = 512) -> EvalSet:
    """MIG layouts: drawn from COCO (`eval generate --mig`), or read from MIGC's .yaml or a layouts .jsonl."""
    from gligen.eval.mig import Sampling, load_mig_set

    if args.captions:
        raise UserError("--captions: MIG prompts are made from the instances ('a photo of a red car and ...')")
    sampling = Sampling(args.per_level, args.mig_seed) if args.eval_command == "generate" else None
    filters = Filters(args.min_objects, args.max_objects, args.min_area, not args.keep_crowd, args.max_entities)
    return load_mig_set(args.annotations, filters, size, args.limit, sampling)


def _device(args: argparse.Namespace) -> str:
    from gligen.eval.generate import process_state

    state = process_state(args.device)  # joins the other launched processes, whatever the device
    return args.device or str(state.device)


def _dtype(args: argparse.Namespace):
    return parse_dtype(args.dtype or (args.cuda_dtype if _device(args).startswith("cuda") else "fp32"))


def _generate(args: argparse.Namespace) -> None:
    from gligen.eval.generate import generate

    args.size = args.size or native_size(args.model) or 512
    if args.size % 8:
        raise UserError(f"--size must be a multiple of 8, got {args.size}")
    eval_set = _mig_set(args, args.size) if args.mig else _eval_set(args, args.size)  # fails before the model loads
    from gligen.pipeline import GligenPipeline
    from gligen.schedule import parse_schedule, schedule_from_beta

    if args.beta is not None:
        schedule = schedule_from_beta(args.beta)
    else:  # None: the pipeline's default, that of its map condition if it has one
        schedule = parse_schedule(args.schedule) if args.schedule else None
    pipeline = GligenPipeline.from_pretrained(args.model, adapter=args.adapter, device=_device(args),
                                              dtype=_dtype(args), scheduler=args.scheduler)
    suit_threads(pipeline.unet, pipeline.device)
    generate(pipeline, eval_set.records, args.out, base_seed=args.seed, batch_size=args.batch_size,
             num_inference_steps=args.steps, guidance_scale=args.guidance, schedule=schedule)


def _score(args: argparse.Namespace) -> None:
    from gligen.eval import score
    from gligen.eval.pose import PoseEstimator, persons

    if args.protocol == "mig":
        _score_mig(args)
        return
    if args.color_fraction is not None:
        raise UserError("--color-fraction belongs to --protocol mig")
    if args.detections:
        if args.real_images or args.images:
            raise UserError("--detections scores a results file alone; drop --images / --real-images")
        score.score_files(args.annotations, args.detections, args.out)
        return
    eval_set = _eval_set(args)
    images = _images_dir(args)
    settings = score.ScoreSettings(**_thresholds(args), verify_threshold=args.verify_threshold,
                                   iou_threshold=args.iou_threshold, batch_size=args.batch_size,
                                   num_samples=args.samples)
    if args.pose_model and not any(persons(record) for record in eval_set.records):
        raise UserError(f"--pose-model: no layout of {args.annotations} has an entity with keypoints to score")
    extra = _quality_metrics(args, eval_set, images)
    from detector.detect import OpenSetDetector

    pose_estimator = None
    if args.pose_model:
        pose_estimator = PoseEstimator.from_pretrained(args.pose_model, device=_device(args), dtype=_dtype(args))
    boxed = any(record.layout.entities for record in eval_set.records)  # map-only sets have no box to detect
    detector = OpenSetDetector.from_pretrained(args.detector, device=_device(args), dtype=_dtype(args)) if boxed \
        else None
    score.score_images(detector, eval_set, images, args.out, args.real_images, settings, extra, pose_estimator)


def _score_mig(args: argparse.Namespace) -> None:
    from gligen.eval import mig

    for flag in ("detections", "verify_threshold", "pose_model", "condition_fidelity"):
        if getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} belongs to --protocol ap; --protocol mig does not use it")
    eval_set = _mig_set(args)
    images = _images_dir(args)
    color_fraction = mig.DEFAULT_COLOR_FRACTION if args.color_fraction is None else args.color_fraction
    settings = mig.MigSettings(**_thresholds(args), iou_threshold=args.iou_threshold, color_fraction=color_fraction,
                               batch_size=args.batch_size, num_samples=args.samples)
    extra = _quality_metrics(args, eval_set, images)
    from detector.detect import OpenSetDetector

    detector = OpenSetDetector.from_pretrained(args.detector, device=_device(args), dtype=_dtype(args))
    segmenter = None
    if args.segmenter:
        from detector.segment import Segmenter

        segmenter = Segmenter.from_pretrained(args.segmenter, device=_device(args), dtype=_dtype(args))
    mig.score_mig(detector, eval_set, images, args.out, args.real_images, settings, segmenter, extra)


def _images_dir(args: argparse.Namespace) -> str | Path:
    """--images, or the folder of a layouts .jsonl (where `eval generate` writes the images beside it)."""
    images = args.images or (Path(args.annotations).parent if args.annotations.endswith(".jsonl") else None)
    if images is None:
        raise UserError(f"{args.annotations}: give --images, the folder of the images to score")
    return images


def _thresholds(args: argparse.Namespace) -> dict[str, float]:
    """The detection thresholds given on the command line (the protocol's defaults for the others)."""
    return {k: v for k, v in (("box_threshold", args.box_threshold), ("text_threshold", args.text_threshold))
            if v is not None}


def _quality_metrics(args: argparse.Namespace, eval_set: EvalSet, images: str | Path) -> dict[str, float]:
    """FID, CLIP score and condition fidelity, when their inputs are given."""
    from gligen.eval import fid
    from gligen.eval.score import find_images

    metrics = {}
    if args.fid_reference:
        if not args.inception_weights:
            raise UserError("--fid-reference needs --inception-weights (a local Inception weights file)")
        metrics["FID"] = fid.fid(images, args.fid_reference, args.inception_weights, _device(args))
    if args.clip_model:
        present, _ = find_images(eval_set.records, images, args.real_images)
        metrics["CLIP score"] = fid.clip_score([path for _, path in present],
                                               [record.layout.prompt for record, _ in present],
                                               args.clip_model, _device(args))
    if args.condition_fidelity:
        from gligen.maps.cli import fidelity_metrics

        metrics.update(fidelity_metrics(find_images(eval_set.records, images, args.real_images)[0], args))
    return metrics
