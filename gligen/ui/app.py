"""The page of `gligen ui`, built with Gradio on models loaded once (`Models`).

The page is a set of tabs, each built by its own function from the same `Models`:
- Generate: draw boxes on a canvas of the layout's shape (a phrase per box), set the prompt and
  the sampling, and Generate shows the image, its overlay and, with a detector, the per-entity
  verification. The layout goes out and comes in as the layout file `gligen generate` reads
  (same schema, same messages), or comes from a photo through the detector.
- Edit (with a detector): upload a photo, name what to replace and with what (or to remove), and
  see the mask of what was found and the result, as `gligen edit` makes them.

Generation goes through `gligen.generate.generate_jobs` with the options of `gligen generate`,
and editing through `gligen.edit.Editor` with those of `gligen edit`, so an image's JSON record
is the one the command writes. Requests that use the models wait in
one queue (`MODEL_QUEUE`) and run one at a time; a failed request shows its message and the
page keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import torch
from gradio_image_annotation import image_annotator
from PIL import Image

from gligen import generate
from gligen.devices import suit_threads
from gligen.errors import UserError, require
from gligen.files import write_json
from gligen.layout import Layout, load_layouts
from gligen.pipeline import SCHEDULERS, GligenPipeline, make_scheduler
from gligen.ui.canvas import canvas_value, layout_dict, resized_canvas

MODEL_QUEUE = "model"  # the events that run the pipeline or the detector: one at a time
MODEL_SCHEDULER = "the model's"
JOB_NAME = "gligen"  # generated files: gligen.png, gligen.overlay.png, gligen.json
VERIFICATION_COLUMNS = ["entity", "phrase", "IoU", "score", "found"]
# small images (the demo's are 32x32) are shown enlarged, their pixels sharp
CSS = ("#image img, #overlay img, #verification img, #edit-mask img, #edit-result img {width: 100%; height: 100%; "
       "object-fit: contain; image-rendering: pixelated}")
EDIT_NAME = "edit"  # edited files: edit.png, edit.overlay.png, edit.json


@dataclass
class Models:
    """What the page runs on, loaded once: the pipeline, its own scheduler, the detector (or None)."""

    model: str
    adapter: str | None
    pipeline: GligenPipeline
    scheduler: Any  # the model's own, used when a request names none
    detector_name: str | None
    detector: Any  # detector.detect.OpenSetDetector

    @classmethod
    def load(cls, model: str, adapter: str | None, detector: str | None, device: torch.device,
             dtype: torch.dtype) -> Models:
        pipeline = GligenPipeline.from_pretrained(model, adapter, device=device, dtype=dtype)
        suit_threads(pipeline.unet, device)
        loaded = None
        if detector is not None:
            from detector.detect import OpenSetDetector

            loaded = OpenSetDetector.from_pretrained(detector, device=device)
        return cls(model, adapter, pipeline, pipeline.scheduler, detector, loaded)

    @property
    def image_size(self) -> tuple[int, int]:
        """The model's native (width, height): the size of a new layout."""
        side = self.pipeline.unet.config.sample_size
        height, width = (side, side) if isinstance(side, int) else side
        return width * self.pipeline.vae_scale_factor, height * self.pipeline.vae_scale_factor


def serve(models: Models, host: str, port: int) -> None:
    """Serve the page on host:port until Ctrl-C or SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="gligen-ui-") as workdir:
        app = build_app(models, Path(workdir))
        try:
            app.queue(default_concurrency_limit=None).launch(
                server_name=host, server_port=port, show_error=True, ssr_mode=False, theme=_theme(), css=CSS,
                allowed_paths=[workdir], footer_links=[],
            )
        finally:
            app.close()


def _theme() -> gr.themes.Base:
    """Gradio's default look with the system fonts: the page needs nothing from the network."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_app(models: Models, workdir: Path) -> gr.Blocks:
    """The page: a tab per job (Generate, Edit), each from its own builder."""
    with gr.Blocks(title="gligen") as app:
        gr.Markdown(f"## gligen: draw boxes, name them, generate\nModel `{models.model}`"
                    + (f", adapter `{models.adapter}`" if models.adapter else "")
                    + (f", detector `{models.detector_name}`" if models.detector_name else ", no detector"))
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                generate_tab(models, workdir)
            with gr.Tab("Edit", id="edit"):
                edit_tab(models, workdir)
    return app


