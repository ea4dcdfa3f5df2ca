"""`gligen generate`: images from box layouts.

    gligen generate --model M [--adapter A] --layout layouts.jsonl --out DIR [--overlay] [--verify]
    gligen generate --model M --layout-from photo.jpg [--caption "a cat on a sofa"] --out DIR
    gligen generate --model M --layout layouts.jsonl --out DIR --repair 3 [--repair-model M2]

Layout NAME (its "name" key, else the layout file's stem, numbered when the file holds several)
gives DIR/NAME.png, DIR/NAME.overlay.png (--overlay) and DIR/NAME.json: the layout as generated,
its seed, the model, the adapter and the settings (and with --verify or --best-of the per-entity
verification by the detector; with --repair the rounds of `gligen.repair`). Every layout is
validated before anything is generated; layouts already done (NAME.png and NAME.json exist) are
skipped, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from tqdm.auto import tqdm

from gligen.bundled import DEMO
from gligen.commands import fraction, number, positive_int, seed
from gligen.devices import DTYPES, parse_device, parse_dtype, suit_threads
from gligen.draw import draw_layout
from gligen.errors import UserError, progress, require
from gligen.files import Output, open_image, save_image, write_json
from gligen.layout import MAX_ENTITIES, MAX_SIDE, SEED_MAX, Entity, Layout, load_layouts
from gligen.masks import DEFAULT_FEATHER, read_mask
from gligen.schedule import parse_schedule, schedule_from_beta

# Nothing here imports torch, diffusers or transformers at module level: the layouts are read and
# checked first, so that a mistake in them is reported in well under a second.

_NAME = re.compile(r"^[\w.-]+$")


@dataclass
class Job:
    """One layout to generate and the file stem its outputs take."""

    name: str
    layout: Layout


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers SD or GLIGEN pipeline directory or hub id")
    parser.add_argument("--adapter", help="adapter directory (adapter.safetensors + adapter_config.json) or hub id")
    parser.add_argument("--adapter-revision", help="with a hub --adapter: its branch, tag or commit")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--layout", help="layout file: .json (one layout or a list) or .jsonl")
    source.add_argument("--layout-from", metavar="IMAGE", help="take the layout of this image (detector)")
    parser.add_argument("--caption", help="with --layout-from: the caption whose noun phrases are located")
    parser.add_argument("--phrases", nargs="+", help="with --layout-from: the phrases to locate")
    parser.add_argument("--vocabulary", help="with --layout-from and no caption or phrases: names to look for, "
                                             "lvis, coco or a file (default: a captioning detector's own, else lvis)")
    parser.add_argument("--out", required=True, type=Output, help="output directory")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=number(float, 0), default=7.5,
                        help="classifier-free guidance scale (default 7.5)")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--beta", type=fraction, help="grounding for the first beta of the steps (beta,0,1-beta)")
    schedule.add_argument("--schedule", help="scheduled sampling a,b,c (default: the adapter's own, else 0.3,0,0.7 for boxes, "
                          "0.9,0,0.1 for canny and HED maps, 0.7,0,0.3 for depth, normal and semantic maps)")
    parser.add_argument("--seed", type=seed, help="seed for every layout (default: each layout's own)")
    parser.add_argument("--scheduler", help="ddim, pndm, euler, euler_a, dpmpp, lms, unipc, ... (default: the model's)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on CUDA, else fp32")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="layouts per batch (default 1)")
    parser.add_argument("--overlay", action="store_true", help="also write NAME.overlay.png with the labelled boxes")
    parser.add_argument("--max-entities", type=positive_int, default=MAX_ENTITIES,
                        help=f"keep at most this many entities, the largest (default {MAX_ENTITIES})")
    parser.add_argument("--max-side", type=positive_int, default=MAX_SIDE,
                        help=f"refuse layouts wider or taller than this many pixels (default {MAX_SIDE})")
    parser.add_argument("--image-encoder", help="CLIP vision directory or hub id for reference images")
    parser.add_argument("--inpaint-image", help="image to repaint inside the boxes (an inpainting model also "
                        "sees the masked image; any other repaints by latent blending)")
    parser.add_argument("--inpaint-mask", metavar="FILE", help="with --inpaint-image: repaint where this mask image "
                        "is light instead of inside the entities' masks and boxes")
    parser.add_argument("--keep-outside", action="store_true", help="with --inpaint-image: keep every pixel outside "
                        "the repainted region (grown by --feather) exactly as in the input")
    parser.add_argument("--feather", type=number(int, 0), default=DEFAULT_FEATHER,
                        help=f"with --keep-outside: pixels of ramp around the region (default {DEFAULT_FEATHER})")
    parser.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet with its fusers (CUDA graphs "
                        "on CUDA, channels-last, fused QKV): slower first batch, faster after")
    parser.add_argument("--verify", action="store_true", help="check each image against its layout with the detector")
    parser.add_argument("--best-of", type=positive_int, default=1, metavar="N",
                        help="generate N candidates per layout (seeds seed..seed+N-1), keep the best verified one")
    parser.add_argument("--repair", type=number(int, 0), default=0, metavar="N",
                        help="after generating (and --best-of's choice), repaint the boxes of the entities the detector "
                        "does not find (the rest kept as with --keep-outside), verify again, up to N rounds; keep the "
                        "best-verified image")
    parser.add_argument("--repair-model", metavar="M", help="with --repair: the model that repaints (a base's "
                        "inpainting variant, given the adapter, or a GLIGEN inpainting pipeline; default: --model)")
    parser.add_argument("--detector", help="detector directory or hub id (Grounding DINO, OWLv2, Florence-2) for "
                        "--verify/--best-of/--repair/--layout-from (default: the bundled one with --model demo, "
                        "else Grounding DINO-T)")
    parser.add_argument("--iou-threshold", type=number(float, 0, 1, low_open=True), default=0.5,
                        help="IoU for an entity to pass verification")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    _schedule(args)  # checked before anything loads
    _check_numbers(args)
    jobs = None if args.layout_from else _jobs(args.layout, args.max_side)  # before torch is even imported
    if jobs is not None:
        for job in jobs:
            _check_seeds(_prepared(job.layout, args), args, job.name)
    inpaint_image = open_image(args.inpaint_image) if args.inpaint_image else None
    inpaint_mask = read_mask(args.inpaint_mask) if args.inpaint_mask else None
    from gligen.maps.encode import read_map
    from gligen.pipeline import GligenPipeline

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype or ("fp16" if device.type == "cuda" else "fp32"))
    detector_name = _detector_name(args)
    detector = _detector(args, detector_name, device) if detector_name else None
    if jobs is None:
        jobs = _layout_from_image(args, detector)
    jobs = [Job(job.name, _prepared(job.layout, args)) for job in jobs]
    for job in jobs:  # every image readable before the model loads
        styles = [job.layout.style] if job.layout.style else []
        for path in [e.image for e in job.layout.entities if e.image] + styles:
            open_image(path)
        if job.layout.condition is not None:
            read_map(job.layout.condition.image, job.layout.condition.type)
    out = Path(args.out)
    todo = [job for job in jobs if not ((out / f"{job.name}.png").is_file() and (out / f"{job.name}.json").is_file())]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} layouts already done in {out}; skipping them", file=sys.stderr)
    if not todo:
        return

    pipeline = GligenPipeline.from_pretrained(
        args.model, args.adapter, device=device, dtype=dtype, scheduler=args.scheduler,
        image_encoder=args.image_encoder, attention=args.attention, adapter_revision=args.adapter_revision,
    )
    suit_threads(pipeline.unet, device)
    pipeline.validate([job.layout for job in todo], inpainting=inpaint_image is not None)
    painter = _repair_model(args, pipeline, device, dtype) if args.repair_model else pipeline
    if args.repair:
        painter.validate([job.layout for job in todo], inpainting=True)
    if args.compile:
        pipeline.compile()
        if painter is not pipeline:
            painter.compile()
    generate_jobs(pipeline, todo, args, out, detector, detector_name, inpaint_image, already_done=len(jobs) - len(todo),
                  inpaint_mask=inpaint_mask, painter=painter)


def generate_jobs(pipeline, jobs: Sequence[Job], args: argparse.Namespace, out: Path, detector=None,
                  detector_name: str | None = None, inpaint_image: Image.Image | None = None,
                  step_bar: bool = False, already_done: int = 0, inpaint_mask=None, painter=None) -> list[Candidate]:
    """Generate prepared `jobs` with a loaded pipeline (and detector) as `args` say; write their files into `out`.

    `args` holds this command's options (its parser's defaults for those not given); `step_bar`
    adds a bar over the denoising steps of each batch; `already_done` layouts of the same run
    (skipped as written) count in what an interrupt reports; `inpaint_mask` (an (H, W) bool array) replaces the
    entities' masks as the region to repaint; `painter` repaints with --repair (default: `pipeline`). Returns the
    candidate kept for each job.
    """
    schedule = _schedule(args) or pipeline.default_schedule
    settings = {
        "steps": args.steps, "guidance": args.guidance, "schedule": list(schedule),
        "scheduler": type(pipeline.scheduler).__name__, "dtype": str(pipeline.dtype).removeprefix("torch."),
        "device": str(pipeline.device), "max_entities": args.max_entities, "image_encoder": args.image_encoder,
        "inpaint_image": args.inpaint_image, "inpaint_mask": args.inpaint_mask, "keep_outside": args.keep_outside,
        "feather": args.feather if args.keep_outside or args.repair else None, "attention": args.attention, "best_of": args.best_of,
        "detector": detector_name, "iou_threshold": args.iou_threshold if detector_name else None,
        "repair": args.repair, "repair_model": args.repair_model,
    }
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, schedule=schedule,
                inpaint_image=inpaint_image, inpaint_mask=inpaint_mask, keep_outside=args.keep_outside,
                feather=args.feather, max_entities=args.max_entities, progress=step_bar)
    kept = {}
    done, total = already_done, already_done + len(jobs)
    finished = lambda: f"{done} of {total} layouts written to {out}"  # noqa: E731
    with progress(finished), tqdm(total=len(jobs), desc="generate", unit="image") as bar:
        for batch in _batches(jobs, args.batch_size):
            layouts = [job.layout for job in batch]
            drawn = [_candidates(pipeline, layouts, k, call, detector, args) for k in range(args.best_of)]
            candidates = [[round_[i] for round_ in drawn] for i in range(len(batch))]
            repairs = [None] * len(batch)
            if args.repair:
                from gligen.repair import repair

                repairs = repair(painter or pipeline, detector, [c[best(c)] for c in candidates], args.repair, call,
                                 args.iou_threshold)
            for job, job_candidates, repaired in zip(batch, candidates, repairs):
                kept[job.name] = _write(out, job, job_candidates, args, settings, repaired)
                done += 1
            bar.update(len(batch))
    return [kept[job.name] for job in jobs]


# --- inputs ---


def _schedule(args: argparse.Namespace):
    """--beta or --schedule; None: the model's default (`GligenPipeline.default_schedule`)."""
    if args.beta is not None:
        return schedule_from_beta(args.beta)
    return parse_schedule(args.schedule) if args.schedule else None


