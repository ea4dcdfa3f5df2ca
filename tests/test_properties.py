"""Property-based tests: the parsers of user input, fed arbitrary JSON values and bytes, either return a
valid object or raise the project's `UserError`, never another exception.

Parsers: layouts (objects and whole files), shard samples, COCO ground truth and detections, the
evaluation-set reader, and adapter configs. The layout validator's invariants (boxes inside [0, 1],
x0 < x1, y0 < y1, finite numbers) hold for every layout it accepts.
"""

from __future__ import annotations

import io
import json
import math
import warnings

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from gligen.adapter import AdapterConfig
from gligen.data.format import Sample, decode_sample
from gligen.errors import UserError
from gligen.eval.annotations import Filters, load_eval_set
from gligen.eval.metrics import check_detections, check_ground_truth
from gligen.layout import Layout, load_layouts

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 0.5, 8, 16, 512, 2**64, 10**400, -(10**400)]))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)


_MISSING = object()


def plausible(fields: dict) -> st.SearchStrategy:
    """Objects with the schema's keys, each value mostly of the right kind, else anything at all, or missing."""
    values = {key: st.one_of(value, value, value, json_values, st.just(_MISSING)) for key, value in fields.items()}
    return st.fixed_dictionaries(values).map(lambda d: {k: v for k, v in d.items() if v is not _MISSING})


coordinates = st.one_of(st.floats(0, 1), st.floats(0, 1), st.sampled_from([10**400, float("nan"), 2, True]))
boxes = st.one_of(st.lists(coordinates, min_size=4, max_size=4), st.lists(numbers, min_size=3, max_size=5))
sides = st.one_of(st.sampled_from([8, 16, 512, 4096, 4104, 8192, 2**64]), numbers)
seeds = st.one_of(st.sampled_from([0, 2**64 - 1, 2**64, -1, 10**400]), numbers)
entities = plausible({"phrase": st.text(max_size=6), "box": boxes, "image": st.text(max_size=4),
                      "tokens_positive": st.lists(st.lists(st.one_of(st.integers(-2, 20), numbers), min_size=2, max_size=2),
                                                  max_size=2)})
layouts = plausible({
    "prompt": st.text(max_size=12), "negative_prompt": st.text(max_size=4), "width": sides, "height": sides,
    "seed": seeds, "box_units": st.sampled_from(["normalized", "pixels", "inches"]),
    "entities": st.lists(entities, max_size=3), "name": st.text(max_size=4),
})


