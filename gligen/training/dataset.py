"""Training batches from webdataset shards, deterministic and resumable at an exact position.

Order: each epoch shuffles the shard list (seeded by `seed` and the epoch); each reader
(one per process and data-loader worker) takes every k-th shard of that order; each shard is
read whole and its samples shuffled (seeded by the epoch and the shard's file name, so the
same shards in another directory or behind a URL train in the same order). So the stream of
a reader is a pure function of (seed, epoch, shard, sample), and its position is three
integers: resuming opens the right shard and skips samples without decoding them.

Each sample is augmented with its own random generator, seeded by its position:
resize the shorter side to `resolution`, crop a square (random or centre), flip
horizontally with probability 1/2. Boxes follow the crop and the flip and are clipped;
boxes left with less than `min_box_area` of the crop are dropped and the `max_entities`
largest kept. Keypoints follow too (a point cropped out is no longer given). A flip also
swaps the words "left" and "right" in the caption and the phrases, and the left and right
keypoints, so that text and pose still describe the image. The caption is emptied with
probability `caption_drop`. For text-image-box training a random square crop of the
augmented image becomes the sample's style image with probability `style_prob` (its token
takes one of the `max_entities` slots). Each sample also records its image's original (height, width) and the crop's
(top, left) corner in the resized (and flipped) image: SDXL's size and crop conditioning.
Corrupt samples (unreadable image, bad JSON, invalid entity, broken tar
member) and truncated shards are skipped and counted by reason (`DataPosition.skipped_by_reason`);
a reader whose shards hold no readable sample at all stops with a `UserError` naming them,
after one pass over them, rather than looping forever.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from gligen.data.format import Sample, SampleError, decode_sample, is_remote, shard_urls, tar_is_complete
from gligen.errors import UserError
from gligen.pose import Keypoints, flipped
from gligen.maps import LABEL_TYPES
from gligen.maps.encode import map_tensor
from gligen.training.batch import TrainingBatch
from gligen.training.config import DataConfig


@dataclass
class DataPosition:
    """Where one reader is: shard `shard` of epoch `epoch`'s order, `sample` samples into it.

    `skipped` counts the corrupt samples this reader has skipped since the run began (a
    truncated or unreadable shard counts once), `skipped_by_reason` the same by reason.
    """

    epoch: int = 0
    shard: int = 0
    sample: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainingSample:
    """A sample ready for batching. pixels (3, R, R) in [-1, 1]; boxes and keypoints normalized to the crop.

    original_size is the image's (height, width) before resizing; crop_top_left the crop's
    (top, left) corner in the resized image, as seen after the flip.
    """

    pixels: torch.Tensor
    caption: str
    phrases: list[str]
    boxes: list[tuple[float, float, float, float]]
    references: list[Image.Image]
    cache_key: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    keypoints: list[Keypoints | None] = field(default_factory=list)
    style: Image.Image | None = None
    condition_map: torch.Tensor | None = None  # (3, R, R) in [-1, 1] or (1, R, R) labels (`gligen.maps.encode`)


_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_left_right(text: str) -> str:
    """'the left cat' -> 'the right cat': what a mirrored image shows."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], text)


def augment(sample: Sample, config: DataConfig, rng: random.Random, with_references: bool = False,
            condition: str | None = None) -> TrainingSample:
    """Resize, crop, flip a sample and move, filter and cap its boxes (see the module docstring); the
    `condition` map, when asked for, goes through the same resize, crop and flip (label maps: nearest).

    The random draws happen in a fixed order (crop x, crop y, flip, caption drop, then with
    `with_references` and a `style_prob` the style crop), so a sample's augmentation depends
    only on `rng`'s seed.
    """
    size = config.resolution
    width, height = sample.image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = sample.image.resize((new_w, new_h), Image.BICUBIC)
    if config.random_crop:
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    flip = config.random_flip and rng.random() < 0.5
    drop_caption = rng.random() < config.caption_drop
    image = _crop_flip(image, left, top, size, flip)
    with_style = with_references and config.style_prob > 0 and rng.random() < config.style_prob
    style = _style_crop(image, rng) if with_style else None
    condition_map = None
    if condition is not None:
        resample = Image.NEAREST if condition in LABEL_TYPES else Image.BICUBIC
        fitted = _crop_flip(sample.condition_map.resize((new_w, new_h), resample), left, top, size, flip)
        condition_map = map_tensor(fitted, condition)

    kept = []
    for index, entity in enumerate(sample.entities):
        box = _crop_box(entity.box, new_w, new_h, left, top, size, flip)
        area = (box[2] - box[0]) * (box[3] - box[1])
        if area >= max(config.min_box_area, 1e-12):
            kept.append((area, index, box))
    kept = sorted(sorted(kept, reverse=True)[:config.max_entities - (style is not None)], key=lambda k: k[1])
    keypoints = [_crop_keypoints(sample.entities[i].keypoints, new_w, new_h, left, top, size, flip) for _, i, _ in kept]

    caption = "" if drop_caption else sample.caption
    phrases = [sample.entities[i].phrase for _, i, _ in kept]
    if flip:
        caption, phrases = swap_left_right(caption), [swap_left_right(p) for p in phrases]
    references = [_reference(sample, image, i, box) for _, i, box in kept] if with_references else []
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    cache_key = f"{sample.key}|{left},{top},{int(flip)},{size}"
    crop_top_left = (top, new_w - size - left if flip else left)
    return TrainingSample(pixels, caption, phrases, [box for _, _, box in kept], references, cache_key,
                          (height, width), crop_top_left, keypoints, style, condition_map)


