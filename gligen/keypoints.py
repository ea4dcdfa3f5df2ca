"""Keypoint grounding: one token per keypoint slot of up to `max_persons` persons (17 slots each).

    token[p, k] = MLP(cat[person_embeddings[p] + keypoint_embeddings[k], Fourier(x, y)])

Fourier(x, y) is `fourier_embed` of the 2 coordinates (8 frequencies x sin/cos x 2 = 32 dims).
A slot whose point is not given (invisible, cropped out, padded person) takes the learnable
`null_person_feature` and `null_xy_feature` instead. The person and keypoint embeddings are of
the token size, so the model grounds persons only (no phrase). Parameter names are those of
official GLIGEN's keypoint `position_net.*`, whose weights load as they are.

Shapes: B layouts, P = max_persons, S = P * 17 slots (person-major), C the token size.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from gligen.grounding import _mlp, _or_null, fourier_embed
from gligen.layout import Box, Layout
from gligen.pose import NUM_KEYPOINTS, Keypoints

MAX_PERSONS = 8  # the official keypoint release: 8 persons, 136 tokens


class KeypointPositionNet(nn.Module):
    """Keypoints of up to `max_persons` persons -> (B, max_persons * 17, out_dim) tokens."""

    def __init__(self, max_persons: int = MAX_PERSONS, out_dim: int = 768, fourier_freqs: int = 8):
        super().__init__()
        self.max_persons = max_persons
        self.fourier_freqs = fourier_freqs
        position_dim = fourier_freqs * 2 * 2  # sin and cos of x and y
        self.person_embeddings = nn.Parameter(torch.zeros(max_persons, out_dim))
        self.keypoint_embeddings = nn.Parameter(torch.zeros(NUM_KEYPOINTS, out_dim))
        self.linears = _mlp(out_dim + position_dim, out_dim)
        self.null_person_feature = nn.Parameter(torch.zeros(out_dim))
        self.null_xy_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(self, points: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """points (B,S,2) normalized xy, masks (B,S) 1 for a given point -> tokens (B,S,C)."""
        slots = (self.person_embeddings[:, None] + self.keypoint_embeddings[None]).flatten(0, 1)  # S, C
        person = _or_null(slots.expand(points.shape[0], -1, -1), masks, self.null_person_feature)
        position = _or_null(fourier_embed(points, self.fourier_freqs), masks, self.null_xy_feature)
        return self.linears(torch.cat([person, position], dim=-1))


def keypoint_tensors(
    people: Sequence[Sequence[tuple[Box, Keypoints | None]]], max_persons: int, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (B, max_persons*17, 2) and masks (B, max_persons*17) of B samples' (box, keypoints) entities.

    The persons of a sample are its entities with keypoints; of more than `max_persons` the
    largest boxes are kept, in their order. Slots of points not given, and of absent persons,
    are zero with mask 0.
    """
    points = torch.zeros(len(people), max_persons * NUM_KEYPOINTS, 2)
    masks = torch.zeros(len(people), max_persons * NUM_KEYPOINTS)
    for b, entities in enumerate(people):
        for p, keypoints in enumerate(largest_persons(entities, max_persons)):
            for k, (x, y, v) in enumerate(keypoints):
                if v:
                    points[b, p * NUM_KEYPOINTS + k] = torch.tensor((x, y))
                    masks[b, p * NUM_KEYPOINTS + k] = 1
    return points.to(device, dtype), masks.to(device, dtype)


def largest_persons(entities: Sequence[tuple[Box, Keypoints | None]], max_persons: int) -> list[Keypoints]:
    """The keypoints of the `max_persons` largest entities that have keypoints, in entity order."""
    persons = [(i, box, keypoints) for i, (box, keypoints) in enumerate(entities) if keypoints is not None]
    if len(persons) > max_persons:
        by_area = sorted(persons, key=lambda p: -(p[1][2] - p[1][0]) * (p[1][3] - p[1][1]))[:max_persons]
        persons = sorted(by_area, key=lambda p: p[0])
    return [keypoints for _, _, keypoints in persons]


def ignored_keypoints(layouts: Sequence[Layout], max_persons: int | None) -> list[str]:
    """What a model will not see of the layouts' keypoints, as warnings: all of them (`max_persons` None: no
    keypoint model), or the persons of a layout beyond `max_persons`."""
    counts = [sum(e.keypoints is not None for e in layout.entities) for layout in layouts]
    if max_persons is None:
        return ["keypoints are ignored: the model grounds no keypoints"] if any(counts) else []
    return [f"layout {layout.prompt!r} has {count} persons with keypoints; the model grounds the {max_persons} largest"
            for layout, count in zip(layouts, counts) if count > max_persons]
