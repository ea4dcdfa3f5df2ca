"""`gligen ui`: the canvas conversions, and the page in a real browser on the bundled demo model.

The browser tests start `gligen ui --model demo` on a free localhost port and drive Debian's
headless Chromium with Playwright (no browser download). They are skipped only where Chromium
is not installed (`.ci/run` installs it with apt-get).

    GLIGEN_UI_SCREENSHOT=docs/ui.png python -m pytest tests/test_ui.py -k generate

also saves the page with its generated image (README's picture).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gligen.data.shapes import render, sample_scene
from gligen.layout import Layout, LayoutError, load_layouts
from gligen.ui.canvas import CANVAS_SIDE, blank_canvas, canvas_value, layout_dict, resized_canvas

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 600  # upper bounds: imports and the model load before the page is served, on a machine
GENERATE_S = 300  # that may be busy (about 15 s and 2 s when it is not)
STEPS = "25"  # the demo's scores are at 25
CHECK_LINE = "#layout-check [data-testid=markdown]"  # the page's line about its layout


# ----------------------------------------------------------------------------- canvas (no browser)


def test_canvas_round_trip_keeps_the_layout():
    layout = Layout("a cat and a dog", entities=(), width=32, height=48, seed=3, meta={"name": "pets"})
    layout = Layout.from_dict({**layout.to_dict(), "entities": [
        {"phrase": "a cat", "box": [0.1, 0.25, 0.5, 0.75]}, {"phrase": "a dog", "box": [0.5, 0.0, 1.0, 1.0]}]})
    value = canvas_value(layout)
    assert value["image"].size == (32 * 11, 48 * 11)  # the longer side enlarged to about CANVAS_SIDE
    assert [box["label"] for box in value["boxes"]] == ["a cat", "a dog"]
    back = Layout.from_dict(layout_dict(value["boxes"], value["image"].size, layout.prompt, "", 32, 48, 3,
                                        dict(layout.meta)))
    assert back.meta == {"name": "pets"} and (back.width, back.height, back.seed) == (32, 48, 3)
    assert back.phrases == layout.phrases
    np.testing.assert_allclose(back.boxes, layout.boxes, atol=0.5 / (11 * 32))  # half a canvas pixel


def test_canvas_sizes_and_resize():
    assert blank_canvas(512, 512).size == (CANVAS_SIDE, CANVAS_SIDE)
    assert blank_canvas(1024, 768).size == (1024, 768)  # never shrunk
    photo = Image.new("RGB", (640, 480), (200, 10, 10))
    assert blank_canvas(32, 32, photo).getpixel((5, 5)) == (200, 10, 10)
    value = {"image": blank_canvas(32, 32), "boxes": [{"xmin": 64, "ymin": 128, "xmax": 256, "ymax": 512,
                                                       "label": "a cat", "color": (1, 2, 3)}]}
    wide = resized_canvas(value, 64, 32)
    assert wide["image"].size == (512, 256)
    assert wide["boxes"] == [{"xmin": 64, "ymin": 64, "xmax": 256, "ymax": 256, "label": "a cat", "color": (1, 2, 3)}]


def test_the_canvas_layout_is_checked_like_a_layout_file():
    boxes = [{"xmin": 10, "ymin": 10, "xmax": 100, "ymax": 100, "label": ""}]
    with pytest.raises(LayoutError, match=r"^layout: entity 0: empty phrase$"):
        Layout.from_dict(layout_dict(boxes, (512, 512), "", "", 32, 32, 0))
    with pytest.raises(LayoutError, match=r"'width' must be a positive multiple of 8, got 30"):
        Layout.from_dict(layout_dict([], (512, 512), "", "", 30, 32, 0))


def test_ui_refuses_a_port_in_use_in_one_line():
    with closing(socket.create_server(("127.0.0.1", 0))) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gligen.cli", "ui", "--port", str(port)],
                                capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gligen: error: cannot serve on 127.0.0.1:{port} (Address already in use); choose another with --port"]


# ----------------------------------------------------------------------------- the page in Chromium


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`gligen ui --model demo` on a free localhost port: its URL."""
    log_path = tmp_path_factory.mktemp("ui") / "server.log"
    with closing(socket.create_server(("127.0.0.1", 0))) as probe:
        port = probe.getsockname()[1]
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "gligen.cli", "ui", "--model", "demo", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=_env())
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"gligen ui exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gligen ui did not serve {url} within {SERVER_START_S} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.goto(server)
    page.wait_for_selector("#canvas canvas")
    _wait_for_check(page, "Layout:")
    yield page
    context.close()