def accepts_or_user_error(parse, *args):
    """`parse(*args)`, or None when it raised a UserError; any other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return parse(*args)
    except UserError:
        return None


def check_layout(layout: Layout) -> None:
    assert isinstance(layout.prompt, str) and isinstance(layout.negative_prompt, str)
    assert 0 < layout.width <= 4096 and 0 < layout.height <= 4096 and 0 <= layout.seed < 2**64
    for entity in layout.entities:
        x0, y0, x1, y1 = entity.box
        assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in entity.box)
        assert x0 < x1 and y0 < y1 and entity.phrase.strip() == entity.phrase != ""
        assert entity.spans is None or all(0 <= a < b <= len(layout.prompt) for a, b in entity.spans)


@SETTINGS
@given(st.one_of(layouts, json_values))
@example({"width": 8192})
@example({"seed": 2**64})
@example({"entities": [{"phrase": "a", "box": [0, 0, 1, 10**400]}]})
@example({"prompt": "a cat", "entities": [{"phrase": "a", "box": [0, 0, 1, 1], "tokens_positive": [[0, float("inf")]]}]})
def test_layout_objects(data):
    layout = accepts_or_user_error(Layout.from_dict, data, "layout")
    if layout is not None:
        check_layout(layout)
        assert Layout.from_dict(json.loads(json.dumps(layout.to_dict())), "again").entities == layout.entities or any(
            e.image for e in layout.entities)  # a round trip keeps what was accepted


@SETTINGS
@given(st.one_of(st.binary(max_size=64), layouts.map(lambda d: json.dumps(d).encode()),
                 st.lists(layouts, max_size=3).map(lambda ds: "\n".join(json.dumps(d) for d in ds).encode())),
       st.sampled_from([".json", ".jsonl"]))
def test_layout_files(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("layouts") / f"layouts{suffix}"
    path.write_bytes(content)
    loaded = accepts_or_user_error(load_layouts, path)
    if loaded is not None:
        assert loaded  # an accepted file holds at least one layout
        for layout in loaded:
            check_layout(layout)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
sample_json = plausible({"caption": st.text(max_size=10), "entities": st.lists(entities, max_size=3)}).map(
    lambda d: json.dumps(d).encode())


@SETTINGS
@given(st.dictionaries(st.sampled_from(["__key__", "png", "jpg", "json", "ref0.png", "txt"]),
                       st.one_of(st.binary(max_size=40), st.just(PNG), sample_json), max_size=5),
       st.text(max_size=6))
@example({"png": PNG, "json": b'{"entities": [{"phrase": "a", "box": [0, 0, 1, 1%s]}]}' % (b"0" * 400)}, "k")
@example({"png": PNG, "json": b'{"caption": "ab", "entities": [{"phrase": "a", "box": [0, 0, 1, 1], '
                              b'"tokens_positive": [[0, 9]]}]}'}, "k")
def test_shard_samples(raw, key):
    raw = {**raw, "__key__": key}
    sample = accepts_or_user_error(decode_sample, raw)
    if sample is not None:
        assert isinstance(sample, Sample) and sample.image.mode == "RGB"
        for entity in sample.entities:
            assert all(0.0 <= v <= 1.0 for v in entity.box) and entity.box[0] < entity.box[2]
            assert entity.spans is None or all(b <= len(sample.caption) for _, b in entity.spans)


ids = st.one_of(st.integers(0, 3), st.integers(0, 3), json_values)
images = plausible({"id": ids, "width": numbers, "height": numbers, "file_name": st.text(max_size=4)})
annotations = plausible({"id": ids, "image_id": ids, "category_id": ids, "bbox": st.lists(numbers, max_size=5),
                         "area": numbers, "iscrowd": st.sampled_from([0, 1, 2, True])})
categories = plausible({"id": ids, "name": st.text(max_size=5), "frequency": st.sampled_from(["r", "c", "f", "x"])})
ground_truths = plausible({"images": st.lists(images, max_size=3), "annotations": st.lists(annotations, max_size=3),
                           "categories": st.lists(categories, max_size=3)})
detections = st.lists(plausible({"image_id": ids, "category_id": ids, "bbox": st.lists(numbers, max_size=5),
                                 "score": numbers}), max_size=3)


@SETTINGS
@given(st.one_of(ground_truths, json_values), st.one_of(detections, json_values))
def test_coco_ground_truth_and_detections(gt, dt):
    checked = accepts_or_user_error(check_ground_truth, gt, "gt.json")
    if checked is None:
        return
    results = accepts_or_user_error(check_detections, dt, checked, "dt.json")
    if results is not None:
        from gligen.eval.metrics import box_ap

        assert set(box_ap(checked, results)) >= {"AP", "AP50"}  # what passed the checks, faster-coco-eval scores


@SETTINGS
@given(st.one_of(ground_truths, json_values))
def test_evaluation_sets_from_instances(tmp_path_factory, gt):
    path = tmp_path_factory.mktemp("eval") / "instances.json"
    path.write_text(json.dumps(gt))
    eval_set = accepts_or_user_error(load_eval_set, path, None, Filters(), 64)
    if eval_set is not None:
        for record in eval_set.records:
            check_layout(record.layout)


blocks = st.dictionaries(st.text(max_size=6), st.one_of(st.lists(st.integers(-1, 64), min_size=3, max_size=3),
                                                        json_values), max_size=3)
adapter_configs = plausible({
    "blocks": blocks, "feature_type": st.sampled_from(["text-box", "text-image-box", "keypoint"]),
    "positive_len": numbers, "cross_attention_dim": numbers, "fourier_freqs": numbers, "image_embed_dim": numbers,
    "extra_in_channels": numbers, "max_entities": numbers, "base_model": st.text(max_size=4), "extra": json_values,
})


@SETTINGS
@given(st.one_of(adapter_configs, json_values))
def test_adapter_configs(data):
    config = accepts_or_user_error(AdapterConfig.from_dict, data, "adapter_config.json")
    if config is not None:
        assert config.blocks and all(len(shape) == 3 and min(shape) > 0 for shape in config.blocks.values())
        assert config.positive_len > 0 and config.cross_attention_dim > 0 and config.extra_in_channels >= 0