def _check_numbers(args: argparse.Namespace) -> None:
    require(not (args.caption or args.phrases or args.vocabulary) or args.layout_from,
            "--caption, --phrases and --vocabulary go with --layout-from")
    require(sum(map(bool, (args.caption, args.phrases, args.vocabulary))) <= 1,
            "--layout-from takes one of --caption, --phrases and --vocabulary")
    require(not (args.inpaint_mask or args.keep_outside) or args.inpaint_image,
            "--inpaint-mask and --keep-outside go with --inpaint-image")
    require(not args.repair_model or args.repair, "--repair-model goes with --repair N")


def _check_seeds(layout: Layout, args: argparse.Namespace, name: str) -> None:
    """--best-of N draws seeds seed .. seed + N - 1, and --repair R up to R more: the last must still be a seed."""
    draws = f"--best-of {args.best_of} - 1" + (f" + --repair {args.repair}" if args.repair else "")
    require(layout.seed + args.best_of - 1 + args.repair <= SEED_MAX,
            f"layout {name}: seed {layout.seed} + {draws} passes the largest seed, 2**64 - 1")


def _jobs(path: str, max_side: int = MAX_SIDE) -> list[Job]:
    """The layouts of a file with their output names (checked: safe file names, no repeats)."""
    layouts = load_layouts(path, max_side)
    stem = Path(path).stem
    names = [
        layout.meta.get("name") or (stem if len(layouts) == 1 else f"{stem}_{i:04d}")
        for i, layout in enumerate(layouts)
    ]
    for i, name in enumerate(names):
        require(isinstance(name, str) and bool(_NAME.match(name)),
                f"{path} layout {i}: 'name' {name!r} must be a file name of letters, digits, '_', '-', '.'")
        require(names.index(name) == i, f"{path} layout {i}: name {name!r} repeats layout {names.index(name)}")
    return [Job(name, layout) for name, layout in zip(names, layouts)]


