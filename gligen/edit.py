"""`gligen edit`: edit an image by naming things: find them with the detector, mask them, repaint with grounding.

    gligen edit photo.jpg --model M [--adapter A] [--detector D] [--segmenter S] --out DIR EDIT [EDIT ...]

    --replace "the dog" --with "a cat"        repaint the dog's mask with a cat grounded in its box
    --remove "the cup" [--prompt "a table"]   repaint the cup's mask from the prompt alone (default empty)
    --add "a red hat" --box x0,y0,x1,y1       paint a red hat in the box (normalized xyxy)
    --move "the ball" --to x0,y0,x1,y1        remove the ball, then paint it in the new box (a text-image-box
                                              model gets the cut-out ball as its reference image)

Edits apply in the order given, each on the result of the previous; `--prompt` sets the prompt of the
edit just before it (default: the new phrase; empty for a removal, and for the removal half of a
move). The detector finds the phrase (the best instance, or every one with --all); the segmenter (a
SAM checkpoint) masks it, else its box is the mask. Pixels farther than --feather from the repainted region stay exactly the input's
(--no-keep-outside lets the model redraw them). Writes DIR/NAME.png, DIR/NAME.overlay.png (the old
boxes found and the new boxes, labelled) and DIR/NAME.json (every detection used with its score, box
and mask, every setting, the seed); NAME is the image's file stem. A phrase the detector does not
find stops the command with the best score it saw, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from gligen.bundled import DEMO
from gligen.commands import number, positive_int, seed
from gligen.devices import DTYPES, parse_device, parse_dtype, suit_threads
from gligen.draw import draw_boxes
from gligen.errors import UserError, progress, require
from gligen.files import Output, open_image, save_image, write_json
from gligen.layout import Box, Entity, Layout
from gligen.masks import DEFAULT_FEATHER, box_pixels, fit_image

OLD, NEW = (230, 25, 75), (60, 180, 75)  # overlay colours: what was found, what was painted
KINDS = {"replace": "--replace", "remove": "--remove", "add": "--add", "move": "--move"}


@dataclass(frozen=True)
class Edit:
    """One edit of the command line: its kind, the phrase it names, and what completes it."""

    kind: str  # replace | remove | add | move
    phrase: str  # what to find (replace, remove, move) or to paint (add)
    new: str | None = None  # replace: the phrase painted instead (--with)
    box: Box | None = None  # add: where (--box); move: where to (--to)
    prompt: str | None = None

    def __str__(self) -> str:
        return f"{KINDS[self.kind]} {self.phrase!r}"

    def prompt_or(self, default: str) -> str:
        return default if self.prompt is None else self.prompt


@dataclass
class Found:
    """An instance of a phrase in the image being edited: normalized box, score, mask in its pixels ((H, W) bool)."""

    box: Box
    score: float
    mask: np.ndarray


@dataclass
class Step:
    """What one edit did: the instances found (none for --add) and the boxes painted."""

    edit: Edit
    found: list[Found] = field(default_factory=list)
    painted: list[Box] = field(default_factory=list)


class NewEdit(argparse.Action):
    """--replace / --remove / --add / --move PHRASE: appends an edit to the one ordered list `edits`."""

    def __call__(self, parser, namespace, value, option_string=None):
        require_phrase(parser, value, option_string)
        namespace.edits = [*namespace.edits, Edit(self.const, value.strip())]


class EditPart(argparse.Action):
    """--with / --box / --to / --prompt: completes the edit given just before (`const`: its field, the kinds)."""

    def __call__(self, parser, namespace, value, option_string=None):
        name, kinds = self.const
        last = namespace.edits[-1] if namespace.edits else None
        if last is None or last.kind not in kinds or getattr(last, name) is not None:
            after = " or ".join(KINDS[kind] for kind in kinds)
            parser.error(f"{option_string} must follow {after}, once for each")
        if name == "new":
            require_phrase(parser, value, option_string)
        namespace.edits = [*namespace.edits[:-1], dataclasses.replace(last, **{name: value})]


def require_phrase(parser: argparse.ArgumentParser, value: str, option: str) -> None:
    if not value.strip():
        parser.error(f"argument {option}: empty phrase")


def parse_box(text: str) -> Box:
    """An argparse `type`: 'x0,y0,x1,y1', normalized, inside the image, with x0 < x1 and y0 < y1."""
    parts = text.split(",")
    values = [number(float, 0, 1)(part) for part in parts] if len(parts) == 4 else None
    if values is None or not (values[0] < values[2] and values[1] < values[3]):
        raise argparse.ArgumentTypeError(f"must be x0,y0,x1,y1 in [0, 1] with x0 < x1 and y0 < y1, got {text!r}")
    return tuple(values)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("edit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="the image to edit")
    parser.add_argument("--model", required=True, help="diffusers SD or GLIGEN pipeline directory or hub id")
    parser.add_argument("--adapter", help="adapter directory (adapter.safetensors + adapter_config.json) or hub id")
    parser.add_argument("--detector", help="detector directory or hub id (default: the bundled one with --model demo, "
                        "else Grounding DINO-T)")
    parser.add_argument("--segmenter", help="SAM directory or hub id that masks what is found (default: its box)")
    parser.add_argument("--out", required=True, type=Output, help="output directory")
    parser.set_defaults(edits=[])
    edits = parser.add_argument_group("edits (any number, applied in order)")
    for kind, option in KINDS.items():
        edits.add_argument(option, action=NewEdit, const=kind, metavar="PHRASE", help=f"{kind} this")
    edits.add_argument("--with", action=EditPart, const=("new", ("replace",)), metavar="PHRASE",
                       help="after --replace: what to paint instead")
    edits.add_argument("--box", action=EditPart, type=parse_box, const=("box", ("add",)), metavar="x0,y0,x1,y1",
                       help="after --add: where (normalized)")
    edits.add_argument("--to", action=EditPart, type=parse_box, const=("box", ("move",)), metavar="x0,y0,x1,y1",
                       help="after --move: where to (normalized)")
    edits.add_argument("--prompt", action=EditPart, const=("prompt", tuple(KINDS)),
                       help="the prompt of the edit just before (default: its new phrase; empty for --remove)")
    parser.add_argument("--all", action="store_true", help="edit every instance found (default: the best one)")
    parser.add_argument("--box-threshold", type=number(float, 0, 1),
                        help="detection score an instance needs (default: the detector family's)")
    parser.add_argument("--text-threshold", type=number(float, 0, 1), help="phrase token threshold, Grounding DINO")
    parser.add_argument("--keep-outside", action=argparse.BooleanOptionalAction, default=True,
                        help="keep every pixel outside the repainted region (grown by --feather) as in the input")
    parser.add_argument("--feather", type=number(int, 0), default=DEFAULT_FEATHER,
                        help=f"pixels of ramp around the repainted region (default {DEFAULT_FEATHER})")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=number(float, 0), default=7.5,
                        help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of every repaint (default 0)")
    parser.add_argument("--scheduler", help="ddim, pndm, euler, euler_a, dpmpp, lms, unipc, ... (default: the model's)")
    parser.add_argument("--image-encoder", help="CLIP vision directory or hub id (text-image-box: --move's reference)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on CUDA, else fp32")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    check_edits(args.edits, args.all)
    image = open_image(args.image)
    from detector.detect import OpenSetDetector
    from gligen.generate import default_detector
    from gligen.pipeline import GligenPipeline

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype or ("fp16" if device.type == "cuda" else "fp32"))
    detector_name = args.detector or default_detector(args.model)
    detector = OpenSetDetector.from_pretrained(detector_name, device=device)
    segmenter = None
    if args.segmenter:
        from detector.segment import Segmenter

        segmenter = Segmenter.from_pretrained(args.segmenter, device=device, dtype=dtype)
    pipeline = GligenPipeline.from_pretrained(args.model, args.adapter, device=device, dtype=dtype,
                                              scheduler=args.scheduler, image_encoder=args.image_encoder)
    suit_threads(pipeline.unet, device)
    editor = Editor(pipeline, detector, segmenter, args)
    with progress(lambda: f"{editor.done} of {len(args.edits)} edits applied to {args.image}; nothing written"):
        edited, steps = editor.apply(image, args.edits)
    write_outputs(Path(args.out), Path(args.image).stem, edited, steps, args, detector_name, editor.settings)


def check_edits(edits: Sequence[Edit], every: bool) -> None:
    """Every edit complete (--with, --box, --to given); --all not with --move."""
    require(bool(edits), "give at least one edit: --replace, --remove, --add or --move")
    for edit in edits:
        require(edit.kind != "replace" or edit.new is not None, f"{edit}: give --with PHRASE after it")
        require(edit.kind != "add" or edit.box is not None, f"{edit}: give --box x0,y0,x1,y1 after it")
        require(edit.kind != "move" or edit.box is not None, f"{edit}: give --to x0,y0,x1,y1 after it")
        require(edit.kind != "move" or not every, f"{edit}: --move moves one instance; drop --all")


def canvas_size(image: Image.Image) -> tuple[int, int]:
    """The layout size an image is edited at: its own, each side rounded to a multiple of 8."""
    return tuple(max(8, round(side / 8) * 8) for side in image.size)


class Editor:
    """Applies edits to an image with a loaded pipeline, detector and (optional) segmenter, as `args` say."""

    def __init__(self, pipeline, detector, segmenter, args: argparse.Namespace):
        self.pipeline, self.detector, self.segmenter, self.args = pipeline, detector, segmenter, args
        self.box_threshold = detector.default_box_threshold if args.box_threshold is None else args.box_threshold
        self.done = 0
        schedule = pipeline.default_schedule
        self.settings = {
            "steps": args.steps, "guidance": args.guidance, "schedule": list(schedule),
            "scheduler": type(pipeline.scheduler).__name__, "dtype": str(pipeline.dtype).removeprefix("torch."),
            "device": str(pipeline.device), "all": args.all, "box_threshold": self.box_threshold,
            "text_threshold": args.text_threshold, "keep_outside": args.keep_outside,
            "feather": args.feather if args.keep_outside else None, "image_encoder": args.image_encoder,
        }

    def apply(self, image: Image.Image, edits: Sequence[Edit]) -> tuple[Image.Image, list[Step]]:
        """The image after every edit in order, and what each did. Raises a UserError when a phrase is not found."""
        current = fit_image(image, *canvas_size(image))
        steps = []
        for index, edit in enumerate(tqdm(edits, desc="edit", unit="edit"), 1):
            current, step = getattr(self, edit.kind)(current, edit, f"edit {index} ({edit})")
            steps.append(step)
            self.done = index
        return current, steps

    def replace(self, image: Image.Image, edit: Edit, where: str) -> tuple[Image.Image, Step]:
        found = self.find(image, edit.phrase, where)
        entities = tuple(Entity(edit.new, instance.box) for instance in found)
        edited = self.repaint(image, entities, edit.prompt_or(edit.new), union(found))
        return edited, Step(edit, found, [e.box for e in entities])

    def remove(self, image: Image.Image, edit: Edit, where: str) -> tuple[Image.Image, Step]:
        found = self.find(image, edit.phrase, where)
        return self.repaint(image, (), edit.prompt_or(""), union(found)), Step(edit, found)

    def add(self, image: Image.Image, edit: Edit, where: str) -> tuple[Image.Image, Step]:
        edited = self.repaint(image, (Entity(edit.phrase, edit.box),), edit.prompt_or(edit.phrase),
                              box_pixels(edit.box, *image.size))
        return edited, Step(edit, painted=[edit.box])

    def move(self, image: Image.Image, edit: Edit, where: str) -> tuple[Image.Image, Step]:
        """Remove the instance (the region repainted from an empty prompt), then paint it at the new box: with a
        text-image-box model, the cut-out instance (white outside its mask) is its reference image."""
        [instance] = self.find(image, edit.phrase, where)
        reference = cut_out(image, instance) if self.grounds_images else None
        emptied = self.repaint(image, (), "", instance.mask)
        moved = self.repaint(emptied, (Entity(edit.phrase, edit.box, reference),), edit.prompt_or(edit.phrase),
                             box_pixels(edit.box, *image.size))
        return moved, Step(edit, [instance], [edit.box])

    @property
    def grounds_images(self) -> bool:
        adapter = self.pipeline.adapter
        return adapter is not None and adapter.config.feature_type == "text-image-box"

    def find(self, image: Image.Image, phrase: str, where: str) -> list[Found]:
        """The best instance of `phrase` in `image` (every one with --all), with its mask."""
        [detections] = self.detector.detect(image, [phrase], box_threshold=self.box_threshold,
                                             text_threshold=self.args.text_threshold)
        if not len(detections):
            [seen] = self.detector.detect(image, [phrase], box_threshold=0.0, text_threshold=0.0)
            best = f"the best score seen is {seen.scores.max():.3f}" if len(seen) else "nothing was detected at all"
            needs = f"the box threshold {self.box_threshold:g}"
            if self.detector.family == "Grounding DINO":  # its phrase tokens must also pass the text threshold
                text = self.args.text_threshold
                needs += f" and the text threshold {self.detector.default_text_threshold if text is None else text:g}"
            raise UserError(f"{where}: {phrase!r} not found ({best}; an instance needs {needs})")
        keep = len(detections) if self.args.all else 1
        boxes, scores = detections.boxes[:keep], detections.scores[:keep]
        masks = self.masks(image, boxes)
        return [Found(tuple(box.tolist()), float(score), mask) for box, score, mask in zip(boxes, scores, masks)]

    def masks(self, image: Image.Image, boxes) -> list[np.ndarray]:
        """One (H, W) bool mask per box: the segmenter's, else (or where it finds nothing) the box's pixels."""
        masks = [box_pixels(box, *image.size) for box in boxes.tolist()]
        if self.segmenter is not None:
            [segmented] = self.segmenter.segment([image], [boxes])
            masks = [mask.numpy() if mask.any() else fallback for mask, fallback in zip(segmented, masks)]
        return masks

    def repaint(self, image: Image.Image, entities: tuple[Entity, ...], prompt: str, mask: np.ndarray) -> Image.Image:
        """`image` repainted where `mask` ((H, W) bool) says, the entities grounded in their boxes."""
        args = self.args
        layout = Layout(prompt, entities, width=image.width, height=image.height, seed=args.seed)
        return self.pipeline(layout, num_inference_steps=args.steps, guidance_scale=args.guidance,
                             inpaint_image=image, inpaint_mask=mask, keep_outside=args.keep_outside,
                             feather=args.feather).images[0]


def union(found: Sequence[Found]) -> np.ndarray:
    return np.logical_or.reduce([instance.mask for instance in found])


def cut_out(image: Image.Image, instance: Found) -> Image.Image:
    """The pixels of `image` that the instance's box touches, white outside its mask."""
    white = Image.new("RGB", image.size, (255, 255, 255))
    masked = np.asarray(Image.composite(image, white, Image.fromarray(instance.mask)))
    rows, columns = np.nonzero(box_pixels(instance.box, *image.size))
    return Image.fromarray(masked[rows.min():rows.max() + 1, columns.min():columns.max() + 1])


