"""Atomic file output: a reader never sees a half-written file, a killed job leaves none."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from gligen.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes private files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_image(path: str | os.PathLike, image: Image.Image) -> None:
    """Save a PIL image atomically; the format follows the suffix of `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])


def open_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image decoded now, so that a missing or corrupt file fails here with a UserError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: cannot read the image ({error})") from None