def _prepared(layout: Layout, args: argparse.Namespace) -> Layout:
    """The layout as generated: --seed applied, at most --max-entities entities (the largest)."""
    if args.seed is not None:
        layout = replace(layout, seed=args.seed)
    return layout.keep_largest(args.max_entities)


def _detector_name(args: argparse.Namespace) -> str | None:
    """The detector to load (--detector, else the default), or None when no option needs one."""
    needed = args.verify or args.best_of > 1 or args.repair or args.layout_from
    return (args.detector or default_detector(args.model)) if needed else None


def default_detector(model: str) -> str:
    """The detector used without --detector: the demo world's own with --model demo, else Grounding DINO-T."""
    from detector.cli import DEFAULT_MODEL

    return DEMO if model == DEMO else DEFAULT_MODEL


def _detector(args: argparse.Namespace, name: str, device):
    """The detector `name`; when the default one cannot load, the error names the options that need it."""
    from detector.detect import OpenSetDetector

    try:
        return OpenSetDetector.from_pretrained(name, device=device)
    except UserError as error:
        if args.detector:
            raise
        needs = [option for option, given in (("--verify", args.verify), ("--best-of", args.best_of > 1),
                                              ("--repair", args.repair), ("--layout-from", args.layout_from)) if given]
        raise UserError(f"{error}; {' and '.join(needs)} need{'s' if len(needs) == 1 else ''} a detector: name one with "
                        "--detector") from None