# ----------------------------------------------------------------------------- the Generate tab


def generate_tab(models: Models, workdir: Path) -> None:
    """Canvas and settings on the left, results on the right; the layout in and out below the canvas."""
    width, height = models.image_size
    meta = gr.State({})  # keys of an opened layout beyond the page's fields (its "name", ...)
    background = gr.State(None)  # the photo a layout was found in, shown under the boxes
    with gr.Row():
        with gr.Column(scale=1):
            canvas = image_annotator(
                canvas_value(Layout("", width=width, height=height)), image_type="pil", label="Layout",
                sources=[], show_clear_button=False, show_download_button=False, show_remove_button=True,
                box_min_size=2, elem_id="canvas",
            )
            gr.Markdown("Drag on the canvas to draw a box and name what goes in it; drag a box to move it, "
                        "its corners to resize it; select it and press Delete to remove it.")
            check = gr.Markdown(elem_id="layout-check")
            prompt = gr.Textbox(label="Prompt", elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="negative")
            with gr.Row():
                width_box = gr.Number(width, label="Width", precision=0, step=8, minimum=8, elem_id="width")
                height_box = gr.Number(height, label="Height", precision=0, step=8, minimum=8, elem_id="height")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
            with gr.Row():
                steps = gr.Number(50, label="Steps", precision=0, minimum=1, elem_id="steps")
                guidance = gr.Number(7.5, label="Guidance", elem_id="guidance")
                schedule = gr.Textbox("0.3,0,0.7", label="Grounding schedule: beta, or a,b,c", elem_id="schedule")
                scheduler = gr.Dropdown([MODEL_SCHEDULER, *SCHEDULERS], value=MODEL_SCHEDULER, label="Scheduler",
                                        elem_id="scheduler")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                download = gr.DownloadButton("Download layout JSON", elem_id="download-layout")
            with gr.Tabs():
                with gr.Tab("Layout JSON"):
                    layout_json = gr.Code(language="json", label="layout.json (as gligen generate reads it)",
                                          elem_id="layout-json")
                with gr.Tab("Open a layout"):
                    upload = gr.File(label="Layout .json or .jsonl", file_types=[".json", ".jsonl"], type="filepath",
                                     elem_id="open-layout")
                    pick = gr.Dropdown([], label="Layout of the file", elem_id="pick-layout")
                    opened = gr.State([])
                with gr.Tab("From a photo"):
                    photo = gr.Image(label="Photo", type="pil", sources=["upload"], elem_id="photo")
                    caption = gr.Textbox(label="Caption (its noun phrases are located)", elem_id="caption")
                    phrases = gr.Textbox(label="or phrases, one a line", lines=3, elem_id="phrases")
                    find = gr.Button("Find the layout", elem_id="find-layout", interactive=models.detector is not None)
        with gr.Column(scale=1):
            status = gr.Markdown(elem_id="status")
            image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=384, elem_id="image")
            with gr.Row():
                overlay = gr.Image(label="Layout boxes", type="filepath", interactive=False, height=256,
                                   elem_id="overlay")
                verification = gr.Image(label="Verification: layout and detected boxes", type="pil", format="png",
                                        interactive=False, height=256, elem_id="verification",
                                        visible=models.detector is not None)
            table = gr.Dataframe(headers=VERIFICATION_COLUMNS, label="Verification", interactive=False,
                                 elem_id="verification-table", visible=models.detector is not None)
            files = gr.File(label="Image and its JSON record", file_count="multiple", interactive=False,
                            elem_id="files")

    layout_fields = [canvas, prompt, negative, width_box, height_box, seed, meta]
    page_fields = [canvas, prompt, negative, width_box, height_box, seed, meta, background]

    def refresh(canvas_value_, prompt_, negative_, width_, height_, seed_, meta_):
        """The layout JSON, its download and the check line, after any change of the layout."""
        try:
            layout = _page_layout(canvas_value_, prompt_, negative_, width_, height_, seed_, meta_)
        except UserError as error:
            return f"// {error}", None, f"**Layout:** {error}"
        path = Path(tempfile.mkdtemp(dir=workdir)) / "layout.json"
        write_json(path, layout.to_dict())
        count = len(layout.entities)
        return (path.read_text(), str(path),
                f"**Layout:** {count} {'entity' if count == 1 else 'entities'}, {layout.width}x{layout.height}")

    changes = [canvas.change, prompt.change, negative.change, width_box.change, height_box.change, seed.change]
    gr.on(changes, refresh, layout_fields, [layout_json, download, check], show_progress="hidden")

    def resize(canvas_value_, width_, height_, background_):
        if not _valid_size(width_, height_) or canvas_value_ is None:
            return gr.skip()
        return resized_canvas(canvas_value_, width_, height_, background_)

    gr.on([width_box.change, height_box.change], resize, [canvas, width_box, height_box, background], canvas,
          show_progress="hidden")

    def run_generate(canvas_value_, prompt_, negative_, width_, height_, seed_, meta_, steps_, guidance_, schedule_,
                     scheduler_, progress=gr.Progress(track_tqdm=True)):  # the bar follows generate's tqdm bars
        layout = _page_layout(canvas_value_, prompt_, negative_, width_, height_, seed_, meta_)
        out = Path(tempfile.mkdtemp(dir=workdir))
        start = time.perf_counter()
        kept = generate_image(models, layout, out, steps_, guidance_, schedule_, scheduler_)
        message = (f"Generated {layout.width}x{layout.height} in {time.perf_counter() - start:.1f} s "
                   f"(seed {kept.layout.seed})")
        checked, rows = None, None
        if kept.verification is not None:
            from detector.verify import overlay as verification_overlay

            entities = kept.verification.entities
            checked = verification_overlay(kept.image, kept.verification)
            rows = [[i, e.phrase, round(e.iou, 3), round(e.score, 3), "yes" if e.success else "no"]
                    for i, e in enumerate(entities)]
            message += (f"; verified: {sum(e.success for e in entities)} of {len(entities)} entities found "
                        f"(mean IoU {kept.verification.mean_iou:.2f})")
        files = [str(out / f"{JOB_NAME}.png"), str(out / f"{JOB_NAME}.json")]
        return kept.image, str(out / f"{JOB_NAME}.overlay.png"), checked, rows, files, message

    run.click(_user_errors(run_generate), [*layout_fields, steps, guidance, schedule, scheduler],
              [image, overlay, verification, table, files, status], concurrency_id=MODEL_QUEUE, concurrency_limit=1)

    def open_layouts(path):
        """The layouts of an uploaded file: the dropdown to pick one, and the first one on the page."""
        if path is None:
            return gr.skip()
        with _named_as_uploaded(path):
            layouts = load_layouts(path)
        require(bool(layouts), f"{Path(path).name}: holds no layout")
        choices = [(f"{i}: {layout.meta.get('name') or layout.prompt or 'no prompt'}", i)
                   for i, layout in enumerate(layouts)]
        return (gr.update(choices=choices, value=0), [layout.to_dict() for layout in layouts],
                *_page_values(layouts[0]))

    upload.upload(_user_errors(open_layouts), upload, [pick, opened, *page_fields])

    def pick_layout(index, opened_):
        if index is None or not opened_:
            return gr.skip()
        return _page_values(Layout.from_dict(opened_[index]))

    pick.input(_user_errors(pick_layout), [pick, opened], page_fields)

    def find_layout(photo_, caption_, phrases_, width_, height_):
        """The layout the detector finds in the photo, at the page's size, drawn over the photo."""
        require(models.detector is not None, "no detector is loaded: start gligen ui with --detector")
        require(photo_ is not None, "upload a photo first")
        lines = [line.strip() for line in (phrases_ or "").splitlines() if line.strip()]
        require(bool(caption_.strip()) != bool(lines), "give either a caption or phrases")
        layout = generate.layout_from_image(models.detector, photo_.convert("RGB"), caption_.strip() or None,
                                            lines or None, "photo")
        if _valid_size(width_, height_):
            layout = replace(layout, width=width_, height=height_)
        return _page_values(layout, photo_)

    find.click(_user_errors(find_layout), [photo, caption, phrases, width_box, height_box], page_fields,
               concurrency_id=MODEL_QUEUE, concurrency_limit=1)


