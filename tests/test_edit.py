"""Masks in layouts and inpainting (issue 14 item 2) and `gligen edit` (item 3), on tiny saved models."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from detector.rle import decode
from gligen.cli import main
from gligen.errors import UserError
from gligen.layout import Layout, LayoutError, load_layouts
from gligen.masks import (box_mask, box_pixels, entity_mask, feather_weights, latent_keep_mask, polygon_mask,
                          union_mask)
from gligen.pipeline import GligenPipeline

SIZE = 16  # the tiny pipeline's image side (8x8 latents: one latent cell is 2x2 pixels)
TRIANGLE = [[0, 0], [1, 0], [0, 1]]  # on 4x4 pixels: the centres with x + y < 4, i.e. row + column <= 2


def picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if not isinstance(image, Image.Image) else image, dtype=np.int16)


# --- masks in layouts ---


def test_polygon_mask_takes_the_pixels_whose_centres_are_inside():
    rows, columns = np.indices((4, 4))
    assert np.array_equal(polygon_mask(TRIANGLE, 4, 4), rows + columns <= 2)
    square = [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]
    expected = np.zeros((SIZE, SIZE), dtype=bool)
    expected[4:12, 4:12] = True
    assert np.array_equal(polygon_mask(square, SIZE, SIZE), expected)
    assert np.array_equal(box_mask([(0.25, 0.25, 0.75, 0.75)], (SIZE, SIZE)).numpy() == 0, expected)


def test_layout_masks_from_polygons_and_pngs_round_trip(tmp_path):
    drawn = np.zeros((8, 8), dtype=np.uint8)
    drawn[2:5, 1:7] = 255
    Image.fromarray(drawn).save(tmp_path / "cup.png")
    layout_dict = {"prompt": "p", "width": SIZE, "height": SIZE, "box_units": "pixels", "entities": [
        {"phrase": "a sail", "box": [0, 0, 8, 8], "mask": [[0, 0], [4, 0], [0, 4]]},
        {"phrase": "a cup", "box": [0, 0, 16, 16], "mask": "cup.png"},
        {"phrase": "a dog", "box": [12, 12, 16, 16]},
    ]}
    (tmp_path / "layout.json").write_text(json.dumps(layout_dict))
    [layout] = load_layouts(tmp_path / "layout.json")
    sail, cup, dog = layout.entities
    assert sail.mask == ((0.0, 0.0), (0.25, 0.0), (0.0, 0.25))  # pixels -> normalized, as boxes
    assert cup.mask == str(tmp_path / "cup.png")
    rows, columns = np.indices((SIZE, SIZE))
    assert np.array_equal(entity_mask(sail, SIZE, SIZE), rows + columns <= 2)
    png = np.zeros((SIZE, SIZE), dtype=bool)
    png[4:10, 2:14] = True  # the 8x8 PNG enlarged twice (nearest neighbour)
    assert np.array_equal(entity_mask(cup, SIZE, SIZE), png)
    assert np.array_equal(entity_mask(dog, SIZE, SIZE), (rows >= 12) & (columns >= 12))  # no mask: its box
    assert np.array_equal(union_mask(layout.entities, SIZE, SIZE), (rows + columns <= 2) | png | (rows >= 12) & (columns >= 12))
    again = Layout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout


@pytest.mark.parametrize("mask, message", [
    ([[0.1, 0.1], [0.5, 0.5]], "mask polygon has 2 point(s); a polygon needs at least 3"),
    ([[0.1, 0.1], [0.5, 0.1], [0.5, 1.2]], "mask point 2 [0.5, 1.2] lies outside the image"),
    ([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]], "mask polygon spans no area"),
    ([[0.1, 0.1], [0.5, "a"], [0.3, 0.3]], "mask point 1 [0.5, 'a'] has a NaN, infinite, huge or non-number"),
    ("missing.png", "mask image not found"),
    ("broken.png", "broken.png: cannot read the image"),
    (3, "'mask' must be a mask image path or a polygon"),
])
def test_bad_masks_are_one_line_naming_the_entity(tmp_path, mask, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    layout = {"prompt": "p", "entities": [{"phrase": "a dog", "box": [0, 0, 1, 1], "mask": mask}]}
    (tmp_path / "bad.json").write_text(json.dumps(layout))
    with pytest.raises(LayoutError) as error:
        load_layouts(tmp_path / "bad.json")
    text = str(error.value)
    assert text.startswith(f"{tmp_path / 'bad.json'}: entity 0 ('a dog'): ") and "\n" not in text
    assert message in text


def test_a_latent_cell_is_repainted_when_any_of_its_pixels_is():
    dot = np.zeros((SIZE, SIZE), dtype=bool)
    dot[5, 9] = True  # one pixel: cell (2, 4) of 2x2-pixel cells
    layout = Layout("p", width=SIZE, height=SIZE)
    keep = latent_keep_mask(layout, dot, (8, 8), 2)
    assert keep[2, 4] == 0 and keep.sum() == 63
    polygon = Layout.from_dict({"prompt": "p", "width": SIZE, "height": SIZE, "entities": [
        {"phrase": "a", "box": [0.5, 0.5, 1, 1]},
        {"phrase": "b", "box": [0, 0, 0.5, 0.5], "mask": TRIANGLE_SMALL}]})
    keep = latent_keep_mask(polygon, None, (8, 8), 2)
    expected = box_mask([(0.5, 0.5, 1, 1)], (8, 8))  # the box keeps diffusers' cells
    cells = torch.from_numpy(polygon_mask(TRIANGLE_SMALL, SIZE, SIZE)).reshape(8, 2, 8, 2).any(3).any(1)
    expected[cells] = 0
    assert torch.equal(keep, expected)
    boxes = Layout.from_dict({"prompt": "p", "width": SIZE, "height": SIZE,
                              "entities": [{"phrase": "a", "box": [0.1, 0.3, 0.55, 0.9]}]})
    assert torch.equal(latent_keep_mask(boxes, None, (8, 8), 2), box_mask(boxes.boxes, (8, 8)))  # unchanged


TRIANGLE_SMALL = [[0.05, 0.05], [0.45, 0.05], [0.05, 0.45]]


def test_feather_weights_ramp_from_the_mask():
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    weights = feather_weights(mask, 2)
    rows, columns = np.indices((9, 9))
    distance = np.maximum(abs(rows - 4), abs(columns - 4))
    assert torch.allclose(weights, torch.from_numpy(np.clip(3 - distance, 0, None) / 3).float())
    assert torch.equal(feather_weights(mask, 0), torch.from_numpy(mask).float())


# --- keep_outside in the pipeline ---


@pytest.fixture(scope="module")
def pipeline(gligen_dir):
    return GligenPipeline.from_pretrained(str(gligen_dir))


def test_keep_outside_keeps_every_pixel_outside_the_grown_mask(pipeline):
    image = picture(1)
    layout = Layout.from_dict({"prompt": "a cat", "width": SIZE, "height": SIZE, "seed": 4, "entities": [
        {"phrase": "a cat", "box": [0.25, 0.2, 0.6, 0.7], "mask": [[0.3, 0.25], [0.55, 0.3], [0.4, 0.65]]}]})
    free = np.zeros((SIZE, SIZE), dtype=bool)
    free[9:14, 2:7] = True
    for mask, region in ((None, union_mask(layout.entities, SIZE, SIZE)), (free, free)):
        for feather in (0, 3):
            out = pixels(pipeline(layout, num_inference_steps=3, inpaint_image=image, inpaint_mask=mask,
                                  keep_outside=True, feather=feather).images[0])
            outside = feather_weights(region, feather).numpy() == 0
            assert 0 < outside.sum() < outside.size
            assert np.array_equal(out[outside], pixels(image)[outside])
            assert np.abs(out[region] - pixels(image)[region]).max() > 0
    blended = pixels(pipeline(layout, num_inference_steps=3, inpaint_image=image).images[0])
    assert np.abs(blended - pixels(image)).max() > 0  # without keep_outside the model redraws the image


def test_inpaint_mask_replaces_the_entities_region(pipeline):
    layout = Layout.from_dict({"prompt": "a cat", "width": SIZE, "height": SIZE, "seed": 1,
                               "entities": [{"phrase": "a cat", "box": [0.1, 0.1, 0.5, 0.5]}]})
    free = np.zeros((SIZE, SIZE), dtype=bool)
    free[10:13, 11:16] = True
    generator = [torch.Generator().manual_seed(0)]
    for given in (free, torch.from_numpy(free), Image.fromarray(free.astype(np.uint8) * 255)):
        inpainting = pipeline.prepare_inpainting([layout], [picture()], generator, [given])
        expected = ~torch.from_numpy(free).reshape(8, 2, 8, 2).any(3).any(1)
        assert torch.equal(inpainting.mask[0, 0], expected.float())
    with pytest.raises(UserError, match="need an image to repaint"):
        pipeline(layout, num_inference_steps=1, keep_outside=True)
    with pytest.raises(UserError, match="2 inpainting masks for 1 layouts"):
        pipeline(layout, num_inference_steps=1, inpaint_image=picture(), inpaint_mask=[free, free])
    masked = Layout.from_dict({**layout.to_dict(), "entities": [{"phrase": "a cat", "box": [0.1, 0.1, 0.5, 0.5],
                                                                "mask": [[0.1, 0.1], [0.5, 0.1], [0.1, 0.5]]}]})
    with pytest.warns(UserWarning, match="entity masks are ignored: they choose what inpainting repaints"):
        pipeline(masked, num_inference_steps=1)


def test_generate_cli_inpaint_mask_keep_outside_and_feather(gligen_dir, tmp_path, capsys):
    picture(2).save(tmp_path / "photo.png")
    free = np.zeros((SIZE, SIZE), dtype=np.uint8)
    free[2:8, 3:12] = 255
    Image.fromarray(free).save(tmp_path / "mask.png")
    (tmp_path / "l.json").write_text(json.dumps({"prompt": "a cat", "width": SIZE, "height": SIZE, "entities": [
        {"phrase": "a cat", "box": [0.2, 0.1, 0.75, 0.5]}]}))
    argv = ["generate", "--device", "cpu", "--steps", "2", "--model", str(gligen_dir), "--layout", str(tmp_path / "l.json")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--inpaint-image", str(tmp_path / "photo.png"),
                 "--inpaint-mask", str(tmp_path / "mask.png"), "--keep-outside", "--feather", "2"]) == 0
    outside = feather_weights(free > 0, 2).numpy() == 0
    out = pixels(tmp_path / "out" / "l.png")
    assert np.array_equal(out[outside], pixels(tmp_path / "photo.png")[outside])
    settings = json.loads((tmp_path / "out" / "l.json").read_text())["settings"]
    assert (settings["inpaint_mask"], settings["keep_outside"], settings["feather"]) == (str(tmp_path / "mask.png"), True, 2)
    assert main([*argv, "--out", str(tmp_path / "bad"), "--keep-outside"]) == 1
    assert capsys.readouterr().err.strip().endswith("--inpaint-mask and --keep-outside go with --inpaint-image")


# --- gligen edit ---


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from tests.tiny_detector import save_tiny_detector

    return save_tiny_detector(tmp_path_factory.mktemp("detector") / "tiny", shortest_edge=96, longest_edge=160)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    picture(0).save(path)
    return path


def edit(gligen_dir, detector_dir, image, out, *edits):
    """Run `gligen edit` in this process; its exit status."""
    argv = ["edit", str(image), "--model", str(gligen_dir), "--detector", str(detector_dir), "--out", str(out),
            "--device", "cpu", "--steps", "2", "--feather", "1", *map(str, edits)]
    try:
        return main(argv)
    except SystemExit as usage_error:
        return usage_error.code


def detections(detector_dir, image, phrase):
    from detector.detect import OpenSetDetector

    [found] = OpenSetDetector.from_pretrained(str(detector_dir)).detect(Image.open(image).convert("RGB"), [phrase])
    return found


@pytest.mark.parametrize("edits, painted", [
    (["--replace", "a cat", "--with", "a dog"], "a dog"),
    (["--remove", "a cat", "--prompt", "grass"], None),
    (["--move", "a cat", "--to", "0.5,0.5,0.9,0.9"], "a cat"),
    (["--add", "a red ball", "--box", "0.1,0.5,0.4,0.9"], "a red ball"),
])
def test_each_edit_writes_an_image_an_overlay_and_a_record(gligen_dir, detector_dir, photo, tmp_path, edits, painted):
    out = tmp_path / "out"
    assert edit(gligen_dir, detector_dir, photo, out, *edits) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo.json", "photo.overlay.png", "photo.png"]
    record = json.loads((out / "photo.json").read_text())
    [step] = record["edits"]
    kind = edits[0].removeprefix("--")
    assert step["edit"] == kind and record["seed"] == 0 and record["detector"] == str(detector_dir)
    assert record["settings"]["keep_outside"] is True and record["settings"]["feather"] == 1
    edited, original = pixels(out / "photo.png"), pixels(photo)
    assert edited.shape == original.shape
    region = np.zeros((SIZE, SIZE), dtype=bool)
    if kind != "add":
        found = detections(detector_dir, photo, "a cat")
        [used] = step["detections"]
        assert used["box"] == [round(v, 6) for v in found.boxes[0].tolist()]
        assert used["score"] == round(float(found.scores[0]), 6)
        region |= box_pixels(used["box"], SIZE, SIZE)
        assert np.array_equal(decode(used["mask"]), box_pixels(found.boxes[0].tolist(), SIZE, SIZE))  # no segmenter
    for box in step["painted"]:
        region |= box_pixels(box, SIZE, SIZE)
    assert bool(step["painted"]) == (painted is not None) and step.get("with", step["phrase"]) == (painted or "a cat")
    outside = feather_weights(region, 1).numpy() == 0
    assert np.array_equal(edited[outside], original[outside])
    assert np.abs(edited[region] - original[region]).max() > 0
    overlay = np.asarray(Image.open(out / "photo.overlay.png"))
    assert overlay.shape[0] > SIZE and not np.array_equal(overlay, np.asarray(
        Image.open(out / "photo.png").resize(overlay.shape[1::-1], Image.NEAREST)))


def test_several_edits_apply_in_order_each_on_the_previous_result(gligen_dir, detector_dir, photo, tmp_path):
    first = ["--replace", "a cat", "--with", "a dog"]
    second = ["--remove", "a dog"]
    assert edit(gligen_dir, detector_dir, photo, tmp_path / "both", *first, *second) == 0
    assert edit(gligen_dir, detector_dir, photo, tmp_path / "one", *first) == 0
    assert edit(gligen_dir, detector_dir, tmp_path / "one" / "photo.png", tmp_path / "two", *second) == 0
    assert np.array_equal(pixels(tmp_path / "both" / "photo.png"), pixels(tmp_path / "two" / "photo.png"))
    record = json.loads((tmp_path / "both" / "photo.json").read_text())
    assert [(s["edit"], s["phrase"]) for s in record["edits"]] == [("replace", "a cat"), ("remove", "a dog")]
    alone = json.loads((tmp_path / "two" / "photo.json").read_text())
    assert record["edits"][1]["detections"] == alone["edits"][0]["detections"]


def test_all_edits_every_instance_found(gligen_dir, detector_dir, photo, tmp_path):
    assert edit(gligen_dir, detector_dir, photo, tmp_path / "out", "--replace", "a cat", "--with", "a dog", "--all",
                "--box-threshold", "0.7") == 0
    [step] = json.loads((tmp_path / "out" / "photo.json").read_text())["edits"]
    found = detections(detector_dir, photo, "a cat")
    assert len(step["detections"]) == int((found.scores >= 0.7).sum()) > 1
    assert step["painted"] == [d["box"] for d in step["detections"]]


def test_a_phrase_not_found_is_one_line_and_writes_nothing(gligen_dir, detector_dir, photo, tmp_path, capsys):
    out = tmp_path / "out"
    assert edit(gligen_dir, detector_dir, photo, out, "--remove", "a cat", "--box-threshold", "0.99") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    best = float(detections(detector_dir, photo, "a cat").scores.max())
    assert err == (f"gligen: error: edit 1 (--remove 'a cat'): 'a cat' not found (the best score seen is {best:.3f}; "
                   "an instance needs the box threshold 0.99 and the text threshold 0.25)")
    capsys.readouterr()
    # a later edit that fails leaves nothing either, although the first one was made
    assert edit(gligen_dir, detector_dir, photo, out, "--add", "a hat", "--box", "0,0,0.5,0.5",
                "--remove", "a cat", "--box-threshold", "0.99") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"gligen: error: edit 2 \(--remove 'a cat'\): 'a cat' not found \(the best score seen is "
                        r"0\.\d{3}; an instance needs the box threshold 0\.99 and the text threshold 0\.25\)", err)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("edits, message, status", [
    (["--with", "a dog"], "--with must follow --replace, once for each", 2),
    (["--remove", "a cat", "--box", "0,0,1,1"], "--box must follow --add, once for each", 2),
    (["--add", "a hat", "--box", "0.5,0,0.2,1"], "must be x0,y0,x1,y1 in [0, 1] with x0 < x1", 2),
    (["--replace", "a cat"], "error: --replace 'a cat': give --with PHRASE after it", 1),
    ([], "give at least one edit", 1),
    (["--move", "a cat", "--to", "0,0,1,1", "--all"], "--move moves one instance; drop --all", 1),
])
def test_bad_edits_are_one_line(gligen_dir, detector_dir, photo, tmp_path, capsys, edits, message, status):
    assert edit(gligen_dir, detector_dir, photo, tmp_path / "out", *edits) == status
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_move_gives_a_text_image_box_model_the_cut_out(tmp_path, detector_dir, photo):
    from gligen.edit import Found, cut_out
    from tests.tiny import save_tiny_sd, save_text_image_box_adapter

    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[4:6, 5:7] = True
    piece = pixels(cut_out(Image.open(photo).convert("RGB"), Found((0.25, 0.25, 0.5, 0.5), 0.9, mask)))
    expected = np.full((4, 4, 3), 255, dtype=np.int16)
    expected[:2, 1:3] = pixels(photo)[4:6, 5:7]
    assert np.array_equal(piece, expected)

    sd = save_tiny_sd(tmp_path / "sd")
    adapter, clip = save_text_image_box_adapter(sd, tmp_path)
    out = tmp_path / "out"
    assert edit(sd, detector_dir, photo, out, "--adapter", adapter, "--image-encoder", clip,
                "--move", "a cat", "--to", "0.5,0.5,0.9,0.9") == 0
    record = json.loads((out / "photo.json").read_text())
    assert record["adapter"] == str(adapter) and record["edits"][0]["painted"] == [[0.5, 0.5, 0.9, 0.9]]


def test_a_segmenter_masks_what_is_found(gligen_dir, detector_dir, photo, tmp_path):
    """With --segmenter, the SAM mask of the found box is the region repainted and the record holds it as RLE."""
    from detector import segment
    from tests.tiny_segmenter import save_tiny_sam

    sam = save_tiny_sam(tmp_path / "sam")
    out = tmp_path / "out"
    assert edit(gligen_dir, detector_dir, photo, out, "--segmenter", sam, "--replace", "a cat", "--with", "a dog") == 0
    record = json.loads((out / "photo.json").read_text())
    [used] = record["edits"][0]["detections"]
    boxes = detections(detector_dir, photo, "a cat").boxes[:1]
    [expected] = segment.Segmenter.from_pretrained(str(sam)).segment([Image.open(photo).convert("RGB")], [boxes])
    mask = decode(used["mask"])
    assert record["segmenter"] == str(sam) and np.array_equal(mask, expected[0].numpy() if expected[0].any()
                                                              else box_pixels(used["box"], SIZE, SIZE))
    outside = feather_weights(mask, 1).numpy() == 0
    assert np.array_equal(pixels(out / "photo.png")[outside], pixels(photo)[outside])
