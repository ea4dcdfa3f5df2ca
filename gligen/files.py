"""Files in and out: atomic outputs, output paths checked before a command runs, images read as RGB.

Outputs are written atomically: a reader never sees a half-written file, a killed job or a full
disk leaves none. Images of any PIL mode are read as 8-bit RGB the same way everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gligen.errors import UserError

MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused (decompression bombs); PIL's own limit is 89 M
NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


# --- output paths ---


class Output(str):
    """An argparse `type` for a directory a command writes into; `run_cli` checks it with `check_writable`."""

    is_dir = True


class OutputFile(Output):
    """An argparse `type` for a file a command writes."""

    is_dir = False


def _fault(code: int, path: str | os.PathLike) -> OSError:
    return OSError(code, os.strerror(code), os.fspath(path))


def check_writable(path: str | os.PathLike, is_dir: bool = True) -> None:
    """Raise the `OSError` that writing `path` (a directory, or a file with `is_dir=False`) would meet.

    Nothing is created. Checked: names too long, a regular file where a directory must be, a
    directory where a file must be, and a first existing ancestor that is read-only or not writable.
    """
    path = Path(path)
    if len(os.fsencode(path)) >= 4096 or any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):
        raise _fault(errno.ENAMETOOLONG, path)
    if path.exists():
        if is_dir and not path.is_dir():
            raise _fault(errno.ENOTDIR, path)
        if not is_dir and path.is_dir():
            raise _fault(errno.EISDIR, path)
    directory = path if is_dir else path.parent
    existing = next(p for p in [directory, *directory.parents] if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise _fault(errno.ENOTDIR, existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fault(errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES, existing)


@contextlib.contextmanager
def naming_os_errors(path: str | os.PathLike) -> Iterator[None]:
    """An `OSError` without a file name (ENOSPC from a write) gets `path`, so that its message names it."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            error.filename = str(path)
        raise


# --- atomic outputs ---


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds."""
    path = Path(path)
    with naming_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.close(fd)
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes private files; outputs get the usual permissions
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`, renamed to `path` only if the block succeeds.

    `path` must not exist or be empty, unless `replace` (then an old `path` is swapped out and deleted).
    """
    path = Path(path)
    if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path}: already exists and is not empty; choose another --out")
    with naming_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            old = path.parent / f"{tmp.name}.old"
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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


# --- text and JSON in ---


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a byte-order mark is allowed); a UserError names a missing, unreadable or
    non-UTF-8 file (with the offset of the first bad byte)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the file ({(error.strerror or str(error)).lower()})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte offset {error.start}: {data[error.start:error.start + 1]!r})"
                        ) from None


def parse_json(text: str, where: str) -> Any:
    """`json.loads(text)`; a UserError such as "gt.json line 3: invalid JSON: Expecting ',' delimiter"."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = "" if " line " in where else f" line {error.lineno}"
        raise UserError(f"{where}{line}: invalid JSON: {error.msg}") from None
    except RecursionError:
        raise UserError(f"{where}: invalid JSON: nested too deeply") from None


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file, with `read_text`'s and `parse_json`'s errors."""
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return parse_json(text, str(path))


# --- images in ---


def open_image(path: str | os.PathLike) -> Image.Image:
    """An image file as 8-bit RGB (see `to_rgb`), decoded now, so that a missing or corrupt file fails here
    with a UserError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            with Image.open(path) as image:
                check_pixels(image, str(path))
                image.load()
                return to_rgb(image)
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: cannot read the image ({error})") from None


def check_pixels(image: Image.Image, where: str) -> None:
    """Refuse an image larger than `MAX_IMAGE_PIXELS` before decoding it (a decompression bomb)."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UserError(f"{where}: image is {width}x{height} = {width * height} pixels, above the limit of "
                        f"{MAX_IMAGE_PIXELS} (gligen.files.MAX_IMAGE_PIXELS)")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, as it looks on screen.

    The EXIF orientation is applied. 16-bit grayscale (`I;16*`, and `I`, as which PIL reads
    16-bit PNGs) is scaled from [0, 65535]; 32-bit float (`F`) from [0, 1] when its values lie
    there, else clipped to [0, 255]. Transparency (LA, RGBA, PA, a palette or grayscale image with a
    transparent colour) is composited on white. Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV)
    converts as PIL converts it.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        rgba = image.convert("LA").convert("RGBA") if image.mode == "La" else image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "LAB":  # PIL's own LAB -> RGB conversion treats the channels as RGB
        return _lab_to_rgb(image)
    return image.convert("RGB")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    from PIL import ImageCms

    return ImageCms.applyTransform(image, ImageCms.buildTransform(ImageCms.createProfile("LAB"),
                                                                   ImageCms.createProfile("sRGB"), "LAB", "RGB"))
