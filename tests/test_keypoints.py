"""GLIGEN's keypoint and style conditions: layouts, official conversion, training, overlays and keypoint AP."""

import dataclasses
import json
import math
import random
import re
import types

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw
from torch import nn

from gligen.adapter import GroundingAdapter
from gligen.cli import main as gligen_main
from gligen.data.format import Sample
from gligen.draw import draw_layout
from gligen.eval.metrics import KEYPOINT_STATS, keypoint_ap
from gligen.grounding import STYLE_BOX, GroundingInputs
from gligen.layout import Entity, Layout, LayoutError, load_layouts, save_layouts
from gligen.pose import FLIP_INDEX, KEYPOINT_NAMES, SKELETON, coco_keypoints
from gligen.training import Trainer
from gligen.training.config import DataConfig
from gligen.training.dataset import ShardDataset, augment
from tests.test_convert import EXECUTED, official_checkpoint, tiny_gligen_unet
from tests.tiny import HIDDEN, save_tiny_sd, tiny_train_config

# A standing person (normalized x, y of COCO's 17 keypoints), facing the viewer: its left side on the image's right.
POSE = [(0.50, 0.15), (0.53, 0.12), (0.47, 0.12), (0.56, 0.14), (0.44, 0.14), (0.60, 0.30), (0.40, 0.30),
        (0.65, 0.45), (0.35, 0.45), (0.68, 0.60), (0.32, 0.60), (0.57, 0.60), (0.43, 0.60), (0.58, 0.75),
        (0.42, 0.75), (0.58, 0.92), (0.42, 0.92)]


def person(shift=(0.0, 0.0), scale=1.0, hidden=()):
    """POSE moved and shrunk, as [x, y, v] entries; the indices in `hidden` not given."""
    return [[0, 0, 0] if k in hidden else [round(x * scale + shift[0], 4), round(y * scale + shift[1], 4), 2]
            for k, (x, y) in enumerate(POSE)]


def write_layout(path, layout):
    path.write_text(json.dumps(layout))
    return path


# --- layouts ------------------------------------------------------------------------------------------------------


def test_keypoint_and_style_layouts_round_trip(tmp_path):
    Image.new("RGB", (8, 8), (200, 100, 0)).save(tmp_path / "style.png")
    pixels = [[x * 64, y * 32, 2] for x, y in POSE]
    pixels[3] = [0, 0, 0]  # the left ear is not given
    pixels[4] = [10, 10]  # [x, y]: given
    layout = {"prompt": "two people in the style of a painting", "width": 64, "height": 32, "box_units": "pixels",
              "style": "style.png",
              "entities": [{"keypoints": pixels},  # no phrase, no box: a person whose box is that of its points
                           {"phrase": "a woman", "box": [0, 0, 32, 32],
                            "keypoints": [[x * 32, y * 32] for x, y in POSE]}]}
    loaded = load_layouts(write_layout(tmp_path / "in.json", layout))[0]
    assert loaded.style == str(tmp_path / "style.png")
    first, second = loaded.entities
    assert first.phrase == "person" and first.keypoints[3] == (0.0, 0.0, 0)
    assert first.keypoints[4] == (pytest.approx(10 / 64), pytest.approx(10 / 32), 2)
    given = [(x, y) for k, (x, y) in enumerate(POSE) if k not in (3, 4)] + [(10 / 64, 10 / 32)]
    assert first.box == pytest.approx((min(x for x, _ in given), min(y for _, y in given),
                                       max(x for x, _ in given), max(y for _, y in given)))
    assert second.box == pytest.approx((0, 0, 0.5, 1))
    assert [k[:2] for k in second.keypoints] == [pytest.approx((x / 2, y)) for x, y in POSE]
    assert {k[2] for k in second.keypoints} == {2}

    for suffix in (".json", ".jsonl"):
        save_layouts(tmp_path / f"out{suffix}", [loaded, loaded])
        again = load_layouts(tmp_path / f"out{suffix}")
        assert len(again) == 2 and all(a.style == loaded.style and a.prompt == loaded.prompt for a in again)
        for a, b in zip(again[0].entities, loaded.entities):  # the file holds 6 decimals
            assert a.phrase == b.phrase and a.box == pytest.approx(b.box, abs=1e-6)
            assert [p[2] for p in a.keypoints] == [p[2] for p in b.keypoints]
            np.testing.assert_allclose([p[:2] for p in a.keypoints], [p[:2] for p in b.keypoints], atol=1e-6)
        save_layouts(tmp_path / f"again{suffix}", again)
        assert load_layouts(tmp_path / f"again{suffix}") == again  # and then it stays exactly as it is
    layout.pop("style")
    assert load_layouts(write_layout(tmp_path / "plain.json", layout))[0].style is None