# ----------------------------------------------------------------------------- the Edit tab


def edit_tab(models: Models, workdir: Path) -> None:
    """A photo and what to change on the left; the mask of what was found and the result on the right."""
    with gr.Row():
        with gr.Column(scale=1):
            photo = gr.Image(label="Photo", type="pil", sources=["upload"], elem_id="edit-photo")
            kind = gr.Radio(["replace", "remove"], value="replace", label="Edit", elem_id="edit-kind")
            phrase = gr.Textbox(label="What to find (a phrase)", elem_id="edit-phrase")
            new = gr.Textbox(label="Replace it with (a phrase)", elem_id="edit-with")
            with gr.Row():
                steps = gr.Number(50, label="Steps", precision=0, minimum=1, elem_id="edit-steps")
                guidance = gr.Number(7.5, label="Guidance", elem_id="edit-guidance")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="edit-seed")
            run = gr.Button("Edit", variant="primary", elem_id="edit", interactive=models.detector is not None)
            if models.detector is None:
                gr.Markdown("Editing finds things with a detector: start `gligen ui` with `--detector`.")
        with gr.Column(scale=1):
            status = gr.Markdown(elem_id="edit-status")
            with gr.Row():
                mask = gr.Image(label="Found: its mask and box", type="pil", format="png", interactive=False,
                                height=256, elem_id="edit-mask")
                result = gr.Image(label="Edited", type="pil", format="png", interactive=False, height=256,
                                  elem_id="edit-result")
            files = gr.File(label="Edited image and its JSON record", file_count="multiple", interactive=False,
                            elem_id="edit-files")

    def run_edit(photo_, kind_, phrase_, new_, steps_, guidance_, seed_, progress=gr.Progress(track_tqdm=True)):
        require(photo_ is not None, "upload a photo first")
        out = Path(tempfile.mkdtemp(dir=workdir))
        start = time.perf_counter()
        edited, steps_done, found_picture = edit_image(models, photo_, out, kind_, phrase_, new_, steps_, guidance_,
                                                       seed_)
        found = steps_done[0].found
        scores = ", ".join(f"{instance.score:.2f}" for instance in found)
        message = (f"{kind_.capitalize()}d {phrase_.strip()!r} (detection score {scores}) in "
                   f"{time.perf_counter() - start:.1f} s; outside its mask the photo is kept")
        return found_picture, edited, [str(out / f"{EDIT_NAME}.png"), str(out / f"{EDIT_NAME}.json")], message

    run.click(_user_errors(run_edit), [photo, kind, phrase, new, steps, guidance, seed], [mask, result, files, status],
              concurrency_id=MODEL_QUEUE, concurrency_limit=1)