def _layout_from_image(args: argparse.Namespace, detector) -> list[Job]:
    """One job: the layout the detector finds in --layout-from (caption noun phrases, --phrases, or what it names)."""
    from detector.label import load_vocabulary

    vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else None
    layout = layout_from_image(detector, open_image(args.layout_from), args.caption, args.phrases, args.layout_from,
                               vocabulary)
    return [Job(Path(args.layout_from).stem, replace(layout, meta={**layout.meta, "source": args.layout_from}))]


def layout_from_image(detector, image: Image.Image, caption: str | None = None, phrases: Sequence[str] | None = None,
                      where: str = "image", vocabulary: Sequence[str] | None = None) -> Layout:
    """The layout the detector finds in `image`: `caption`'s noun phrases, else `phrases`, each at its best box;
    with neither, the objects the detector names (a captioning detector's own names, else `vocabulary`'s, LVIS's
    by default: `detector.label.name_objects`).

    Raises a UserError naming `where` when nothing is found.
    """
    from detector.label import label, name_objects

    if caption:
        layout = label(detector, image, caption)
    elif phrases:
        layout = layout_of_phrases(detector, image, phrases)
    else:
        [layout] = name_objects(detector, [image], vocabulary)
    require(bool(layout.entities), f"{where}: the detector found nothing to lay out")
    return layout


def layout_of_phrases(detector, image: Image.Image, phrases: Sequence[str], prompt: str | None = None) -> Layout:
    """A layout of `image`: each phrase at its best-scoring detection; phrases not found are left out."""
    phrases = [p.strip() for p in phrases]
    require(all(phrases), "--phrases: empty phrase")
    detections = detector.detect(image, phrases)[0]
    best: dict[int, int] = {}
    for k in detections.scores.argsort(descending=True).tolist():
        best.setdefault(int(detections.phrase_ids[k]), k)
    entities = tuple(Entity(p, tuple(detections.boxes[best[i]].tolist())) for i, p in enumerate(phrases) if i in best)
    width, height = (max(8, round(side / 8) * 8) for side in image.size)
    return Layout(prompt or ", ".join(phrases), entities, width=width, height=height)