BAD_KEYPOINTS = {
    "16 entries": (person()[:16], "entity 0 ('a dancer'): 'keypoints' must be 17 [x, y] or [x, y, v] entries"),
    "NaN": ([*person()[:5], [float("nan"), 0.3, 2], *person()[6:]],
            "entity 0 ('a dancer'): keypoint 5 (left_shoulder) [nan, 0.3, 2] has a NaN"),
    "outside": ([*person()[:9], [0.5, 1.5], *person()[10:]],
                "entity 0 ('a dancer'): keypoint 9 (left_wrist) [0.5, 1.5] lies outside the image"),
    "visibility": ([*person()[:2], [0.5, 0.5, 3], *person()[3:]],
                   "entity 0 ('a dancer'): keypoint 2 (right_eye): visibility v must be 0"),
    "not a point": ([*person()[:16], "nose"], "entity 0 ('a dancer'): keypoint 16 (right_ankle) must be [x, y]"),
    "no point given": ([[0, 0, 0]] * 17, "entity 0 ('a dancer'): 'box' is missing and no keypoint is given"),
}


@pytest.mark.parametrize("case", BAD_KEYPOINTS)
def test_bad_keypoints_give_one_line_naming_entity_and_index(tmp_path, capsys, case):
    keypoints, message = BAD_KEYPOINTS[case]
    path = write_layout(tmp_path / "bad.json", {"prompt": "a dancer", "width": 16, "height": 16,
                                                  "entities": [{"phrase": "a dancer", "keypoints": keypoints}]})
    with pytest.raises(LayoutError, match="^" + re.escape(f"{path}: {message}")):
        load_layouts(path)
    # through the CLI: one line, exit 1, nothing written (the layout is read before any model)
    status = gligen_main(["generate", "--model", str(tmp_path / "no-model"), "--layout", str(path),
                          "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith(f"gligen: error: {path}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_style_image_names_it(tmp_path):
    path = write_layout(tmp_path / "x.json", {"prompt": "p", "style": "nowhere.png", "entities": []})
    with pytest.raises(LayoutError, match="style image not found: .*nowhere.png"):
        load_layouts(path)


# --- the official keypoint release ---------------------------------------------------------------------------------


class OfficialKeypointNet(nn.Module):
    """The keypoint position net as the issue states official GLIGEN's: written here from those facts alone."""

    def __init__(self, persons, dim, freqs=8):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.persons, self.freqs = persons, freqs
        self.person_embeddings = nn.Parameter(torch.randn(persons, dim, generator=generator))
        self.keypoint_embeddings = nn.Parameter(torch.randn(17, dim, generator=generator))
        self.linears = nn.Sequential(nn.Linear(dim + 4 * freqs, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(),
                                     nn.Linear(512, dim))
        self.null_person_feature = nn.Parameter(torch.randn(dim, generator=generator))
        self.null_xy_feature = nn.Parameter(torch.randn(4 * freqs, generator=generator))

    def forward(self, points, masks):  # the diffusers UNet calls position_net(**gligen kwargs)
        slots = self.person_embeddings.repeat_interleave(17, dim=0) + self.keypoint_embeddings.repeat(self.persons, 1)
        slots = slots[None].repeat(points.shape[0], 1, 1)
        bands = 100 ** (torch.arange(self.freqs) / self.freqs)  # for each frequency: sin(x), sin(y), cos(x), cos(y)
        xy = torch.cat([f(band * points) for band in bands for f in (torch.sin, torch.cos)], dim=-1)
        m = masks[..., None]
        slots = slots * m + (1 - m) * self.null_person_feature
        xy = xy * m + (1 - m) * self.null_xy_feature
        return self.linears(torch.cat([slots, xy], dim=-1))


def official_fuser_forward(scale):
    """Official GLIGEN's GatedSelfAttentionDense forward at fuser scale `scale`, on diffusers' fuser modules."""

    def forward(self, x, objs):
        n_visual = x.shape[1]
        objs = self.linear(objs)
        x = x + scale * torch.tanh(self.alpha_attn) * self.attn(self.norm1(torch.cat([x, objs], dim=1)))[:, :n_visual]
        return x + scale * torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))

    return forward


def test_official_keypoint_release_converts_and_matches_the_official_forward(tmp_path):
    persons = 2
    reference = tiny_gligen_unet("gated")  # diffusers' gated blocks: the official UNet's layers under other names
    reference.position_net = OfficialKeypointNet(persons, HIDDEN)
    torch.save(official_checkpoint(reference), tmp_path / "gligen_keypoint.pth")
    EXECUTED.clear()
    assert gligen_main(["convert", str(tmp_path / "gligen_keypoint.pth"), "--out", str(tmp_path / "out")]) == 0
    assert EXECUTED == []  # read with the code-free unpickler
    adapter = GroundingAdapter.from_pretrained(tmp_path / "out" / "adapter")
    assert adapter.config.feature_type == "keypoint" and adapter.config.max_persons == persons
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["feature_type"] == "keypoint" and config["max_persons"] == persons

    plain = UNet2DConditionModel.from_config({**reference.config, "attention_type": "default"}).eval()
    base = {k: v for k, v in reference.state_dict().items() if ".fuser." not in k and "position_net" not in k}
    plain.load_state_dict(base)

    generator = torch.Generator().manual_seed(7)
    sample, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 7, HIDDEN, generator=generator)
    points = torch.rand(2, persons * 17, 2, generator=generator)
    masks = (torch.rand(2, persons * 17, generator=generator) > 0.3).float()
    masks[0] = 0  # the unconditional half: every slot null
    inputs = GroundingInputs(torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0, HIDDEN),
                             points=points, point_masks=masks)
    fusers = [m for m in reference.modules() if type(m).__name__ == "GatedSelfAttentionDense"]
    assert fusers
    errors = {}
    for scale in (1.0, 0.5, 0.0):
        for fuser in fusers:
            fuser.forward = types.MethodType(official_fuser_forward(scale), fuser)
        with torch.no_grad():
            expected = reference(sample, 10, text, cross_attention_kwargs={
                "gligen": {"points": points, "masks": masks}}).sample
            adapter.attach(plain)
            got = plain(sample, 10, text, cross_attention_kwargs=adapter.cross_attention_kwargs(
                adapter.tokens(inputs), scale)).sample
            adapter.detach(plain)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        errors[scale] = expected
    assert (errors[1.0] - errors[0.0]).abs().max() > 1e-3 and (errors[0.5] - errors[1.0]).abs().max() > 1e-4


