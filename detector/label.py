"""Pseudo-labels: the layout of an image, from its caption or from nothing but the image.

With a caption, as GLIGEN made grounding data from CC3M and SBU (with GLIP): chunk the
caption into noun phrases, detect each, keep the best box.

    detector label photo.jpg --caption "a cat and a dog on a sofa" --out layout.json --overlay overlays/

Without one (what DetCLIPv3 aims at), the detector names what it sees (`name_objects`):
- a captioning detector (Florence-2) writes the names itself (`<OD>`: category names, or
  `--task dense`: `<DENSE_REGION_CAPTION>` descriptions);
- any other detector looks for a vocabulary (`--vocabulary lvis|coco|FILE`, default lvis: the
  1203 LVIS v1 category names, underscores read as spaces, split across prompts as needed).
The most confident detections are kept, best first, each overlapping no better one by more
than `overlap_iou` (whatever their names), at most `max_objects`; the layout's prompt lists
their names ("cat, dog, sofa") and each entity carries its span in it.

    detector label photo.jpg --out layout.json                        # LVIS names
    detector label photo.jpg --model florence-2-large --task dense    # Florence-2's own words

The chunker is small and rule-based, made for caption-style English ("a man riding a horse
on the beach"):

1. The caption is split into words (letters, digits, inner `'` and `-`) and punctuation.
2. Punctuation, conjunctions, prepositions, pronouns and auxiliary verbs (`_BREAKS`) end a
   phrase and are never part of one ("a cat and a dog", "a dog on a sofa").
3. A determiner or a number starts a new phrase when the open phrase already has a noun
   ("a cat a dog" -> two phrases; "the two dogs" stays one).
4. A verb-like word (ending in -ing or -ed, or a listed verb such as "sits") ends the phrase
   when it follows a noun or when no phrase is open ("a dog sitting ...", "a man holds ...");
   after a determiner or a known adjective it is a modifier ("a running dog", "a building").
5. A phrase made only of determiners, numbers, colours and known adjectives is dropped
   ("the car is red" -> "the car"), unless its last word is an adjective that is also a noun
   (`_NOUN_ADJECTIVES`: "a white square" is a phrase, "a square table" one phrase headed by "table").

Each phrase is the caption's own text at its char span (determiners included), so the spans
are Flickr30k-style `tokens_positive`. Captions this does not handle well (nested clauses,
noun-noun verbs like "fruit stands") can be labelled from explicit phrases instead.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from detector.box_ops import batched_nms
from detector.detect import Detections, OpenSetDetector
from detector.prompt import normalize_phrase
from gligen.draw import draw_boxes
from gligen.errors import UserError, require
from gligen.files import open_image, save_image
from gligen.layout import MAX_ENTITIES, Entity, Layout, Span, save_layouts

VOCABULARIES = Path(__file__).parent / "vocabularies"  # lvis.txt (LVIS v1, by category id), coco.txt

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")

_DETERMINERS = set(
    "a an the this that these those some any each every another his her its their our my your "
    "several many few both all no".split()
)
_NUMBERS = set(
    "one two three four five six seven eight nine ten eleven twelve dozen dozens".split()
)
_COLOURS = set(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden "
    "beige tan maroon navy teal cyan magenta violet turquoise".split()
)
_ADJECTIVES = set(
    "big small large little tiny huge tall short long old young new empty full open closed "
    "wooden metal plastic dark bright wet dry hot cold clean dirty round square striped "
    "spotted fluffy furry cute pretty beautiful colorful colourful other".split()
)
_NOUN_ADJECTIVES = set("square plastic metal".split())  # "a white square", "a piece of plastic"
_BREAKS = set(
    # conjunctions and clause words
    "and or but nor while as than then so because if though although where when which who whom "
    "whose what how "
    # prepositions ("front"/"top" as in "in front of", "on top of")
    "on in at with of to from by for into onto over under above below behind beside besides "
    "between near next inside outside around across along through against among beneath "
    "underneath upon atop toward towards up down off out about like without during after "
    "before past via front top "
    # pronouns and adverbs
    "it he she they them him we you i me us there here itself themselves very also just still "
    "not too together "
    # auxiliaries and copulas
    "is are was were be been being am has have had does do did can will would could should may "
    "might must".split()
)
_VERBS = set(
    "sits stands holds lies lays looks eats plays rides walks runs flies sleeps wears carries "
    "contains shows waits rests hangs grazes throws catches swings hits kicks jumps drinks "
    "watches talks uses takes makes pulls pushes leans reads cuts".split()
)
_MODIFIERS = _DETERMINERS | _NUMBERS | _COLOURS | _ADJECTIVES


def _is_number(word: str) -> bool:
    return word in _NUMBERS or word.isdigit()


def _is_modifier(word: str) -> bool:
    return word in _MODIFIERS or word.isdigit()


def _is_verb_like(word: str) -> bool:
    return word in _VERBS or (len(word) > 4 and word.endswith(("ing", "ed")))


def noun_phrases(caption: str) -> list[tuple[str, Span]]:
    """The noun phrases of `caption`, in order, each with its (start, end) char span.

    `caption[start:end] == phrase` for every result. See the module docstring for the rules.
    """
    phrases: list[tuple[str, Span]] = []
    words: list[tuple[str, int, int]] = []  # the open phrase: (lowercased word, start, end)

    def close() -> None:
        if words and (any(not _is_modifier(w) for w, _, _ in words) or words[-1][0] in _NOUN_ADJECTIVES):
            start, end = words[0][1], words[-1][2]
            phrases.append((caption[start:end], (start, end)))
        words.clear()

    for match in _TOKEN.finditer(caption):
        word = match.group().lower()
        has_noun = any(not _is_modifier(w) for w, _, _ in words)
        if not word[0].isalnum() or word in _BREAKS:
            close()
            continue
        if word in _DETERMINERS or _is_number(word):
            if has_noun:
                close()
        elif _is_verb_like(word) and (has_noun or not words):
            close()
            continue
        words.append((word, match.start(), match.end()))
    close()
    return phrases


def caption_phrases(caption: str) -> list[tuple[str, Span]]:
    """`noun_phrases(caption)`, a `UserError` when there are none."""
    chunks = noun_phrases(caption)
    if not chunks:
        raise UserError(f"caption {caption!r}: no noun phrases found to label")
    return chunks


def label(
    detector: OpenSetDetector,
    image: Image.Image,
    caption: str,
    box_threshold: float | None = None,
    text_threshold: float | None = None,
) -> Layout:
    """The layout of `image`: `caption`'s noun phrases with their detected boxes.

    Phrases the detector does not find are left out. See `label_batch`.
    """
    return label_batch(detector, [image], [caption], box_threshold, text_threshold)[0]


def label_batch(
    detector: OpenSetDetector,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    box_threshold: float | None = None,
    text_threshold: float | None = None,
) -> list[Layout]:
    """Pseudo-label many images with one batched detector call; one `Layout` per image.

    Each entity is a noun phrase with its char span in the caption and the box of the
    best-scoring detection of its text; a text said k times takes the k best detections.
    The layout's width and height are the image's, rounded to multiples of 8 (a layout
    rule; boxes are normalized so nothing moves). Detector scores go to `meta["scores"]`.
    """
    require(len(images) == len(captions), f"label: {len(images)} images but {len(captions)} captions")
    chunked = [caption_phrases(caption) for caption in captions]
    texts = [list(dict.fromkeys(normalize_phrase(phrase) for phrase, _ in chunks)) for chunks in chunked]
    detections = detector.detect(list(images), texts, box_threshold=box_threshold, text_threshold=text_threshold)
    return [
        _layout(caption, chunks, phrase_texts, found, image)
        for caption, chunks, phrase_texts, found, image in zip(captions, chunked, texts, detections, images)
    ]


def _layout(
    caption: str, chunks: list[tuple[str, Span]], phrase_texts: list[str], detections: Detections, image: Image.Image
) -> Layout:
    """One image's layout from the detections of its distinct phrase texts."""
    ranked: dict[int, list[int]] = defaultdict(list)  # phrase id -> detection indices, best first
    x0, y0, x1, y1 = detections.boxes.unbind(-1)
    for k in detections.scores.argsort(descending=True).tolist():
        if x1[k] > x0[k] and y1[k] > y0[k]:  # a box clipped flat at the border is no layout box
            ranked[int(detections.phrase_ids[k])].append(k)
    entities, scores = [], []
    for phrase, span in chunks:
        candidates = ranked[phrase_texts.index(normalize_phrase(phrase))]
        if candidates:
            k = candidates.pop(0)
            entities.append(Entity(phrase, tuple(detections.boxes[k].tolist()), spans=(span,)))
            scores.append(round(float(detections.scores[k]), 4))
    width, height = layout_size(image)
    return Layout(caption, tuple(entities), width=width, height=height, meta={"scores": scores})