def _batches(jobs: Sequence[Job], batch_size: int):
    """Chunks of at most `batch_size` jobs of one image size."""
    size = lambda job: (job.layout.width, job.layout.height)  # noqa: E731
    for _, group in itertools.groupby(sorted(jobs, key=size), key=size):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


# --- generation ---


@dataclass
class Candidate:
    layout: Layout
    image: Image.Image
    verification: Any = None  # detector.verify.Verification with --verify / --best-of / --repair
    unet_calls: int = 0  # UNet calls that made the image (one per denoising step)

    @property
    def score(self) -> tuple[float, float]:
        """Instance success rate, then mean IoU: what --best-of maximises."""
        return (self.verification.success_rate, self.verification.mean_iou) if self.verification else (0.0, 0.0)


def best(candidates: Sequence[Candidate]) -> int:
    """The index of the best-scoring candidate, the first of equals: --best-of's (and --repair's) choice."""
    return max(range(len(candidates)), key=lambda i: candidates[i].score)  # max keeps the first of equals


def paint(pipeline, layouts: list[Layout], call: dict) -> tuple[list[Image.Image], int]:
    """The images of `layouts` (one size: one batch) by `pipeline(layouts, **call)`, and the UNet calls each took."""
    steps = []
    images = pipeline(layouts, **call, callback_on_step_end=lambda pipe, i, t, tensors: steps.append(i) or {}).images
    return images, len(steps)


def _candidates(pipeline, layouts: list[Layout], k: int, call: dict, detector, args) -> list[Candidate]:
    """Candidate `k` of each layout: seed + k; verified when a detector is loaded."""
    from detector.verify import verify_batch

    layouts = [replace(layout, seed=layout.seed + k) for layout in layouts]
    images, calls = paint(pipeline, layouts, call)
    candidates = [Candidate(layout, image, unet_calls=calls) for layout, image in zip(layouts, images)]
    if detector is not None and (args.verify or args.best_of > 1 or args.repair):
        for candidate, check in zip(candidates, verify_batch(detector, images, layouts, args.iou_threshold)):
            candidate.verification = check
    return candidates


def _repair_model(args: argparse.Namespace, pipeline, device, dtype):
    """The --repair-model pipeline; without an adapter of its own it takes the generating pipeline's."""
    from gligen.pipeline import GligenPipeline

    try:
        painter = GligenPipeline.from_pretrained(args.repair_model, device=device, dtype=dtype, scheduler=args.scheduler,
                                                 attention=args.attention)
        if painter.adapter is None and pipeline.adapter is not None:
            painter.set_adapter(pipeline.adapter)
    except UserError as error:
        raise UserError(f"--repair-model {args.repair_model}: {error}") from None
    suit_threads(painter.unet, device)
    return painter


def _write(out: Path, job: Job, candidates: list[Candidate], args, settings: dict, repaired=None) -> Candidate:
    """NAME.png, NAME.overlay.png and NAME.json of the best candidate (or of `repaired`'s kept round, a
    `gligen.repair.Repair` of it); the JSON last. The image kept."""
    chosen = candidates[best(candidates)]
    kept = repaired.rounds[repaired.kept].candidate if repaired is not None else chosen
    save_image(out / f"{job.name}.png", kept.image)
    if args.overlay:
        save_image(out / f"{job.name}.overlay.png", draw_layout(kept.image, kept.layout))
    record: dict[str, Any] = {
        "image": f"{job.name}.png",
        "overlay": f"{job.name}.overlay.png" if args.overlay else None,
        "seed": chosen.layout.seed,
        "layout": chosen.layout.to_dict(),
        "model": args.model,
        "adapter": args.adapter or (DEMO if args.model == DEMO else None),  # the demo base brings its adapter
        "settings": settings,
        "unet_calls": sum(c.unet_calls for c in candidates) + (repaired.unet_calls if repaired is not None else 0),
    }
    if kept.verification is not None:
        record["verification"] = kept.verification.to_dict()
    if len(candidates) > 1:
        record["candidates"] = [
            {"seed": c.layout.seed, "success_rate": c.score[0], "mean_iou": c.score[1], "unet_calls": c.unet_calls}
            for c in candidates
        ]
    if repaired is not None:
        record["repair"] = repaired.to_dict()
    write_json(out / f"{job.name}.json", record)
    return kept