# --- training from keypoint shards, generation, overlays -----------------------------------------------------------


def coco_person_keypoints(root, num_images=6, size=40):
    """A COCO person keypoints file and its images: a stick figure per person."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    rng = random.Random(0)
    for image_id in range(1, num_images + 1):
        image = Image.new("RGB", (size, size), (rng.randint(0, 255), 90, 160))
        draw = ImageDraw.Draw(image)
        people = [(rng.uniform(-0.2, 0.1), rng.uniform(-0.05, 0.05), 0.8), (0.5, 0.4, 0.5)][:1 + image_id % 2]
        for dx, dy, scale in people:
            points = person((dx, dy), scale, hidden=(3,) if image_id % 3 else ())
            flat = [v for x, y, vis in points for v in (x * size, y * size, vis)]
            given = [(x * size, y * size) for x, y, vis in points if vis]
            for a, b in SKELETON:
                if points[a][2] and points[b][2]:
                    draw.line([tuple(v * size for v in points[a][:2]), tuple(v * size for v in points[b][:2])],
                              fill=(255, 255, 255), width=2)
            xs, ys = [x for x, _ in given], [y for _, y in given]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "keypoints": flat, "num_keypoints": len(given)})
        image.save(root / "images" / f"{image_id:03d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:03d}.png", "width": size, "height": size})
    # a person with a single given point: fewer than --min-keypoints, dropped and counted
    annotations.append({"id": 99, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5], "area": 25,
                        "keypoints": [2, 2, 2] + [0, 0, 0] * 16, "num_keypoints": 1})
    categories = [{"id": 1, "name": "person", "keypoints": list(KEYPOINT_NAMES),
                   "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}]
    path = root / "person_keypoints.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def keypoint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("keypoints")
    keypoints = coco_person_keypoints(root)
    status = gligen_main(["data", "from-coco", "--keypoints", str(keypoints), str(root / "images"),
                          "--min-keypoints", "3", "--out", str(root / "shards"), "--samples-per-shard", "4"])
    assert status == 0
    return {"root": root, "sd": save_tiny_sd(root / "sd"), "shards": root / "shards", "coco": keypoints}


def test_from_coco_keypoints_writes_persons_with_their_keypoints(keypoint_run):
    config = DataConfig(shards=str(keypoint_run["shards"]), resolution=40, random_crop=False, random_flip=False,
                        caption_drop=0.0, min_box_area=0.0, shuffle_shards=False, shuffle_within_shard=False,
                        num_workers=0)
    batch = next(iter(ShardDataset(config, batch_size=6, seed=0)))
    coco = json.loads(keypoint_run["coco"].read_text())
    expected = [[a for a in coco["annotations"] if a["image_id"] == image["id"] and a["num_keypoints"] >= 3]
                for image in coco["images"]]
    assert [len(persons) for persons in batch["keypoints"]] == [len(e) for e in expected]
    for persons, annotations in zip(batch["keypoints"], expected):
        for keypoints, annotation in zip(persons, annotations):
            flat = annotation["keypoints"]
            assert [v for _, _, v in keypoints] == flat[2::3]
            given = [(x, y) for x, y, v in keypoints if v]
            np.testing.assert_allclose(given, [(flat[3 * k] / 40, flat[3 * k + 1] / 40) for k in range(17)
                                               if flat[3 * k + 2]], atol=1e-6)
    summary = json.loads((keypoint_run["shards"] / "summary.json").read_text())
    assert "person with fewer than 3 keypoints" in json.dumps(summary)

    # beside an instances file the persons of the same annotation ids carry their keypoints; the rest stay boxes
    instances = dict(coco, annotations=[{k: v for k, v in a.items() if k not in ("keypoints", "num_keypoints")}
                                        for a in coco["annotations"]])
    (keypoint_run["root"] / "instances.json").write_text(json.dumps(instances))
    out = keypoint_run["root"] / "merged"
    assert gligen_main(["data", "from-coco", str(keypoint_run["root"] / "instances.json"),
                        str(keypoint_run["root"] / "images"), "--keypoints", str(keypoint_run["coco"]),
                        "--min-keypoints", "3", "--out", str(out)]) == 0
    merged = next(iter(ShardDataset(dataclasses.replace(config, shards=str(out)), batch_size=6, seed=0)))
    assert [[k is not None for k in persons] for persons in merged["keypoints"]] == \
        [[a["num_keypoints"] >= 3 for a in coco["annotations"] if a["image_id"] == image["id"]] for image in coco["images"]]


def test_coco_keypoints_with_a_value_that_is_no_finite_number_are_malformed():
    flat = [v for x, y in POSE for v in (x * 64, y * 32, 2)]
    assert coco_keypoints(flat, 64, 32)[0] == pytest.approx((0.5, 0.15, 2))
    for bad in (float("nan"), float("inf"), 10**400, "2", True, None):
        assert coco_keypoints(flat[:2] + [bad] + flat[3:], 64, 32) is None, bad
    assert coco_keypoints(flat[:-1], 64, 32) is None


def test_flip_swaps_left_and_right_keypoints():
    assert [KEYPOINT_NAMES[i] for i in FLIP_INDEX[:7]] == ["nose", "right_eye", "left_eye", "right_ear", "left_ear",
                                                          "right_shoulder", "left_shoulder"]
    keypoints = tuple((x, y, 2) for x, y in POSE)
    sample = Sample("k", Image.new("RGB", (40, 40)), "a person", [Entity("a person", (0.3, 0.1, 0.7, 0.95),
                                                                        keypoints=keypoints)])
    cfg = DataConfig(shards="x", resolution=40, random_crop=False, random_flip=True, caption_drop=0.0,
                     min_box_area=0.0)
    seen = set()
    for seed in range(12):
        out = augment(sample, cfg, random.Random(seed))
        flip = out.cache_key.split("|")[1].split(",")[2] == "1"
        seen.add(flip)
        (got,) = out.keypoints
        for k, name in enumerate(KEYPOINT_NAMES):
            mirror = KEYPOINT_NAMES.index(name.replace("left", "L").replace("right", "left").replace("L", "right"))
            x, y = POSE[mirror] if flip else POSE[k]
            assert got[k] == (pytest.approx(1 - x if flip else x), pytest.approx(y), 2)
        # the mirror image of a person facing the viewer faces the viewer too: its left shoulder stays on the
        # image's right (without the swap, the point called left would move to the image's left)
        left, right = got[KEYPOINT_NAMES.index("left_shoulder")], got[KEYPOINT_NAMES.index("right_shoulder")]
        assert left[0] > right[0]
    assert seen == {True, False}


def test_a_point_cropped_out_is_no_longer_given():
    keypoints = tuple((x, y, 2) for x, y in POSE)
    sample = Sample("k", Image.new("RGB", (80, 40)), "", [Entity("person", (0.3, 0.1, 0.7, 0.95), keypoints=keypoints)])
    cfg = DataConfig(shards="x", resolution=40, random_crop=True, random_flip=False, caption_drop=0.0, min_box_area=0.0)
    for seed in range(6):
        out = augment(sample, cfg, random.Random(seed))
        left = int(out.cache_key.split("|")[1].split(",")[0])
        for (x, y), (gx, gy, v) in zip(POSE, out.keypoints[0]):
            inside = 0 <= (x * 80 - left) / 40 <= 1
            assert v == (2 if inside else 0)
            if inside:
                assert (gx, gy) == (pytest.approx((x * 80 - left) / 40), pytest.approx(y))


def _fixed_loss(trainer, batch):
    trainer.generator.manual_seed(123)
    with torch.no_grad():
        return sum(trainer.loss(batch).item() for _ in range(4)) / 4


def test_keypoint_training_lowers_the_loss_and_the_adapter_generates(keypoint_run, tmp_path, capsys):
    config = tiny_train_config(keypoint_run["sd"], keypoint_run["shards"], tmp_path / "run", "model.feature_type=keypoint",
                               "model.max_persons=2", "max_steps=10", "grounding_drop=0", "data.caption_drop=0",
                               "optim.lr=3e-3", "checkpoint_every=10")
    trainer = Trainer(config)
    assert trainer.adapter.position_net.person_embeddings.shape == (2, HIDDEN)
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=4, seed=1)))
    grounding = trainer.grounding_inputs(batch)
    assert grounding.points.shape == (4, 34, 2) and grounding.point_masks.sum() > 0
    loss_before = _fixed_loss(trainer, batch)
    before = {k: v.clone() for k, v in trainer.adapter.adapter_state_dict().items()}
    out = trainer.train()
    assert _fixed_loss(trainer, batch) < loss_before
    changed = {k for k, v in trainer.adapter.adapter_state_dict().items() if not torch.equal(v, before[k])}
    assert {"position_net.person_embeddings", "position_net.keypoint_embeddings"} <= changed

    adapter = GroundingAdapter.from_pretrained(out)
    assert adapter.config.feature_type == "keypoint" and adapter.config.max_persons == 2
    layout = write_layout(tmp_path / "pose.json", {
        "prompt": "two people", "width": 16, "height": 16, "seed": 0,
        "entities": [{"phrase": "a man", "keypoints": person((-0.2, 0.0), 0.9)},
                     {"keypoints": person((0.3, 0.1), 0.6, hidden=(0, 1, 2))}]})
    status = gligen_main(["generate", "--model", str(keypoint_run["sd"]), "--adapter", str(out), "--layout",
                          str(layout), "--out", str(tmp_path / "images"), "--steps", "2", "--device", "cpu",
                          "--overlay"])
    assert status == 0, capsys.readouterr().err
    with Image.open(tmp_path / "images" / "pose.png") as image:
        assert image.size == (16, 16)
    assert (tmp_path / "images" / "pose.overlay.png").is_file()


def test_generation_feeds_the_layout_keypoints_to_a_keypoint_adapter(keypoint_run, tmp_path):
    from gligen.pipeline import GligenPipeline

    adapter = GroundingAdapter.for_unet(UNet2DConditionModel.from_pretrained(keypoint_run["sd"] / "unet"),
                                        "keypoint", max_persons=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # open gates and a position net far from its initialisation: keypoints show clearly
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(1.0)
            fuser.alpha_dense.fill_(1.0)
        for param in adapter.position_net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    adapter.save_pretrained(tmp_path / "adapter")
    pipe = GligenPipeline.from_pretrained(str(keypoint_run["sd"]), adapter=str(tmp_path / "adapter"))
    mirrored = [(1 - x, y) for x, y in POSE]
    layouts = [Layout("people", (Entity("a dog", (0.0, 0.0, 0.2, 0.2)),
                                 Entity("person", (0.1, 0.1, 0.9, 0.9), keypoints=tuple((x, y, 2) for x, y in p))),
                      width=16, height=16) for p in (POSE, mirrored)]
    inputs = pipe.grounding_inputs(layouts, 2)
    assert inputs.points.shape == (2, 34, 2) and inputs.point_masks.tolist() == [[1] * 17 + [0] * 17] * 2
    torch.testing.assert_close(inputs.points[:, :17], torch.tensor([POSE, mirrored]), rtol=0, atol=1e-7)
    latents = [pipe([layout], num_inference_steps=2, schedule=(1.0, 0.0, 0.0), output_type="latent").images[0]
               for layout in layouts]
    assert (latents[0] - latents[1]).abs().max() > 1e-3  # a mirrored pose moves the latents


def test_overlay_draws_a_coco_skeleton():
    keypoints = tuple((x, y, 2) for x, y in POSE)
    layout = Layout("a person", (Entity("a person", (0.3, 0.1, 0.7, 0.95), keypoints=keypoints),), width=256,
                    height=256)
    plain = np.asarray(draw_layout(Image.new("RGB", (256, 256)), Layout("a person", (Entity("a person", layout.boxes[0]),))))
    drawn = np.asarray(draw_layout(Image.new("RGB", (256, 256)), layout))
    changed = (drawn != plain).any(axis=-1)
    for a, b in SKELETON:  # the middle of every limb is drawn
        x, y = ((POSE[a][0] + POSE[b][0]) / 2 * 256, (POSE[a][1] + POSE[b][1]) / 2 * 256)
        assert changed[round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2].any(), (a, b)
    assert not changed[200:, :50].any()  # and nothing far from the person


# --- style ---------------------------------------------------------------------------------------------------------


def test_style_token_sits_at_the_dummy_box_with_its_text_masked():
    from gligen.grounding import add_style

    inputs = GroundingInputs(torch.rand(2, 3, 4), torch.tensor([[1.0, 0, 0], [1, 1, 0]]), torch.rand(2, 3, HIDDEN),
                             torch.zeros(2, 3, HIDDEN), torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    style = torch.randn(1, HIDDEN)
    add_style(inputs, [None, 2], style)
    assert inputs.boxes[1, 2].tolist() == list(STYLE_BOX) == [0.0, 1.0, 0.0, 1.0]
    assert inputs.masks.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert inputs.image_masks.tolist() == [[1, 0, 0], [0, 1, 1]]
    assert inputs.phrase_masks.tolist() == [[1, 0, 0], [1, 1, 0]]
    torch.testing.assert_close(inputs.image_embeds[1, 2], style[0], rtol=0, atol=0)


# --- keypoint AP -------------------------------------------------------------------------------------------------


def keypoint_gt(num_images=3, size=64):
    """A COCO person keypoints ground truth of two persons per image, in pixels."""
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": size, "height": size})
        for shift in ((-0.2, 0.0), (0.25, 0.05)):
            points = person(shift, 0.7, hidden=(3,))
            flat = [v for x, y, vis in points for v in (x * size, y * size, vis)]
            xs, ys = flat[0::3], flat[1::3]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "keypoints": flat, "num_keypoints": 16})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}


def test_keypoint_ap_of_perfect_and_shifted_poses():
    gt = keypoint_gt()
    perfect = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 0.9}
               for a in gt["annotations"]]
    metrics = keypoint_ap(gt, perfect)
    assert list(metrics) == list(KEYPOINT_STATS) and metrics["APkp"] == pytest.approx(1.0)
    aps = []
    for pixels in (1.0, 3.0, 6.0):
        shifted = [{**p, "keypoints": [v + pixels if i % 3 < 2 else v for i, v in enumerate(p["keypoints"])]}
                   for p in perfect]
        aps.append(keypoint_ap(gt, shifted)["APkp"])
    assert 1.0 > aps[0] > aps[1] > aps[2] >= 0  # further from the layout, lower AP
    assert gt == keypoint_gt()  # the inputs are left as they were


def save_tiny_vitpose(directory):
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    torch.manual_seed(0)
    backbone = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[8, 8], hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37, out_indices=[1])
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17, use_simple_decoder=True,
                                           scale_factor=4)).eval().save_pretrained(directory)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(directory)
    return directory


def test_eval_score_adds_keypoint_ap_from_a_vitpose(tmp_path):
    from gligen.eval.metrics import COCO_STATS
    from gligen.eval.pose import PoseEstimator
    from tests.tiny_detector import save_tiny_detector

    size = 64
    layouts = [Layout("two people", (
        Entity("person", (0.05, 0.05, 0.45, 0.95), keypoints=tuple((0.1 + 0.3 * x, 0.05 + 0.9 * y, 2) for x, y in POSE)),
        Entity("a dog", (0.5, 0.5, 0.9, 0.9)),
    ), width=size, height=size, seed=i) for i in range(2)]
    save_layouts(tmp_path / "run" / "layouts.jsonl", layouts)
    from gligen.eval.annotations import load_eval_set
    from gligen.eval.generate import image_name

    eval_set = load_eval_set(tmp_path / "run" / "layouts.jsonl")
    for record in eval_set.records:
        Image.new("RGB", (size, size), (120, 80, 40)).save(tmp_path / "run" / image_name(record.image_id))
    vitpose = save_tiny_vitpose(tmp_path / "vitpose")
    detector = save_tiny_detector(tmp_path / "detector")
    status = gligen_main(["eval", "score", "--annotations", str(tmp_path / "run" / "layouts.jsonl"), "--detector",
                          str(detector), "--pose-model", str(vitpose), "--out", str(tmp_path / "score")])
    assert status == 0
    out = tmp_path / "score"
    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"])[:len(COCO_STATS) + len(KEYPOINT_STATS)] == [*COCO_STATS, *KEYPOINT_STATS]
    gt = json.loads((out / "keypoint_ground_truth.json").read_text())
    poses = json.loads((out / "keypoints.json").read_text())
    assert len(gt["annotations"]) == len(poses) == 2  # one person per image; the dog has no pose
    estimated = PoseEstimator.from_pretrained(str(vitpose)).estimate(
        [Image.new("RGB", (size, size), (120, 80, 40))], [[gt["annotations"][0]["bbox"]]])[0][0]
    np.testing.assert_allclose(poses[0]["keypoints"], estimated.flatten().tolist(), atol=2e-3)
    # the report's keypoint AP is the written poses' against the written ground truth; perfect poses score 1
    assert report["metrics"]["APkp"] == pytest.approx(keypoint_ap(gt, poses)["APkp"])
    perfect = [{**p, "keypoints": a["keypoints"]} for p, a in zip(poses, gt["annotations"])]
    assert keypoint_ap(gt, perfect)["APkp"] == pytest.approx(1.0)
    assert keypoint_ap(gt, [{**p, "keypoints": [v + 4 * (i % 3 < 2) for i, v in enumerate(p["keypoints"])]}
                            for p in perfect])["APkp"] < 1.0
    assert "APkp" in (out / "report.md").read_text()
    assert math.isfinite(report["metrics"]["APkp"])


def test_pose_model_without_keypoints_in_the_layouts_is_refused(tmp_path, capsys):
    save_layouts(tmp_path / "layouts.jsonl", [Layout("a dog", (Entity("a dog", (0.1, 0.1, 0.5, 0.5)),))])
    status = gligen_main(["eval", "score", "--annotations", str(tmp_path / "layouts.jsonl"), "--detector", "x",
                          "--pose-model", str(tmp_path / "vitpose"), "--out", str(tmp_path / "score")])
    err = capsys.readouterr().err
    assert status == 1 and "--pose-model: no layout" in err and err.count("\n") == 1
    assert not (tmp_path / "score").exists()


def test_generate_with_a_style_image(tmp_path, capsys):
    from gligen.pipeline import GligenPipeline
    from tests.tiny import save_text_image_box_adapter

    sd = save_tiny_sd(tmp_path / "sd")
    save_text_image_box_adapter(sd, tmp_path)
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "art.png")
    plain = {"prompt": "a cat", "width": 16, "height": 16, "entities": [{"phrase": "a cat", "box": [0.1, 0.2, 0.5, 0.9]}]}
    (tmp_path / "layouts").mkdir()
    write_layout(tmp_path / "layouts" / "plain.json", plain)
    write_layout(tmp_path / "layouts" / "styled.json", {**plain, "style": "../art.png"})
    for name in ("plain", "styled"):
        status = gligen_main(["generate", "--model", str(sd), "--adapter", str(tmp_path / "adapter"), "--image-encoder",
                              str(tmp_path / "clip"), "--layout", str(tmp_path / "layouts" / f"{name}.json"), "--out",
                              str(tmp_path / "out"), "--steps", "2", "--device", "cpu", "--schedule", "1,0,0"])
        assert status == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "styled.json").read_text())
    assert record["layout"]["style"] == str(tmp_path / "layouts" / ".." / "art.png")
    styled, unstyled = (np.asarray(Image.open(tmp_path / "out" / f"{n}.png"), dtype=int) for n in ("styled", "plain"))
    assert np.abs(styled - unstyled).max() > 0  # the style token changes the image

    pipe = GligenPipeline.from_pretrained(str(sd), adapter=str(tmp_path / "adapter"), image_encoder=str(tmp_path / "clip"))
    layout = load_layouts(tmp_path / "layouts" / "styled.json")[0]
    inputs = pipe.grounding_inputs([layout], 3)
    assert inputs.boxes[0, 1].tolist() == list(STYLE_BOX)  # the slot after the entities
    assert inputs.masks[0].tolist() == [1, 1, 0] and inputs.image_masks[0].tolist() == [0, 1, 0]
    assert inputs.phrase_masks[0].tolist() == [1, 0, 0]
    assert inputs.image_embeds[0, 1].norm() == pytest.approx(28.7, rel=1e-4)


def test_style_crop_in_training_follows_style_prob():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    sample = Sample("k", image, "a cat", [Entity("a cat", (0.1, 0.1, 0.6, 0.6))] * 3)
    always = DataConfig(shards="x", resolution=40, random_flip=False, caption_drop=0.0, style_prob=1.0, max_entities=3)
    out = augment(sample, always, random.Random(0), with_references=True)
    assert out.style is not None and 20 <= out.style.width == out.style.height <= 40
    found = np.asarray(image)  # the style is a crop of the (uncropped, unflipped) training image itself
    crop = np.asarray(out.style)
    assert any(np.array_equal(found[y:y + crop.shape[0], x:x + crop.shape[1]], crop)
               for y in range(41 - crop.shape[0]) for x in range(41 - crop.shape[1]))
    assert len(out.boxes) == 2  # the style token takes one of the max_entities slots
    never = DataConfig(shards="x", resolution=40, random_flip=False, caption_drop=0.0, style_prob=0.0, max_entities=3)
    assert augment(sample, never, random.Random(0), with_references=True).style is None
    assert augment(sample, always, random.Random(0)).style is None  # text-box training: no style