def test_draw_generate_and_download(page, tmp_path):
    image = _image_rect(page)
    drawn = {phrase: _draw(page, image, box, phrase) for phrase, box in
             [("a red circle", (0.08, 0.10, 0.45, 0.50)), ("a blue star", (0.52, 0.40, 0.92, 0.88))]}
    page.locator("#prompt textarea").fill("a red circle and a blue star")
    _wait_for_check(page, "2 entities, 64x64")
    page.locator("#layout-json .cm-content", has_text='"prompt": "a red circle and a blue star"').wait_for()

    layout_file = _download(page, "#download-layout", tmp_path)
    [layout] = load_layouts(layout_file)  # what `gligen generate --layout` reads
    assert layout.prompt == "a red circle and a blue star" and (layout.width, layout.height) == (64, 64)
    assert sorted(layout.phrases) == sorted(drawn)
    width, height = image[2:]
    for entity in layout.entities:
        on_screen = np.array(entity.box) * [width, height, width, height]
        np.testing.assert_allclose(on_screen, drawn[entity.phrase], atol=1.0)  # within 1 px of the mouse

    page.locator("#steps input").fill(STEPS)
    page.locator("#generate").click()
    size = _generated_size(page)
    assert size == [64, 64]
    assert "verified:" in page.inner_text("#status")
    record = json.loads(_download(page, "#files a[download='gligen.json']", tmp_path).read_text())
    assert record["image"] == "gligen.png" and record["model"] == "demo" and record["settings"]["steps"] == int(STEPS)
    assert record["layout"]["entities"] == json.loads(layout_file.read_text())["entities"]
    assert [e["phrase"] for e in record["verification"]["entities"]] == layout.phrases
    with Image.open(_download(page, "#files a[download='gligen.png']", tmp_path)) as png:
        assert png.size == (64, 64)
    if os.environ.get("GLIGEN_UI_SCREENSHOT"):
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=os.environ["GLIGEN_UI_SCREENSHOT"])


def test_bad_layouts_show_their_message(page, tmp_path):
    image = _image_rect(page)
    _draw(page, image, (0.2, 0.2, 0.6, 0.6), "")  # a box left without a phrase
    _wait_for_check(page, "empty phrase")
    assert page.inner_text(CHECK_LINE).strip() == "Layout: layout: entity 0: empty phrase"
    page.locator("#generate").click()
    _shows_error(page, "layout: entity 0: empty phrase")

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompt": "a cat", "width": 32, "height": 32,
                               "entities": [{"phrase": "a cat", "box": [0.5, 0.2, 0.5, 0.6]}]}))
    with pytest.raises(LayoutError) as expected:
        load_layouts(bad)
    page.get_by_role("tab", name="Open a layout").click()
    page.locator("#open-layout input[type=file]").set_input_files(str(bad))
    _shows_error(page, str(expected.value).replace(str(bad), "bad.json"))  # the file's own message
    assert "has x1 <= x0" in str(expected.value)

    page.locator("#open-layout button[aria-label='Clear']").click()  # the page keeps serving
    good = tmp_path / "layouts.jsonl"
    layouts = [{"prompt": "one", "width": 32, "height": 32, "seed": 1,
                "entities": [{"phrase": "a red square", "box": [0.1, 0.1, 0.4, 0.4]}]},
               {"prompt": "two", "width": 32, "height": 64, "seed": 2, "name": "tall",
                "entities": [{"phrase": "a green ring", "box": [0.5, 0.25, 0.75, 0.5]},
                             {"phrase": "a blue cross", "box": [0.0, 0.5, 1.0, 1.0]}]}]
    good.write_text("".join(json.dumps(layout) + "\n" for layout in layouts))
    page.locator("#open-layout input[type=file]").set_input_files(str(good))
    _wait_for_check(page, "1 entity, 32x32")
    page.locator("#pick-layout input").click()
    page.get_by_role("option", name="1: tall").click()
    _wait_for_check(page, "2 entities, 32x64")
    [picked] = load_layouts(_download(page, "#download-layout", tmp_path))
    [expected_layout] = load_layouts(good)[1:]
    assert (picked.prompt, picked.seed, picked.meta, picked.phrases) == ("two", 2, {"name": "tall"},
                                                                         expected_layout.phrases)
    np.testing.assert_allclose(picked.boxes, expected_layout.boxes, atol=0.5 / 512)


def test_layout_from_a_photo(page, tmp_path):
    photo, truth = render(sample_scene(0, 0), size=64)
    photo.save(tmp_path / "shapes.png")
    page.get_by_role("tab", name="From a photo").click()
    page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "shapes.png"))
    page.locator("#phrases textarea").fill("\n".join(truth.phrases))
    page.locator("#find-layout").click()
    _wait_for_check(page, f"{len(truth.entities)} entities")
    [found] = load_layouts(_download(page, "#download-layout", tmp_path))
    assert found.phrases == truth.phrases
    for box, true_box in zip(found.boxes, truth.boxes):
        assert _iou(box, true_box) > 0.7


def test_two_sessions_at_once(browser, server):
    pages = []
    for seed in (11, 12):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.goto(server)
        page.wait_for_selector("#canvas canvas")
        _draw(page, _image_rect(page), (0.1, 0.1, 0.6, 0.7), "a yellow square")
        page.locator("#seed input").fill(str(seed))
        page.locator("#steps input").fill(STEPS)
        pages.append(page)
    for page in pages:
        page.locator("#generate").click()
    for seed, page in zip((11, 12), pages):
        assert _generated_size(page) == [64, 64]
        assert f"(seed {seed})" in page.inner_text("#status")
        page.context.close()