def _crop_flip(image: Image.Image, left: int, top: int, size: int, flip: bool) -> Image.Image:
    image = image.crop((left, top, left + size, top + size))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image


def _crop_box(box, width: int, height: int, left: int, top: int, size: int, flip: bool):
    """A normalized box of the full image -> normalized box of the (flipped) crop, clipped to it."""
    x0, y0, x1, y1 = (
        min(max((v * extent - offset) / size, 0.0), 1.0)
        for v, extent, offset in zip(box, (width, height, width, height), (left, top, left, top))
    )
    return (1 - x1, y0, 1 - x0, y1) if flip else (x0, y0, x1, y1)


def _crop_keypoints(keypoints: Keypoints | None, width: int, height: int, left: int, top: int, size: int,
                    flip: bool) -> Keypoints | None:
    """Normalized keypoints of the full image -> of the (flipped) crop; a point cropped out is no longer given."""
    if keypoints is None:
        return None
    moved = []
    for x, y, v in keypoints:
        x, y = (x * width - left) / size, (y * height - top) / size
        moved.append((x, y, v) if v and 0 <= x <= 1 and 0 <= y <= 1 else (0.0, 0.0, 0))
    return flipped(moved) if flip else tuple(moved)


def _style_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random square crop of the augmented image, half its side to all of it: the sample's style image."""
    size = image.width
    side = rng.randint(max(1, size // 2), size)
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    return image.crop((left, top, left + side, top + side))


def _reference(sample: Sample, image: Image.Image, index: int, box) -> Image.Image:
    """The entity's reference image, or its box cut from the augmented image (as GLIGEN trained)."""
    if index < len(sample.references) and sample.references[index] is not None:
        return sample.references[index]
    size = image.width
    x0, y0, x1, y1 = (round(v * size) for v in box)
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def collate(samples: Sequence[TrainingSample], max_entities: int) -> TrainingBatch:
    """Batch samples, entities padded to `max_entities` slots."""
    boxes = torch.zeros(len(samples), max_entities, 4)
    masks = torch.zeros(len(samples), max_entities)
    for i, sample in enumerate(samples):
        if sample.boxes:
            boxes[i, :len(sample.boxes)] = torch.tensor(sample.boxes)
            masks[i, :len(sample.boxes)] = 1
    return TrainingBatch(
        pixels=torch.stack([s.pixels for s in samples]),
        boxes=boxes,
        masks=masks,
        captions=[s.caption for s in samples],
        phrases=[s.phrases for s in samples],
        references=[s.references for s in samples],
        cache_keys=[s.cache_key for s in samples],
        original_sizes=torch.tensor([s.original_size for s in samples], dtype=torch.float32),
        crops_top_left=torch.tensor([s.crop_top_left for s in samples], dtype=torch.float32),
        keypoints=[s.keypoints for s in samples],
        styles=[s.style for s in samples],
        maps=torch.stack([s.condition_map for s in samples]) if samples[0].condition_map is not None else None,
    )


class ShardDataset(torch.utils.data.IterableDataset):
    """Endless batches of augmented samples for one process, split across its loader workers.

    Use with `DataLoader(dataset, batch_size=None, num_workers=...)`. Each `TrainingBatch` carries
    its reader (the loader worker) and that reader's `DataPosition` after the batch, which is
    what a checkpoint saves and `positions` restores.
    """

    def __init__(
        self,
        config: DataConfig,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        positions: dict[int, DataPosition] | None = None,
        with_references: bool = False,
        condition: str | None = None,
    ):
        super().__init__()
        self.config = config
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.positions = dict(positions or {})
        self.with_references = with_references
        self.condition = condition
        self.urls = check_shards(config)
        readers = world_size * max(1, config.num_workers)
        if len(self.urls) < readers:
            raise UserError(
                f"data.shards: {len(self.urls)} shards for {readers} readers "
                f"({world_size} processes x {max(1, config.num_workers)} workers); write more shards or use fewer workers"
            )

    def __iter__(self) -> Iterator[TrainingBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        position = DataPosition(**asdict(self.positions.get(worker, DataPosition())))
        batch: list[TrainingSample] = []
        for sample in self._samples(position, self.rank * workers + worker, self.world_size * workers):
            batch.append(sample)
            if len(batch) == self.batch_size:
                out = collate(batch, self.config.max_entities)
                out.reader, out.position = worker, DataPosition(**asdict(position))
                yield out
                batch = []

    def _samples(self, position: DataPosition, reader: int, readers: int) -> Iterator[TrainingSample]:
        """Augmented samples from `position` on, advancing `position` in place as each is consumed.

        Raises a `UserError` when a whole pass over this reader's shards finds no readable sample.
        """
        barren: list[str] = []  # shards read in a row without one readable sample
        while True:
            order = self._shard_order(position.epoch)[reader::readers]
            while position.shard < len(order):
                url = order[position.shard]
                name = url.rstrip("/").rsplit("/", 1)[-1]
                raws = self._read_shard(url, position)
                if self.config.shuffle_within_shard:
                    random.Random(f"{self.seed}:{position.epoch}:{name}").shuffle(raws)
                barren.append(url)
                while position.sample < len(raws):
                    index = position.sample
                    position.sample += 1
                    try:
                        sample = decode_sample(raws[index])
                    except SampleError as error:
                        self._skip(position, error.reason, str(error))
                        continue
                    if self.condition is not None and sample.condition != self.condition:
                        self._skip(position, f"no {self.condition} map", f"{url} key {sample.key}: no "
                                   f"{self.condition}.png (write the shards with --condition {self.condition})")
                        continue
                    barren = []
                    rng = random.Random(f"{self.seed}:{position.epoch}:{name}:{index}")
                    yield augment(sample, self.config, rng, self.with_references, self.condition)
                position.shard += 1
                position.sample = 0
                if len(barren) >= len(order):
                    reasons = ", ".join(f"{n} {r}" for r, n in sorted(position.skipped_by_reason.items()))
                    raise UserError(f"data.shards: no readable sample in {len(barren)} shards "
                                    f"({_listed(barren)}); skipped so far: {reasons or 'nothing'}")
            position.epoch += 1
            position.shard = 0

    def _shard_order(self, epoch: int) -> list[str]:
        urls = list(self.urls)
        if self.config.shuffle_shards:
            random.Random(f"{self.seed}:epoch{epoch}").shuffle(urls)
        return urls

    def _read_shard(self, url: str, position: DataPosition) -> list[dict[str, Any]]:
        """All raw samples (undecoded bytes) of one shard; broken tar members and a truncated
        local shard are skipped and counted."""
        first_read = position.sample == 0  # on resume mid-shard these were counted already

        def handler(error: Exception) -> bool:
            if first_read:
                self._skip(position, "unreadable tar data", f"{url}: {error}")
            return True

        raws = list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=handler)))
        if first_read and not is_remote(url) and not tar_is_complete(url):
            self._skip(position, "truncated shard", f"{url}: the tar file ends early ({len(raws)} samples read)")
        return raws

    def _skip(self, position: DataPosition, reason: str, message: str) -> None:
        position.skipped += 1
        position.skipped_by_reason[reason] = position.skipped_by_reason.get(reason, 0) + 1
        if position.skipped <= 10:  # show the first ones; the rest only count
            warnings.warn(f"skipping corrupt sample ({reason}): {message}", stacklevel=2)


def check_shards(config: DataConfig) -> list[str]:
    """The shard URLs of `config.shards`; a `UserError` naming `data.shards` when it matches no shard.

    Cheap (no shard is opened): the trainer calls it before any model loads.
    """
    if not config.shards:
        raise UserError("data.shards: must name the training shards")
    try:
        return shard_urls(config.shards)
    except UserError as error:
        raise UserError(f"data.shards: {error}") from None


def _listed(urls: Sequence[str], limit: int = 3) -> str:
    names = ", ".join(urls[:limit])
    return names + (f" and {len(urls) - limit} more" if len(urls) > limit else "")
