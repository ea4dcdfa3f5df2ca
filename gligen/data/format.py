"""The training shard format: webdataset tar files of images with captions and boxed entities.

A sample is a group of files sharing a key (webdataset's convention, so keys hold no dots):

    KEY.jpg        the image (or KEY.png / KEY.webp)
    KEY.json       {"caption": str, "width": int, "height": int,
                    "entities": [{"phrase": str, "box": [x0, y0, x1, y1],
                                  "tokens_positive": [[start, end], ...]}]}
    KEY.ref0.jpg   optional reference image of entity 0 (text-image adapters), KEY.ref1.jpg ...
    KEY.canny.png  optional condition map (map adapters): KEY.<type>.png for a type of `gligen.maps`,
                   in its encoding there (sem: one-channel ADE20K labels); always PNG, lossless

Boxes are normalized xyxy (origin top-left); `tokens_positive` (optional) are character
spans of the phrase in the caption. Shards are read with webdataset's own machinery, so a
source may be a local path, a brace-expanded list (`dir/shard-{000000..000009}.tar`), a
URL, or a `pipe:` command (`pipe:aws s3 cp s3://bucket/shard-000000.tar -`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import webdataset as wds
from PIL import Image

from gligen.errors import UserError
from gligen.files import check_pixels, to_rgb
from gligen.layout import Entity, entity_from_dict
from gligen.maps import CONDITION_TYPES, LABEL_TYPES
from gligen.maps.encode import labels_of

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_KEY = re.compile(r"^[A-Za-z0-9_\-/]+$")


class SampleError(UserError, ValueError):
    """A sample that cannot be decoded (corrupt image, bad JSON, invalid entity); readers skip it.

    `reason` is the kind of problem without the place ("unreadable image"), for counting.
    """

    def __init__(self, where: str, reason: str, detail: str = ""):
        self.reason = reason
        self._parts = (where, reason, detail)
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # picklable, to come back from DataLoader workers
        return SampleError, self._parts


@dataclass
class Sample:
    """One training example. `references[i]` is entity i's reference image, or None; `condition` a map's type
    and `condition_map` the map (`gligen.maps`), or None."""

    key: str
    image: Image.Image
    caption: str
    entities: list[Entity]
    references: list[Image.Image | None] = field(default_factory=list)
    condition: str | None = None
    condition_map: Image.Image | None = None


def encode_sample(sample: Sample, image_format: str = "jpg") -> dict[str, Any]:
    """The files of `sample` as bytes, keyed for webdataset's `TarWriter`.

    `image_format` is jpg (quality 95), png (lossless, for synthetic data) or webp.
    """
    if not _KEY.match(sample.key):
        raise ValueError(f"sample key {sample.key!r} may hold only letters, digits, '_', '-' and '/'")
    meta = {
        "caption": sample.caption,
        "width": sample.image.width,
        "height": sample.image.height,
        "entities": [_entity_json(e) for e in sample.entities],
    }
    out: dict[str, Any] = {
        "__key__": sample.key,
        image_format: encode_image(sample.image, image_format),
        "json": json.dumps(meta).encode(),
    }
    for i, reference in enumerate(sample.references):
        if reference is not None:
            out[f"ref{i}.{image_format}"] = encode_image(reference, image_format)
    if sample.condition_map is not None:
        buffer = io.BytesIO()
        sample.condition_map.save(buffer, format="PNG")
        out[f"{sample.condition}.png"] = buffer.getvalue()
    return out


def _entity_json(entity: Entity) -> dict[str, Any]:
    out = entity.to_dict()
    out.pop("image", None)  # references travel as KEY.ref<i> files, never as paths
    return out


def safe_key(name: object) -> str:
    """`name` as a sample key: characters other than letters, digits, '_' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(name))


def encode_image(image: Image.Image, image_format: str = "jpg") -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=_PIL_FORMATS[image_format], quality=95)
    return buffer.getvalue()