def test_edit_a_photo_by_phrase(page, tmp_path):
    """Replace what the bundled detector finds in the shapes scene; outside its box (grown by the feather) the
    photo is kept exactly."""
    scene = ROOT / "examples" / "shapes_scene.png"
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-photo input[type=file]").set_input_files(str(scene))
    page.locator("#edit-phrase textarea").fill("a black star")
    page.locator("#edit-with textarea").fill("a blue square")
    page.locator("#edit-steps input").fill(STEPS)
    page.locator("#edit").click()
    page.wait_for_function("document.querySelector('#edit-result img')?.naturalWidth > 0", timeout=GENERATE_S * 1000)
    assert page.evaluate("document.querySelector('#edit-mask img').naturalWidth") > 0  # the mask is shown
    assert "Replaced 'a black star'" in page.inner_text("#edit-status")
    record = json.loads(_download(page, "#edit-files a[download='edit.json']", tmp_path).read_text())
    [edit] = record["edits"]
    assert (edit["edit"], edit["phrase"], edit["with"], record["model"]) == ("replace", "a black star", "a blue square",
                                                                              "demo")
    with Image.open(scene) as photo, Image.open(_download(page, "#edit-files a[download='edit.png']", tmp_path)) as png:
        before, after = np.asarray(photo.convert("RGB"), dtype=int), np.asarray(png.convert("RGB"), dtype=int)
    assert after.shape == before.shape
    changed_rows, changed_columns = np.nonzero(np.abs(after - before).max(axis=-1))
    assert len(changed_rows) > 0
    x0, y0, x1, y1 = np.array(edit["detections"][0]["box"]) * ([after.shape[1], after.shape[0]] * 2)
    feather = record["settings"]["feather"]
    assert changed_columns.min() >= np.floor(x0) - feather and changed_columns.max() < np.ceil(x1) + feather
    assert changed_rows.min() >= np.floor(y0) - feather and changed_rows.max() < np.ceil(y1) + feather


# ----------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "GRADIO_ANALYTICS_ENABLED": "False"}


def _image_rect(page) -> tuple[float, float, float, float]:
    """(left, top, width, height) on the page of the canvas's image, found in a screenshot of the canvas element:
    the rows and columns mostly of the blank canvas's grey."""
    canvas = page.locator("#canvas canvas")
    box = canvas.bounding_box()
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(int)
    grey = np.abs(shot - np.array(blank_canvas(8, 8).getpixel((1, 1)))).sum(-1) <= 6
    columns, rows = np.nonzero(grey.mean(0) > 0.5)[0], np.nonzero(grey.mean(1) > 0.5)[0]
    scale = box["width"] / shot.shape[1]  # screenshot pixels per CSS pixel are 1 here, but say so
    return (box["x"] + columns[0] * scale, box["y"] + rows[0] * scale, (columns[-1] + 1 - columns[0]) * scale,
            (rows[-1] + 1 - rows[0]) * scale)


def _draw(page, image: tuple[float, float, float, float], box: tuple[float, ...], phrase: str) -> tuple[float, ...]:
    """Drag a box (fractions of the image) with the mouse, then name it in the annotator's dialog.

    Returns the box the mouse drew, in page pixels from the image's top-left corner."""
    left, top, width, height = image
    x0, y0, x1, y1 = (round(left + box[0] * width), round(top + box[1] * height), round(left + box[2] * width),
                      round(top + box[3] * height))
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y1, steps=4)
    page.mouse.up()
    dialog = page.locator("#model-box-edit")
    dialog.locator("input[aria-label=Label]").fill(phrase)
    dialog.get_by_role("button", name="OK").click()
    dialog.wait_for(state="hidden")
    return x0 - left, y0 - top, x1 - left, y1 - top


def _download(page, selector: str, folder: Path) -> Path:
    with page.expect_download() as download:
        page.locator(selector).click()
    path = folder / download.value.suggested_filename
    download.value.save_as(path)
    return path


def _generated_size(page) -> list[int]:
    """The natural size of the generated image, once it is shown."""
    page.wait_for_function("document.querySelector('#image img')?.naturalWidth > 0", timeout=GENERATE_S * 1000)
    return page.evaluate("[document.querySelector('#image img').naturalWidth, "
                         "document.querySelector('#image img').naturalHeight]")


def _wait_for_check(page, text: str) -> None:
    """Wait until the page's line about its layout says `text`."""
    page.locator(CHECK_LINE, has_text=text).wait_for(timeout=GENERATE_S * 1000)


def _shows_error(page, message: str) -> None:
    """Wait until an error message of the page reads `message` exactly."""
    shown = page.locator("[data-testid=toast-text].error", has_text=message).first
    shown.wait_for(timeout=GENERATE_S * 1000)
    assert shown.inner_text().strip() == message


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
