"""Visual exemplars: "find what this box on this reference image shows".

An `Exemplar` is a reference image and a box on it (normalized xyxy), or no box: then the
reference image's most object-like region, as transformers' OWLv2 `image_guided_detection`
picks it. Exemplars sharing a `label` are one query (their embeddings averaged, as OWL does
for few-shot detection) and their detections carry that label.

On the command line an exemplar is `[LABEL=]PATH[:x0,y0,x1,y1]`: the box in pixels of the
reference image, or normalized when all four values lie in [0, 1].

    detector detect shelf.jpg --exemplar mug.jpg:120,40,260,200 --exemplar mug2.jpg --model google/owlv2-base-patch16-ensemble
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from gligen.errors import UserError
from gligen.files import open_image
from gligen.layout import Box

DEFAULT_LABEL = "exemplar"
_LABEL = re.compile(r"^([^=/\\.:]+)=(.+)$")  # a label holds no path characters


@dataclass(frozen=True, eq=False)
class Exemplar:
    """A reference image and the box (normalized xyxy) around what to find; None: its most object-like region."""

    image: Image.Image = field(repr=False)
    box: Box | None = None
    label: str = DEFAULT_LABEL
    where: str = "exemplar"  # names the exemplar in messages (its file)

    def __post_init__(self) -> None:
        if self.box is None:
            return
        x0, y0, x1, y1 = self.box
        w, h = self.image.size
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            pixels = [round(v, 1) for v in (x0 * w, y0 * h, x1 * w, y1 * h)]
            raise UserError(f"{self.where}: exemplar box {pixels} (pixels) lies outside the image ({w}x{h}) or is empty")
        if min((x1 - x0) * w, (y1 - y0) * h) < 1:
            raise UserError(f"{self.where}: exemplar box is less than a pixel wide or high")


def group_exemplars(exemplars: Sequence[Exemplar]) -> list[tuple[str, list[Exemplar]]]:
    """Exemplars grouped by label, labels in order of first appearance: one query per group."""
    groups: dict[str, list[Exemplar]] = {}
    for exemplar in exemplars:
        groups.setdefault(exemplar.label, []).append(exemplar)
    return list(groups.items())


def parse_exemplar(spec: str) -> Exemplar:
    """`[LABEL=]PATH[:x0,y0,x1,y1]` -> an `Exemplar` with its image read; a `UserError` naming what is wrong."""
    label, rest = DEFAULT_LABEL, spec
    match = _LABEL.match(spec)
    if match:
        label, rest = match[1].strip(), match[2]
    path, box_text = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and re.fullmatch(r"[-+\d.eE]+(,[-+\d.eE]+){3}", tail.replace(" ", "")):
        path, box_text = head, tail
    image = open_image(path)
    if box_text is None:
        return Exemplar(image, None, label, path)
    try:
        values = [float(v) for v in box_text.split(",")]
    except ValueError:
        raise UserError(f"{spec}: exemplar box {box_text!r} is not four numbers x0,y0,x1,y1") from None
    w, h = image.size
    if not all(0 <= v <= 1 for v in values):  # pixels
        values = [values[0] / w, values[1] / h, values[2] / w, values[3] / h]
    return Exemplar(image, tuple(values), label, path)