def layout_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of a layout of `image`: its size rounded to multiples of 8 (boxes are normalized)."""
    width, height = (max(8, round(side / 8) * 8) for side in image.size)
    return width, height


# ----------------------------------------------------------------------------- caption-free


def load_vocabulary(name: str) -> list[str]:
    """Names to look for: "lvis" or "coco" (bundled), or a text file with one name per line ('#' comments)."""
    path = VOCABULARIES / f"{name}.txt" if name in ("lvis", "coco") else Path(name)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{name}: cannot read the vocabulary (lvis, coco, or a file of names: {error})") from None
    names = list(dict.fromkeys(" ".join(line.replace("_", " ").split()) for line in lines
                               if line.strip() and not line.lstrip().startswith("#")))
    require(bool(names), f"{name}: the vocabulary holds no names")
    return names


def name_objects(
    detector: OpenSetDetector,
    images: Sequence[Image.Image],
    vocabulary: Sequence[str] | None = None,
    task: str = "od",
    box_threshold: float | None = None,
    max_objects: int = MAX_ENTITIES,
    overlap_iou: float = 0.5,
    batch_size: int = 8,
) -> list[Layout]:
    """Caption-free layouts: what the detector finds and names in each image (see the module docstring).

    Without `vocabulary`, a detector that names objects itself (`detector.names_objects`) does,
    with `task` ("od" or "dense"); any other one looks for the LVIS names.
    """
    require(max_objects >= 1, f"max_objects must be at least 1, got {max_objects}")
    if vocabulary is None and detector.names_objects:
        found = detector.name_objects(list(images), task=task, batch_size=batch_size)
    else:
        names = list(vocabulary) if vocabulary is not None else load_vocabulary("lvis")
        found = detector.detect(list(images), names, box_threshold=box_threshold, batch_size=batch_size)
    return [_named_layout(detections, image, max_objects, overlap_iou) for detections, image in zip(found, images)]


def _named_layout(detections: Detections, image: Image.Image, max_objects: int, overlap_iou: float) -> Layout:
    """The most confident, mutually non-overlapping detections as a layout whose prompt lists their names."""
    x0, y0, x1, y1 = detections.boxes.unbind(-1)
    boxed = ((x1 > x0) & (y1 > y0)).nonzero()[:, 0]  # a box clipped flat at the border is no layout box
    anyone = torch.zeros(len(boxed), dtype=torch.long)  # one class: boxes of any name suppress each other
    keep = boxed[batched_nms(detections.boxes[boxed], detections.scores[boxed], anyone, overlap_iou)][:max_objects]
    entities, scores, prompt = [], [], ""
    for k in keep.tolist():
        name = detections.phrases[int(detections.phrase_ids[k])]
        start = len(prompt) + (2 if prompt else 0)
        prompt = f"{prompt}, {name}" if prompt else name
        entities.append(Entity(name, tuple(detections.boxes[k].tolist()), spans=((start, start + len(name)),)))
        scores.append(round(float(detections.scores[k]), 4))
    width, height = layout_size(image)
    return Layout(prompt, tuple(entities), width=width, height=height, meta={"scores": scores})


# ----------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `detector label` to the `detector` command."""
    from detector.cli import add_model_args, add_output_args, add_threshold_args  # here: detector.cli imports this module
    from gligen.commands import positive_int

    parser = subparsers.add_parser("label")
    parser.add_argument("image", help="image file")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--caption", help="caption whose noun phrases are located")
    source.add_argument("--vocabulary", help="without a caption: names to look for, lvis, coco or a file of names "
                                             "(default: a captioning detector's own names, else lvis)")
    add_model_args(parser)
    parser.add_argument("--task", choices=sorted(("od", "dense")), default="od",
                        help="captioning detector without a caption: category names (od) or descriptions (dense)")
    parser.add_argument("--max-objects", type=positive_int, default=MAX_ENTITIES, help="without a caption: at most this many")
    add_output_args(parser, "the layout")
    add_threshold_args(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from detector.cli import _overlay_names, load_from_args

    image = open_image(args.image)
    if args.caption is not None:
        caption_phrases(args.caption)  # a caption without phrases fails before the model loads
        layout = label(load_from_args(args), image, args.caption, args.box_threshold, args.text_threshold)
    else:
        require(args.max_objects >= 1, f"--max-objects must be at least 1, got {args.max_objects}")
        vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else None
        [layout] = name_objects(load_from_args(args), [image], vocabulary, args.task, args.box_threshold,
                                args.max_objects)
    if args.out:
        save_layouts(args.out, [layout])
    else:
        print(json.dumps(layout.to_dict(), indent=2))
    if args.overlay:
        picture = draw_boxes(image, layout.boxes, layout.phrases)
        save_image(Path(args.overlay) / _overlay_names([args.image])[0], picture)