def edit_image(models: Models, photo: Image.Image, out: Path, kind: str, phrase: str, new: str, steps: int,
               guidance: float, seed: int) -> tuple[Image.Image, list, Image.Image]:
    """Edit `photo` as `gligen edit` would with these settings: the edited image, the edit's steps, and a picture
    of what was found (its masks tinted, its boxes labelled). Writes edit.png, edit.overlay.png, edit.json."""
    from gligen.draw import draw_boxes, draw_masks
    from gligen.edit import OLD, Editor, canvas_size, register, write_outputs
    from gligen.masks import fit_image

    require(bool((phrase or "").strip()), "name what to find")
    require(kind == "remove" or bool((new or "").strip()), "name what to replace it with")
    source = out / "photo.png"
    photo = photo.convert("RGB")
    photo.save(source)
    argv = ["edit", str(source), "--model", models.model, "--out", str(out), f"--{kind}", phrase,
            *(["--with", new] if kind == "replace" else []), f"--steps={steps}", f"--guidance={guidance}",
            f"--seed={seed}", "--detector", models.detector_name]
    if models.adapter:
        argv += ["--adapter", models.adapter]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    models.pipeline.scheduler = models.scheduler
    editor = Editor(models.pipeline, models.detector, None, args)
    edited, steps_done = editor.apply(photo, args.edits)
    write_outputs(out, EDIT_NAME, edited, steps_done, args, models.detector_name, editor.settings)
    found = steps_done[0].found
    fitted = fit_image(photo, *canvas_size(photo))
    picture = draw_masks(fitted, [instance.mask for instance in found], colors=[OLD])
    picture = draw_boxes(picture, [instance.box for instance in found],
                         [f"{phrase.strip()} {instance.score:.2f}" for instance in found], colors=[OLD] * len(found))
    return edited, steps_done, picture


