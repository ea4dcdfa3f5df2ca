"""COCO person keypoints as plain data: names, the left-right mirror, the skeleton, OKS sigmas.

A person's keypoints are 17 (x, y, v) in COCO's order, x and y normalized to the image
(origin top-left), v = 0 for a point not given (not labelled, invisible, cropped out) and
1 or 2 for a given one (COCO: labelled but occluded, labelled and visible). No torch here:
layouts are checked with these facts before any network is imported.
"""

from __future__ import annotations

from typing import Any, Sequence

from gligen.errors import is_number

KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

# the index each keypoint takes in a mirrored image: left and right swap, the nose stays
FLIP_INDEX = tuple(
    KEYPOINT_NAMES.index(name.replace("left", "@").replace("right", "left").replace("@", "right"))
    for name in KEYPOINT_NAMES
)

# COCO's skeleton (its person category's `skeleton`, made 0-based): the limbs drawn on overlays
SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

Keypoint = tuple[float, float, int]
Keypoints = tuple[Keypoint, ...]


def is_given(point: Keypoint) -> bool:
    return point[2] > 0


def given_points(keypoints: Sequence[Keypoint]) -> list[tuple[float, float]]:
    """(x, y) of the points that are given (v > 0)."""
    return [(x, y) for x, y, v in keypoints if v > 0]


def flipped(keypoints: Sequence[Keypoint]) -> Keypoints:
    """The keypoints of the horizontally mirrored image: x -> 1 - x, left and right indices swapped."""
    mirrored = [(1.0 - x, y, v) if v else (0.0, 0.0, 0) for x, y, v in keypoints]
    return tuple(mirrored[FLIP_INDEX[k]] for k in range(NUM_KEYPOINTS))


def coco_keypoints(flat: Any, width: float, height: float) -> Keypoints | None:
    """COCO's flat [x1, y1, v1, ..., x17, y17, v17] in pixels -> normalized keypoints; None when malformed.

    A given point outside the image is taken as not given.
    """
    if not isinstance(flat, (list, tuple)) or len(flat) != 3 * NUM_KEYPOINTS:
        return None
    if not all(is_number(v) for v in flat):
        return None
    points = []
    for k in range(NUM_KEYPOINTS):
        x, y, v = flat[3 * k] / width, flat[3 * k + 1] / height, int(flat[3 * k + 2])
        given = v in (1, 2) and 0 <= x <= 1 and 0 <= y <= 1
        points.append((x, y, v) if given else (0.0, 0.0, 0))
    return tuple(points)