def write_outputs(out: Path, name: str, edited: Image.Image, steps: Sequence[Step], args: argparse.Namespace,
                  detector_name: str, settings: dict) -> None:
    """NAME.png, NAME.overlay.png (old boxes found, new boxes painted) and NAME.json, the record last."""
    save_image(out / f"{name}.png", edited)
    boxes, labels, colors = zip(*(item for step in steps for item in overlay_items(step)))
    save_image(out / f"{name}.overlay.png", draw_boxes(edited, boxes, labels, colors=colors))
    record = {
        "image": f"{name}.png",
        "overlay": f"{name}.overlay.png",
        "source": args.image,
        "size": list(edited.size),
        "seed": args.seed,
        "model": args.model,
        "adapter": args.adapter or (DEMO if args.model == DEMO else None),
        "detector": detector_name,
        "segmenter": args.segmenter,
        "settings": settings,
        "edits": [step_record(step) for step in steps],
    }
    write_json(out / f"{name}.json", record)


def overlay_items(step: Step) -> list[tuple[Box, str, tuple[int, int, int]]]:
    """The boxes an edit draws on the overlay, labelled: each instance found ("old: the dog 0.87"), each box painted
    ("new: a cat"); one box for both where the new phrase took the old one's box ("the dog 0.87 -> a cat")."""
    old = {instance.box: f"{step.edit.phrase} {instance.score:.2f}" for instance in step.found}
    new = step.edit.new or step.edit.phrase
    items = [(box, f"old: {label}", OLD) for box, label in old.items() if box not in step.painted]
    return items + [(box, f"{old[box]} -> {new}" if box in old else f"new: {new}", NEW) for box in step.painted]


def step_record(step: Step) -> dict[str, Any]:
    """An edit as the record lists it: its options, the detections used (score, box, mask), the boxes painted."""
    edit = step.edit
    record: dict[str, Any] = {"edit": edit.kind, "phrase": edit.phrase}
    if edit.new is not None:
        record["with"] = edit.new
    if edit.prompt is not None:
        record["prompt"] = edit.prompt
    if step.found:
        record["detections"] = [{"score": round(instance.score, 6), "box": [round(v, 6) for v in instance.box],
                                 "mask": mask_record(instance.mask)} for instance in step.found]
    record["painted"] = [[round(v, 6) for v in box] for box in step.painted]
    return record


def mask_record(mask: np.ndarray) -> dict[str, Any]:
    """A mask as COCO compressed RLE (`detector.rle`)."""
    from detector.rle import encode

    return encode(mask)