def generate_image(models: Models, layout: Layout, out: Path, steps: int, guidance: float, schedule: str,
                   scheduler: str) -> generate.Candidate:
    """Generate `layout` as `gligen generate` would with these settings, verified when a detector is loaded.

    Writes gligen.png, gligen.overlay.png and gligen.json (the record) into `out`; the kept candidate.
    """
    argv = ["generate", "--model", models.model, "--layout", "page", "--out", str(out), f"--steps={steps}",
            f"--guidance={guidance}", *_schedule_option(schedule), "--overlay"]
    if models.adapter:
        argv += ["--adapter", models.adapter]
    if models.detector is not None:
        argv += ["--verify", "--detector", models.detector_name]
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    models.pipeline.scheduler = (models.scheduler if scheduler == MODEL_SCHEDULER
                                 else make_scheduler(scheduler, models.scheduler.config))
    job = generate.Job(JOB_NAME, layout.keep_largest(args.max_entities))
    [kept] = generate.generate_jobs(models.pipeline, [job], args, out, models.detector, models.detector_name,
                                    step_bar=True)
    return kept


def _schedule_option(text: str) -> list[str]:
    """`gligen generate`'s schedule option for the page's field: one number is beta, three are a,b,c."""
    text = (text or "").strip()
    if "," in text:
        return [f"--schedule={text}"]
    try:
        return [f"--beta={float(text)}"]
    except ValueError:
        raise UserError(f"grounding schedule {text!r}: give beta (one number in [0, 1]) or a,b,c") from None


def _page_layout(canvas: dict | None, prompt: str, negative: str, width: int | None, height: int | None,
                 seed: int | None, meta: dict) -> Layout:
    """The page's layout, checked as a layout file is (the same messages)."""
    require(canvas is not None, "the canvas is empty")
    return Layout.from_dict(layout_dict(canvas["boxes"], canvas["image"].size, prompt, negative, width, height, seed,
                                        meta))


def _page_values(layout: Layout, background: Image.Image | None = None) -> tuple:
    """The page's fields (canvas, prompt, negative prompt, width, height, seed, meta, background) for a layout."""
    return (canvas_value(layout, background), layout.prompt, layout.negative_prompt, layout.width, layout.height,
            layout.seed, dict(layout.meta), background)


def _valid_size(width: Any, height: Any) -> bool:
    return all(isinstance(v, int) and v > 0 and v % 8 == 0 for v in (width, height))


@contextlib.contextmanager
def _named_as_uploaded(path: str) -> Iterator[None]:
    """Messages about an uploaded file name it as the person knows it, not by its temporary path."""
    try:
        yield
    except UserError as error:
        raise UserError(str(error).replace(str(path), Path(path).name)) from None


def _user_errors(handler: Callable) -> Callable:
    """`handler` with a UserError shown on the page as its message (the page keeps serving)."""
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except UserError as error:
            raise gr.Error(str(error), duration=None) from None

    return wrapped