def decode_image(data: bytes, where: str) -> Image.Image:
    """Fully decode image bytes into RGB (`gligen.files.to_rgb`); a truncated, unreadable or too large
    image raises `SampleError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            image = Image.open(io.BytesIO(data))
            check_pixels(image, where)
            image.load()  # PIL decodes lazily; force it so truncation shows here
            return to_rgb(image)
    except UserError as error:
        raise SampleError(where, "image too large", str(error).removeprefix(f"{where}: ")) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise SampleError(where, "unreadable image", str(error)) from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB; a missing or unreadable file raises `SampleError` naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SampleError(str(path), "missing image file", error.strerror or "") from None
    return decode_image(data, str(path))


def decode_sample(raw: dict[str, Any]) -> Sample:
    """A `Sample` from webdataset's raw dict of bytes (`__key__`, `jpg`/`png`/`webp`, `json`, ...).

    Raises `SampleError` (a `ValueError` and a `UserError`) naming the shard and key when the
    image or JSON is corrupt or an entity is invalid.
    """
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', 'sample')} key {key}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        raise SampleError(where, "no image", f"expected one of {', '.join(IMAGE_EXTENSIONS)}")
    if "json" not in raw:
        raise SampleError(where, "no json")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SampleError(where, "invalid json", str(error)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("caption", ""), str):
        raise SampleError(where, "invalid json", "expected an object with a string 'caption'")
    caption = meta.get("caption", "")
    raw_entities = meta.get("entities", [])
    if not isinstance(raw_entities, list):
        raise SampleError(where, "invalid json", "'entities' must be a list")
    try:
        entities = [entity_from_dict(e, f"entity {i}", caption) for i, e in enumerate(raw_entities)]
    except UserError as error:
        raise SampleError(where, "invalid entity", str(error)) from None
    image = decode_image(raw[image_ext], f"{where} {image_ext}")
    references = [_reference(raw, i, where) for i in range(len(entities))]
    if not any(r is not None for r in references):
        references = []
    condition = next((kind for kind in CONDITION_TYPES if f"{kind}.png" in raw), None)
    condition_map = decode_map(raw[f"{condition}.png"], condition, f"{where} {condition}.png") if condition else None
    return Sample(key, image, caption, entities, references, condition, condition_map)


def decode_map(data: bytes, kind: str, where: str) -> Image.Image:
    """A condition map's bytes: RGB, or a label map's labels (`gligen.maps.encode.labels_of`); else `SampleError`."""
    if kind not in LABEL_TYPES:
        return decode_image(data, where)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return labels_of(image, kind, where)
    except UserError as error:
        raise SampleError(where, "invalid condition map", str(error).removeprefix(f"{where}: ")) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise SampleError(where, "unreadable image", str(error)) from None


def _reference(raw: dict[str, Any], index: int, where: str) -> Image.Image | None:
    for ext in IMAGE_EXTENSIONS:
        data = raw.get(f"ref{index}.{ext}")
        if data is not None:
            return decode_image(data, f"{where} ref{index}.{ext}")
    return None


def shard_urls(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Expand a shard source into URLs: a directory (its `*.tar` files), a brace pattern, a glob, a list.

    Local shards must exist: a source that matches no file, or names files that are not there,
    is a `UserError` naming it. URLs and `pipe:` commands are taken as they are.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        urls = sorted(str(p) for p in Path(source).glob("*.tar"))
        if not urls:
            raise UserError(f"{source}: directory holds no .tar shards")
        return urls
    if isinstance(source, (str, os.PathLike)):
        urls = []
        for url in wds.shardlists.expand_urls(str(source)):
            urls += sorted(glob.glob(url)) if not is_remote(url) and glob.has_magic(url) else [url]
    else:
        urls = [str(url) for url in source]
    if not urls:
        raise UserError(f"{_shorten(source)}: matches no shard")
    missing = [url for url in urls if not is_remote(url) and not Path(url).is_file()]
    if len(missing) == len(urls):
        raise UserError(f"{_shorten(source)}: matches no shard file (e.g. {missing[0]} does not exist)")
    if missing:
        raise UserError(f"{_shorten(source)}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    return urls


def is_remote(url: str) -> bool:
    """A URL or a `pipe:` command, which webdataset opens itself, rather than a local file."""
    return "://" in url or url.startswith("pipe:")


def _shorten(source: Any, limit: int = 120) -> str:
    text = str(source) if isinstance(source, (str, os.PathLike)) else str(list(source))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def tar_is_complete(path: str | os.PathLike) -> bool:
    """Whether a local tar file ends as tar files end: a zero block after its last member.

    A file cut at a member boundary reads without error, only shorter; this tells the difference.
    """
    try:
        with tarfile.open(path, "r:") as tar:
            last = None
            for last in tar:
                pass
            end = 0 if last is None else last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        with open(path, "rb") as file:
            file.seek(end)
            block = file.read(tarfile.BLOCKSIZE)
    except (OSError, tarfile.TarError):
        return False
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def read_shards(
    source: str | os.PathLike | Iterable[str], dropped: Counter | None = None
) -> Iterator[Sample]:
    """Decoded samples of the shards, in order, through a webdataset pipeline.

    A sample that fails to decode is skipped with a warning and counted in `dropped` under
    its reason; a shard that cannot be opened raises.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard_urls(source)),
        wds.tarfile_to_samples(),
    )
    for raw in pipeline:
        try:
            yield decode_sample(raw)
        except SampleError as error:
            warnings.warn(f"skipping sample: {error}", stacklevel=2)
            if dropped is not None:
                dropped[error.reason] += 1
