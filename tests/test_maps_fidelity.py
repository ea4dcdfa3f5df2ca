"""Condition fidelity: an identical map scores perfectly, a shifted one worse, for every condition type."""

import numpy as np
import pytest
from PIL import Image

from gligen.errors import UserError
from gligen.layout import Layout
from gligen.maps.extract import canny, normals_from_depth
from gligen.maps.fidelity import HIGHER_IS_BETTER, fidelity, score_images


def reference_maps():
    edges = np.zeros((48, 48), np.uint8)
    edges[10:38, 12] = edges[10:38, 35] = edges[10, 12:36] = edges[37, 12:36] = 255
    yy, xx = np.mgrid[0:48, 0:48]
    depth = (40 + 200 * np.exp(-((xx - 20) ** 2 + (yy - 24) ** 2) / 150)).astype(np.uint8)
    labels = np.zeros((48, 48), np.uint8)
    labels[:, 20:] = 3
    labels[30:, :] = 150
    return {"canny": edges, "hed": edges, "depth": depth, "normal": np.asarray(normals_from_depth(depth.astype(float))),
            "sem": labels}


PERFECT = {"canny": 1.0, "hed": 1.0, "depth": 0.0, "normal": 0.0, "sem": 1.0}


@pytest.mark.parametrize("kind", list(PERFECT))
def test_identical_is_perfect_and_shifted_is_worse(kind):
    reference = reference_maps()[kind]
    assert fidelity(kind, reference, reference) == pytest.approx(PERFECT[kind], abs=1e-4)  # arccos near 1: ~1e-7 degrees
    shifted = np.roll(reference, 6, axis=1)
    worse = fidelity(kind, shifted, reference)
    assert (worse < PERFECT[kind]) if HIGHER_IS_BETTER[kind] else (worse > PERFECT[kind])
    assert fidelity(kind, np.roll(reference, 1, axis=1), reference) != pytest.approx(worse)  # it grades the shift


def test_edges_within_the_tolerance_count():
    edges = reference_maps()["canny"]
    assert fidelity("canny", np.roll(edges, 2, axis=0), edges, tolerance=2) == 1.0
    assert fidelity("canny", np.roll(edges, 2, axis=0), edges, tolerance=1) < 1.0


def test_depth_error_ignores_a_global_scale():
    depth = reference_maps()["depth"].astype(np.float64)
    assert fidelity("depth", depth * 3, depth) < 0.2 * fidelity("depth", np.roll(depth, 6, axis=1), depth)


def test_sizes_must_agree():
    with pytest.raises(UserError, match="differ in size"):
        fidelity("canny", np.zeros((4, 4)), np.zeros((4, 5)))


def test_score_images_runs_the_extractor_on_each_image(tmp_path):
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[8:24, 8:24] = 220
    Image.fromarray(picture).save(tmp_path / "generated.png")
    Image.fromarray(np.roll(picture, 5, axis=1)).save(tmp_path / "moved.png")
    canny(Image.fromarray(picture)).save(tmp_path / "map.png")
    layout = Layout.from_dict({"prompt": "a box", "width": 32, "height": 32,
                               "condition": {"type": "canny", "image": "map.png"}}, "layout", tmp_path)
    scores = score_images([(layout, tmp_path / "generated.png"), (layout, tmp_path / "moved.png")], canny)
    assert scores["canny maps"] == 2 and 0.4 < scores["canny edge_f1"] < 1.0
    assert score_images([(layout, tmp_path / "generated.png")], canny)["canny edge_f1"] == 1.0
